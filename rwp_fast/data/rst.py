"""RST's pseudo-labeled extra data (Carmon et al. 2019), read from a plain ``.npz`` file.

The file holds two arrays:
  * ``images``: (N, H, W, C) uint8, channels last, exactly like the 'data' array of the RST release;
  * ``labels``: (N,) integer pseudo-labels in [0, num_classes).

The RST authors distribute the 500K Tiny-Images set as ``ti_500K_pseudo_labeled.pickle``, a dict with
'data' (500000, 32, 32, 3) uint8 and 'extrapolated_targets' (500000,). Convert it once, on a machine and
from a source you trust, with:

    import pickle, numpy as np
    with open("ti_500K_pseudo_labeled.pickle", "rb") as f:
        d = pickle.load(f)
    np.savez("ti_500K_pseudo_labeled.npz", images=np.asarray(d["data"], dtype=np.uint8),
             labels=np.asarray(d["extrapolated_targets"], dtype=np.int64))

and pass ``--rst-extra ti_500K_pseudo_labeled.npz``. The library itself never unpickles: loading a pickle
runs whatever code the file names, so a downloaded or shared pickle is a code-execution risk, while
``np.load(..., allow_pickle=False)`` only ever reads raw arrays. The .npz is 1.5 GB uncompressed, the
same as the pickle, and loads in seconds.
"""

import os
import zipfile

import numpy as np
import torch

from .datasets import DataFormatError, DatasetNotFoundError


def load_rst_extra(path, image_shape=None, num_classes=None):
    """Read and check an RST extra-data file. Returns (images (N, C, H, W) uint8, labels (N,) int64), CPU.

    image_shape: (C, H, W) the images must have (the labeled data's), or None to accept any.
    num_classes: labels must lie in [0, num_classes), or None to only require labels >= 0.
    Raises DatasetNotFoundError if the file is missing, DataFormatError naming the offending key otherwise.
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"rst_extra: no file at {os.path.abspath(path)}; expected an .npz with "
                                   f"'images' (N, H, W, C) uint8 and 'labels' (N,). See rwp_fast/data/rst.py "
                                   f"for converting ti_500K_pseudo_labeled.pickle.")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise DataFormatError(f"rst_extra: {path} is a single .npy array; expected an .npz with the "
                                      f"keys 'images' and 'labels'")
            missing = [k for k in ("images", "labels") if k not in f.files]
            if missing:
                raise DataFormatError(f"rst_extra: {path} lacks the key(s) {missing}; it has {f.files}")
            images, labels = f["images"], f["labels"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"rst_extra: {path} is not a readable .npz of plain arrays ({exc})") from exc

    if images.dtype != np.uint8:
        raise DataFormatError(f"rst_extra: key 'images' must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataFormatError(f"rst_extra: key 'images' must have shape (N, H, W, C) with C = 1 or 3 "
                              f"(channels last, as the RST pickle's 'data'), got {images.shape}")
    n = images.shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataFormatError(f"rst_extra: key 'labels' must have shape ({n},) to match 'images', "
                              f"got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"rst_extra: key 'labels' must hold integers, got {labels.dtype}")
    if n == 0:
        raise DataFormatError("rst_extra: key 'images' holds no images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise DataFormatError(f"rst_extra: key 'labels' must lie in {bound}, got values in [{low}, {high}]")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        h, w, c = images.shape[1:]
        raise DataFormatError(f"rst_extra: key 'images' holds {h}×{w}×{c} (H×W×C) images, but the labeled "
                              f"data is C×H×W = {tuple(image_shape)}")
    return x, torch.from_numpy(labels.astype(np.int64))
