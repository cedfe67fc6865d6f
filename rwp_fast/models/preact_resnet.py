"""PreAct ResNet-18 (He et al. 2016), the network of the paper's Table 1.

The layout of Rice et al.'s ``preactresnet.py``, which the AWP and released RWP code import: PreActBlock,
[2, 2, 2, 2] blocks of 64-128-256-512 channels, a final BN-ReLU, global average pooling and a linear
layer; PyTorch's default initialisation. 11,172,170 parameters for 10 classes (Kuang Liu's
CIFAR version, 11,171,146, lacks the final BN).

The one change is the pooling: ``adaptive_avg_pool2d(·, 1)`` instead of ``avg_pool2d(·, 4)``. On 32×32
inputs the last feature map is 4×4, so the two are the same operation; the adaptive form also accepts the
8×8 digits (a 1×1 map there).
"""

import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus a shortcut (a 1×1 conv on the pre-activated input when the
    shape changes, else the identity)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))
        else:
            self.shortcut = None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """x: (B, in_channels, H, W) normalised float → logits (B, num_classes)."""

    def __init__(self, block, num_blocks, num_classes=10, in_channels=3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512 * block.expansion)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet18(num_classes=10, in_channels=3):
    return PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)
