"""A small CNN with BatchNorm, for the tests and the CPU demo on 8×8 digits.

conv3×3(in, 32) - BN - ReLU - conv3×3(32, 64, stride 2) - BN - ReLU - conv3×3(64, 64) - BN - ReLU
- global average pool - linear(64, classes): 56,554 parameters for 1 input channel and 10 classes.

It has what the weight perturbation must handle on a real network: four ``*weight`` tensors of dim > 1
(three convs and the linear layer) that are perturbed, and BN affine parameters, BN running statistics
and biases that must not be. The convs have no bias (BN follows each), as in the ResNets.

``small_cnn_gn`` (norm="gn") replaces each BatchNorm by GroupNorm with 8 groups: per-example statistics,
so its output for an example does not depend on the rest of the batch, which is what the multi-process
equivalence tests need (an N-process run then equals the 1-process run up to summation order).
"""

import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """x: (B, in_channels, H, W) normalised float, any H, W ≥ 2 → logits (B, num_classes)."""

    def __init__(self, num_classes=10, in_channels=1, width=32, norm="bn"):
        super().__init__()
        if norm not in ("bn", "gn"):
            raise ValueError(f"norm: expected one of bn, gn, got {norm!r}")
        layer = nn.BatchNorm2d if norm == "bn" else (lambda c: nn.GroupNorm(8, c))
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = layer(width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = layer(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, kernel_size=3, padding=1, bias=False)
        self.bn3 = layer(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
