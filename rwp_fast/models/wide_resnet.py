"""WideResNet-(6n+4)-k (Zagoruyko & Komodakis 2016) in the layout of the TRADES / AWP / RWP code.

BasicBlock is BN-ReLU-conv3×3-BN-ReLU-conv3×3 with a 1×1 conv shortcut on the pre-activated input when
the width changes; three groups of n blocks of 16k, 32k, 64k channels (strides 1, 2, 2) after a 16-channel
stem conv; final BN-ReLU, global average pooling, linear. dropRate is 0 in every paper row, so there is
no dropout. Initialisation as in that code: conv weights N(0, 2/(k·k·out_channels)), BN γ = 1, β = 0,
linear bias 0. WRN-34-10: 46,160,474 parameters for 10 classes; WRN-28-10: 36,479,194.

``sub_block1``: the TRADES/AWP/RWP WideResNet also builds a ``sub_block1`` (a copy of block1) that its
forward never uses. It changes nothing in training except one thing: the released RWP code's *global*
norm ‖w‖ (``norm_scope='global'``) is taken over every ``*weight`` in the state dict, the unused ones
included. Off by default; turn it on to match that norm (and to load those checkpoints) exactly.

Pooling is ``adaptive_avg_pool2d(·, 1)``: on 32×32 inputs the last map is 8×8 and this equals the
code's ``avg_pool2d(·, 8)``; it also accepts 8×8 inputs.
"""

import math

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        # When the width changes, the shortcut taps the pre-activated input (as in the reference code);
        # otherwise it is the raw input. In-place ReLU on a fresh BN output is safe: BN's backward needs
        # its input, not its output. It saves one activation per block (WRN-34-10 is memory-bound).
        pre = F.relu(self.bn1(x), inplace=True)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        return out + (x if self.equal_in_out else self.conv_shortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, num_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1) for i in range(num_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """x: (B, in_channels, H, W) normalised float → logits (B, num_classes). depth = 6n + 4."""

    def __init__(self, depth=34, widen_factor=10, num_classes=10, in_channels=3, sub_block1=False):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth: must be 6n + 4 with n >= 1 (e.g. 28, 34), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor: must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1)  # unused in forward; see module doc
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out), inplace=True)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
