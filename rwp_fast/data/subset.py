"""Seeded, class-stratified subsets: what an evaluation on N < all examples looks at.

The first N images of a split are not a sample of it: an ImageFolder split is sorted by class, so the
first 60 of a 10-class test set are 2 classes (a model at 56% on the whole set scored 8.3% on them,
issue 21). ``stratified_subset`` takes from each class its share of N (largest remainder, so the counts
add up to N exactly), chosen at random within the class with a seeded numpy ``RandomState``, whose
stream is frozen across numpy versions (NEP 19); torch makes no such promise for ``randperm``.

The indices come back sorted, so a subset keeps the split's order and the same (labels, n, seed) gives
the same images on every machine, every epoch and after a resume.
"""

import numpy as np
import torch

# The subsets of a run are drawn with RunConfig.subset_seed (default 0), not with its training seed:
# runs of different seeds are then scored on the same images, as on a fixed test set.
DEFAULT_SUBSET_SEED = 0


def class_counts(labels, n):
    """How many of each class a stratified subset of `n` takes: {label: count}, summing to n.

    labels: (N,) int64. Class c gets floor(n·N_c/N) plus one of the leftover places if its remainder is
    among the largest (ties: the smaller label first).
    """
    labels = np.asarray(torch.as_tensor(labels).cpu())
    classes, sizes = np.unique(labels, return_counts=True)
    quota = n * sizes / len(labels)
    counts = np.floor(quota).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - counts[i]), classes[i]))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return {int(c): int(k) for c, k in zip(classes, counts)}


def stratified_subset(labels, n, seed=DEFAULT_SUBSET_SEED):
    """Sorted int64 indices (n,) of a seeded, class-stratified sample of `labels` (N,); all N if n <= 0
    or n >= N."""
    labels_np = np.asarray(torch.as_tensor(labels).cpu())
    total = len(labels_np)
    if n <= 0 or n >= total:
        return torch.arange(total)
    rng = np.random.RandomState(seed)
    picked = []
    for label, count in class_counts(labels_np, n).items():  # classes in ascending order: one rng stream
        members = np.flatnonzero(labels_np == label)
        picked.append(members[rng.permutation(len(members))[:count]])
    return torch.from_numpy(np.sort(np.concatenate(picked)).astype(np.int64))


def subset_record(labels, n, seed=DEFAULT_SUBSET_SEED):
    """What the JSON files say about a subset: {'n', 'of', 'seed', 'stratified'} (seed None: whole set)."""
    total = len(labels)
    whole = n <= 0 or n >= total
    return {"n": total if whole else int(n), "of": total, "seed": None if whole else int(seed),
            "stratified": not whole}
