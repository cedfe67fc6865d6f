"""Per-channel mean/std normalisation as the model's first layer, and each dataset's statistics.

SPEC.md §1: images stay in pixel space [0, 1] everywhere outside the model, so ε, the PGD step and the
[0, 1] box clamp are all in pixel units, and the attacks never need to know the normalisation.
"""

import torch
from torch import nn

# Per-channel (mean, std) of the training images in [0, 1].
DATASET_STATS = {
    # Rice et al. / AWP / released RWP code: np.mean(train_set.data, axis=(0, 1, 2)) / 255.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    # The released RWP train_cifar100.py constants.
    "cifar100": ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                 (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)),
    # The released RWP (and Rice et al.) train_svhn.py use 0.5/0.5, not the measured SVHN statistics
    # (≈ 0.44/0.20); we follow the code so the SVHN rows compare like for like.
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # scikit-learn digits, all 1797 images after the 0..16 → 0..255 uint8 rescale of rwp_fast.data:
    #   x = np.round(load_digits().images * 255 / 16).astype(np.uint8) / 255; x.mean(), x.std()
    #   → 0.30531, 0.37589. Hardcoded so that building a model never needs the data.
    "digits": ((0.30531,), (0.37589,)),
    # Synthetic images are built around mid-grey with a spread of about a quarter of the range.
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def dataset_stats(name, in_channels=None):
    """(mean, std) tuples for a dataset name; synthetic is broadcast to ``in_channels`` channels."""
    if name not in DATASET_STATS:
        raise ValueError(f"dataset: no normalisation statistics for {name!r}; known: "
                         f"{', '.join(DATASET_STATS)}")
    mean, std = DATASET_STATS[name]
    if in_channels is not None and len(mean) != in_channels:
        if len(set(mean)) == 1 and len(set(std)) == 1:
            return (mean[0],) * in_channels, (std[0],) * in_channels
        raise ValueError(f"in_channels: {name!r} statistics have {len(mean)} channels, got {in_channels}")
    return tuple(mean), tuple(std)


class Normalize(nn.Module):
    """y = (x − mean) / std per channel. x: (B, C, H, W) float in [0, 1] → same shape and dtype.

    mean and std are *persistent* buffers: a checkpoint then records the normalisation it was trained
    with, and ``load_state_dict`` refuses a checkpoint that lacks it. Buffers, not parameters, so the
    optimiser, weight decay and the weight perturbation (``*weight`` parameters only) never touch them.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"std: expected {mean.numel()} channels like mean, got {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError(f"std: every channel must be > 0, got {std.tolist()}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

    def extra_repr(self):
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
