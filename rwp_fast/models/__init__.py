"""The networks of the paper (PreAct ResNet-18, WideResNet-34-10 and -28-10) and a small test CNN.

Every model is ``Normalize`` followed by the network, so it takes images in pixel space [0, 1]
(SPEC.md §1). ``build_model`` returns an ``nn.Sequential`` with two named children, ``normalize`` and
``net``; parameter names are then ``net.<layer>.weight``: every conv and linear weight ends in ``weight``
and has dim > 1, which is what ``perturbed_parameters`` selects, while BN affine parameters are dim 1 and
the normalisation constants are buffers.
"""

from collections import OrderedDict

from torch import nn

from ..config import MODELS
from .normalize import Normalize
from .preact_resnet import PreActBlock, PreActResNet, preact_resnet18
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet

__all__ = [
    "MODELS",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "build_network",
    "count_parameters",
    "model_for",
    "preact_resnet18",
]


def build_network(name, num_classes, in_channels):
    """The bare network (no normalisation) for a name in ``config.MODELS``."""
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, in_channels=in_channels)
    if name == "small_cnn_gn":
        return SmallCNN(num_classes=num_classes, in_channels=in_channels, norm="gn")
    if name == "preact_resnet18":
        return preact_resnet18(num_classes=num_classes, in_channels=in_channels)
    if name == "wrn-34-10":
        return WideResNet(34, 10, num_classes=num_classes, in_channels=in_channels)
    if name == "wrn-28-10":
        return WideResNet(28, 10, num_classes=num_classes, in_channels=in_channels)
    raise ValueError(f"model: {name!r} is not one of {', '.join(MODELS)}")


def build_model(name, num_classes, in_channels, mean, std):
    """nn.Sequential(normalize=Normalize(mean, std), net=<network>), on the CPU in fp32.

    x: (B, in_channels, H, W) float in [0, 1] → logits (B, num_classes). mean, std: per-channel sequences
    of length in_channels (pass zeros and ones for no normalisation, as the TRADES code has).
    """
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean, std: expected {in_channels} channel values each, got {len(mean)} and "
                         f"{len(std)}")
    net = build_network(name, num_classes, in_channels)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def model_for(cfg, data):
    """The model ``cfg.model`` for a ``rwp_fast.data.DatasetBundle`` (its classes, channels, mean, std)."""
    return build_model(cfg.model, data.num_classes, data.in_channels, data.mean, data.std)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
