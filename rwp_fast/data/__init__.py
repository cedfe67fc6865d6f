"""Datasets in memory as uint8 tensors, and seeded, resumable batches augmented on the device.

``load_dataset(cfg)`` → ``DatasetBundle``; ``BatchIterator(bundle.train_x, bundle.train_y, B, seed=...,
device=..., augment=bundle.augment, extra=bundle.extra).epoch(e, start_step)`` → (x in [0, 1], y) batches.
"""

from .augment import (
    CIFAR_AUGMENTATION,
    DIGITS_AUGMENTATION,
    NO_AUGMENTATION,
    PAD_MODES,
    Augmentation,
    augment_batch,
    draw_augmentation,
)
from .batches import (
    BatchIterator,
    derive_seed,
    epoch_batches,
    eval_batches,
    seeded_generator,
    steps_per_epoch,
    to_float,
)
from .datasets import DatasetBundle, digits_split, load_dataset, load_digits_uint8, make_synthetic
from .errors import DataFormatError, DatasetNotFoundError
from .extra import ExtraData, extra_fits_on_device, load_extra
from .own import load_folder, load_npz
from .rst import load_rst_extra
from .stats import DATASET_STATS, channel_stats, dataset_stats

__all__ = [
    "CIFAR_AUGMENTATION", "DATASET_STATS", "DIGITS_AUGMENTATION", "NO_AUGMENTATION", "PAD_MODES",
    "Augmentation", "BatchIterator", "DataFormatError", "DatasetBundle", "DatasetNotFoundError", "ExtraData",
    "augment_batch", "channel_stats", "dataset_stats", "derive_seed", "digits_split",
    "draw_augmentation", "epoch_batches", "eval_batches", "extra_fits_on_device", "load_dataset",
    "load_digits_uint8", "load_extra", "load_folder", "load_npz", "load_rst_extra", "make_synthetic",
    "seeded_generator", "steps_per_epoch", "to_float",
]
