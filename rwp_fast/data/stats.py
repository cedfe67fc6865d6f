"""Per-channel (mean, std) of a dataset's [0, 1] images, for the model's ``Normalize`` layer: the
known datasets' constants and the measurement for a user's own data."""

import torch

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


def channel_stats(x, chunk=4096):
    """Per-channel (mean, std) of uint8 images (N, C, H, W) scaled to [0, 1], summed in float64.

    A channel that is constant gets std 1/255 (one grey level) instead of 0, which Normalize refuses.
    """
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
