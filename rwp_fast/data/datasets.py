"""The datasets of a run, held in memory as uint8 tensors: digits, CIFAR-10/100, SVHN, synthetic.

``load_dataset(cfg)`` returns a ``DatasetBundle``: train and test images (N, C, H, W) uint8 in [0, 255]
with int64 labels, and what the model and the batches need (classes, channels, size, mean/std for the
model's ``Normalize`` layer, the augmentation). CIFAR and SVHN come from torchvision's files under
``cfg.data_dir``; digits ship with scikit-learn, so the CPU demo and the tests never touch the network.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DATASETS
from .augment import CIFAR_AUGMENTATION, DIGITS_AUGMENTATION, NO_AUGMENTATION, Augmentation
from .batches import derive_seed
from .errors import DataFormatError, DatasetNotFoundError
from .extra import ExtraData, load_extra
from .own import load_folder, load_npz, own_augmentation
from .stats import channel_stats, dataset_stats

# digits: a fixed split, independent of cfg.seed, so every run and every seed is scored on the same
# 360 test images. numpy's legacy RandomState stream is frozen across numpy versions (NEP 19); torch
# makes no such promise for randperm.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360
DIGITS_TRAIN_SIZE = 1797 - DIGITS_TEST_SIZE

# synthetic: fixed content (seed 0) whatever cfg.seed, like a real dataset.
SYNTHETIC_SEED = 0
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10_000, 2_000
# uint8 units. With templates U(64, 192) the pixel std is sqrt(37² + 48²) ≈ 60, measured 0.232·255 after
# clipping: close to the 0.25 that DATASET_STATS["synthetic"] assumes.
_SYNTHETIC_NOISE_STD = 48.0


@dataclass(frozen=True)
class _TorchvisionSpec:
    cls: str          # torchvision.datasets class name
    train: tuple      # (keyword, value) selecting the training split
    test: tuple       # idem, test split
    classes: int
    files: str        # what torchvision looks for under data_dir, for the error message
    archive: str      # what --download fetches
    folder: str       # what to copy by hand instead


_TORCHVISION = {
    "cifar10": _TorchvisionSpec(
        "CIFAR10", ("train", True), ("train", False), 10,
        files="cifar-10-batches-py/ (data_batch_1 … data_batch_5, test_batch, batches.meta)",
        archive="cifar-10-python.tar.gz (163 MB)", folder="the extracted cifar-10-batches-py/"),
    "cifar100": _TorchvisionSpec(
        "CIFAR100", ("train", True), ("train", False), 100,
        files="cifar-100-python/ (train, test, meta)",
        archive="cifar-100-python.tar.gz (161 MB)", folder="the extracted cifar-100-python/"),
    "svhn": _TorchvisionSpec(
        "SVHN", ("split", "train"), ("split", "test"), 10,
        files="train_32x32.mat and test_32x32.mat",
        archive="train_32x32.mat and test_32x32.mat (182 MB + 64 MB)",
        folder="train_32x32.mat and test_32x32.mat"),
}


@dataclass
class DatasetBundle:
    """One dataset in memory. Images are (N, C, H, W) uint8 in [0, 255]; labels (N,) int64 on the CPU."""
    name: str                      # one of config.DATASETS
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int               # C
    image_size: int                # H = W
    mean: tuple                    # per-channel mean of the [0, 1] images, for the model's Normalize
    std: tuple                     # per-channel std, idem
    augment: Augmentation          # training augmentation; falsy (NO_AUGMENTATION) when none
    extra: object = None           # ExtraData (images, labels, fraction) mixed into each batch, or None
    classes: tuple = ()            # class names, where the source has them (folder)
    notes: tuple = ()              # what loading did that a user should know (skipped files, cache)

    @property
    def extra_x(self):
        """Extra images (M, C, H, W) uint8 (a view of the memory-mapped file), or None."""
        return None if self.extra is None else self.extra.images

    @property
    def extra_y(self):
        return None if self.extra is None else self.extra.labels

    @property
    def image_shape(self):
        return (self.in_channels, self.image_size, self.image_size)

    def summary(self):
        extra = f", extra {len(self.extra)} (F={self.extra.fraction})" if self.extra is not None else ""
        return (f"{self.name}: train {self.train_x.shape[0]}, test {self.test_x.shape[0]}{extra}, "
                f"{self.in_channels}×{self.image_size}×{self.image_size}, {self.num_classes} classes")


def _bundle(name, train, test, num_classes, augment, extra=None, stats=None, classes=(), notes=()):
    (train_x, train_y), (test_x, test_y) = train, test
    c, h, w = train_x.shape[1:]
    if h != w:
        raise DataFormatError(f"{name}: expected square images, got {h}×{w}; pass --image-size N to resize")
    mean, std = stats if stats is not None else dataset_stats(name, c)
    return DatasetBundle(name, train_x, train_y, test_x, test_y, num_classes, c, h, mean, std, augment,
                         extra, tuple(classes), tuple(notes))


# ------------------------------------------------------------------------------------------- digits
def load_digits_uint8():
    """All 1797 scikit-learn digits: images (1797, 1, 8, 8) uint8, labels (1797,) int64.

    The original pixels are integers 0..16; they are rescaled to 0..255 by round(v · 255 / 16), so 16
    maps to 255 and the images look like any other uint8 dataset to the rest of the pipeline.
    """
    from sklearn.datasets import load_digits  # imported here: only the digits need scikit-learn

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x = torch.from_numpy(images).unsqueeze(1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    return x, y


def digits_split():
    """(train_idx, test_idx) int64 numpy arrays: a fixed seeded permutation, 1437 train / 360 test."""
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(DIGITS_TRAIN_SIZE + DIGITS_TEST_SIZE)
    return perm[:DIGITS_TRAIN_SIZE], perm[DIGITS_TRAIN_SIZE:]


def _load_digits():
    x, y = load_digits_uint8()
    train_idx, test_idx = (torch.from_numpy(i) for i in digits_split())
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


# ------------------------------------------------------------------------------------- torchvision
def _not_found_message(name, root, download, exc):
    spec = _TORCHVISION[name]
    where = os.path.abspath(root)
    if download:
        return (f"dataset {name!r}: the download into {where} failed ({exc}). torchvision needs a network to "
                f"fetch {spec.archive}; without one, copy {spec.folder} into {where} and run "
                f"without --download.")
    # torchvision's own text ("... You can use download=True ...") names its Python API, not our flag,
    # so it is only quoted when it says something else (a permission error, a corrupt file, ...).
    detail = "" if "Dataset not found or corrupted" in str(exc) else f" (torchvision: {exc})"
    return (f"dataset {name!r}: not found in --data-dir {where}: looked for {spec.files} there"
            f"{detail}. To get it, either rerun with --download on a machine with a network (torchvision "
            f"fetches {spec.archive} into {where}), or copy {spec.folder} into {where}.")


def _load_torchvision(name, root, download):
    import torchvision  # imported here: importing it costs ~0.5 s and digits/synthetic do not need it

    spec = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, spec.cls)
    splits = []
    for key, value in (spec.train, spec.test):
        try:
            ds = cls(root, download=download, **{key: value})
        except (RuntimeError, OSError) as exc:   # missing/corrupt files; URLError etc. on a failed download
            raise DatasetNotFoundError(_not_found_message(name, root, download, exc)) from exc
        if name == "svhn":   # torchvision keeps SVHN as (N, 3, 32, 32) uint8 with labels 0..9
            x = torch.from_numpy(np.ascontiguousarray(ds.data))
            y = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        else:                # CIFAR: (N, 32, 32, 3) uint8 (HWC) and a list of ints
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor(ds.targets, dtype=torch.int64)
        splits.append((x, y))
    return splits[0], splits[1]


# ---------------------------------------------------------------------------------------- synthetic
def make_synthetic(n_train=SYNTHETIC_TRAIN, n_test=SYNTHETIC_TEST, num_classes=10, shape=(3, 32, 32),
                   seed=SYNTHETIC_SEED, n_extra=0):
    """Random uint8 images that a network can learn: x = clip(template[y] + N(0, 48²)), y uniform.

    Each class has a blocky template (a 4×4 grid of U(64, 192) values per channel, nearest-upsampled).
    Per pixel the noise (std 48) exceeds the template spread (std 37), but over a whole 3×32×32 image the
    classes are easy: the nearest class mean scores 100% on clean test images. It exists for tests and
    throughput, where losses should move; it is no measure of accuracy or robustness.
    Returns ((train_x, train_y), (test_x, test_y), extra) with extra = (x, y) of n_extra more
    images when n_extra > 0, else None. Deterministic in ``seed``; each split has its own stream.
    """
    c, h, w = shape
    gen = torch.Generator().manual_seed(derive_seed(seed, 0))
    coarse = torch.rand((num_classes, c, 4, 4), generator=gen) * 128.0 + 64.0
    templates = F.interpolate(coarse, size=(h, w), mode="nearest")

    def split(n, stream):
        g = torch.Generator().manual_seed(derive_seed(seed, stream))
        y = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn((n, c, h, w), generator=g) * _SYNTHETIC_NOISE_STD
        x = (templates[y] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return x, y

    extra = split(n_extra, 3) if n_extra > 0 else None
    return split(n_train, 1), split(n_test, 2), extra


# ------------------------------------------------------------------------------------------ loading
def check_classes(name, data_dir, train_y, num_classes):
    """A DataFormatError unless the training labels hold two classes or more: with one, every prediction
    is right, and a run would report 100% robust accuracy for a model that learned nothing."""
    present = torch.unique(train_y).numel()
    if num_classes < 2 or present < 2:
        where = f" at --data-dir {os.path.abspath(data_dir)}" if name in ("folder", "npz") else ""
        raise DataFormatError(f"dataset {name!r}{where}: the training images hold {present} class(es) of "
                              f"{num_classes}; a classifier needs 2 or more (with one, every prediction is "
                              "right and every accuracy is 100%)")


def load_dataset(cfg):
    """The dataset of ``cfg`` (fields dataset, data_dir, download, train_examples, image_size,
    skip_bad_images, method, extra_data, extra_fraction, rst_extra).

    train_examples > 0 keeps the first N training examples (synthetic: generates N).
    With ``cfg.extra_file`` (``extra_data``, or ``rst_extra`` for method 'rst') the bundle also holds the
    memory-mapped extra data (``extra.load_extra``) with fraction ``cfg.extra_mix``; RST on the synthetic
    dataset without a file generates as many extra images as training images.
    folder/npz (``own.py``): mean and std are measured on the training images.
    Raises DatasetNotFoundError for missing files, DataFormatError (a ValueError) for bad contents,
    ValueError for an unknown dataset name.
    """
    name = cfg.dataset
    extra = None
    stats, classes, notes = None, (), ()
    if name == "digits":
        train, test = _load_digits()
        num_classes, augment = 10, DIGITS_AUGMENTATION
    elif name in _TORCHVISION:
        train, test = _load_torchvision(name, cfg.data_dir, cfg.download)
        num_classes = _TORCHVISION[name].classes
        augment = NO_AUGMENTATION if name == "svhn" else CIFAR_AUGMENTATION
    elif name in ("folder", "npz"):
        if name == "folder":
            own = load_folder(cfg.data_dir, image_size=cfg.image_size, skip_bad=cfg.skip_bad_images,
                              quiet=cfg.quiet)
        else:
            own = load_npz(cfg.data_dir, image_size=cfg.image_size)
        train, test, num_classes, classes, notes = own.train, own.test, own.num_classes, own.classes, own.notes
        augment = own_augmentation(train[0].shape[-1])
    elif name == "synthetic":
        n_train = cfg.train_examples if cfg.train_examples > 0 else SYNTHETIC_TRAIN
        want_extra = cfg.method == "rst" and not cfg.extra_file
        train, test, extra = make_synthetic(n_train=n_train, n_extra=n_train if want_extra else 0)
        # CIFAR's augmentation, so that throughput on synthetic data includes its (small) cost.
        num_classes, augment = 10, CIFAR_AUGMENTATION
    else:
        raise ValueError(f"dataset: {name!r} is not one of {', '.join(DATASETS)}")
    if cfg.train_examples > 0:
        train = (train[0][:cfg.train_examples], train[1][:cfg.train_examples])
    check_classes(name, cfg.data_dir, train[1], num_classes)
    if name in ("folder", "npz"):
        stats = channel_stats(train[0])   # after train_examples: the statistics of what is trained on
    if cfg.extra_file:
        what = "extra_data" if cfg.extra_data else "rst_extra"
        extra = load_extra(cfg.extra_file, cfg.extra_mix, image_shape=tuple(train[0].shape[1:]),
                           num_classes=num_classes, what=what)
    elif extra is not None:
        extra = ExtraData(extra[0], extra[1], cfg.extra_mix, source="synthetic")
    return _bundle(name, train, test, num_classes, augment, extra, stats, classes, notes)
