"""Per-channel mean/std normalisation as the model's first layer (each dataset's statistics: data/stats.py).

SPEC.md §1: images stay in pixel space [0, 1] everywhere outside the model, so ε, the PGD step and the
[0, 1] box clamp are all in pixel units, and the attacks never need to know the normalisation.
"""

import torch
from torch import nn

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
