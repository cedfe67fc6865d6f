"""Training augmentation, applied on the device to the uint8 batch before the float conversion.

  * CIFAR-10/100: the paper's 4-pixel zero pad + random 32×32 crop + random horizontal flip, i.e.
    torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip as in the TRADES code. Rice et al.'s
    CIFAR-10 code (which AWP and RWP's AT scripts reuse) pads by reflection instead: ``pad_mode='reflect'``.
  * SVHN: none, as in the released code.
  * digits: a 1-pixel pad and crop (4 pixels is half of an 8×8 image) and no flip: a mirrored 2, 3, 4, 5,
    7 or 9 is not that digit.
"""

from dataclasses import dataclass

import torch

PAD_MODES = ("zeros", "reflect")


@dataclass(frozen=True)
class Augmentation:
    """Random crop after padding, and random horizontal flip; falsy when it does nothing."""
    pad: int = 0              # pixels of padding on each side before the random crop back to H×W
    flip: bool = False        # horizontal flip with probability 1/2
    pad_mode: str = "zeros"   # one of PAD_MODES: 'zeros' (torchvision, TRADES) or 'reflect' (Rice et al.)

    def __post_init__(self):
        if self.pad < 0:
            raise ValueError(f"pad: must be >= 0, got {self.pad}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode: expected one of {PAD_MODES}, got {self.pad_mode!r}")

    def __bool__(self):
        return self.pad > 0 or self.flip


NO_AUGMENTATION = Augmentation()
CIFAR_AUGMENTATION = Augmentation(pad=4, flip=True)
DIGITS_AUGMENTATION = Augmentation(pad=1, flip=False)


def draw_augmentation(batch_size, augment, generator):
    """The random parameters of one batch, on the CPU.

    Returns offsets (B, 2) int64 in [0, 2·pad]: the (row, column) of the crop's top-left corner in the
    padded image; and flips (B,) bool. Offsets are drawn first, then flips (only if augment.flip).
    """
    offsets = torch.randint(0, 2 * augment.pad + 1, (batch_size, 2), generator=generator)
    if augment.flip:
        flips = torch.rand(batch_size, generator=generator) < 0.5
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool)
    return offsets, flips


def _reflect(index, n):
    # np.pad(mode='reflect') / F.pad(mode='reflect'): -1 → 1, n → n - 2 (edge not repeated); needs pad < n.
    index = torch.where(index < 0, -index, index)
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def augment_batch(x, offsets, flips, pad, pad_mode="zeros"):
    """Crop each image at its offset from the padded image, then flip it where ``flips`` is set.

    x: (B, C, H, W) any dtype; offsets: (B, 2) int64 in [0, 2·pad]; flips: (B,) bool; both on x.device.
    Returns (B, C, H, W), same dtype: out[b, :, i, j] = padded[b, :, oy + i, ox + j'] with
    j' = W − 1 − j if flipped else j. One gather with per-example row and column indices: the padded
    image is never materialised and there is no loop over examples.

    Layout: a channels-last x (NHWC memory, not also NCHW-contiguous) gives a channels-last result with the
    same values, gathered as whole pixels from the NHWC view; any other x gives a contiguous one.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode: expected one of {PAD_MODES}, got {pad_mode!r}")
    B, C, H, W = x.shape
    if pad_mode == "reflect" and pad >= min(H, W):
        raise ValueError(f"pad: reflection padding needs pad < image size {min(H, W)}, got {pad}")
    device = x.device
    i = torch.arange(H, device=device)
    j = torch.arange(W, device=device)
    rows = offsets[:, 0:1] - pad + i                                       # (B, H) rows of x
    cols = offsets[:, 1:2] - pad + torch.where(flips[:, None], W - 1 - j, j)  # (B, W) columns of x
    if pad_mode == "reflect":
        rows, cols = _reflect(rows, H), _reflect(cols, W)
        outside = None
    else:
        outside = (((rows < 0) | (rows >= H))[:, None, :, None]
                   | ((cols < 0) | (cols >= W))[:, None, None, :])      # (B, 1, H, W): zero padding
        rows, cols = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        b = torch.arange(B, device=device)[:, None, None]
        out = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].contiguous()  # (B, H, W, C)
        if outside is not None:
            out.masked_fill_(outside.permute(0, 2, 3, 1), 0)
        return out.permute(0, 3, 1, 2)
    b = torch.arange(B, device=device)[:, None, None, None]
    c = torch.arange(C, device=device)[None, :, None, None]
    out = x[b, c, rows[:, None, :, None], cols[:, None, None, :]]
    if outside is not None:
        out.masked_fill_(outside, 0)
    return out
