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

import numpy as np
import torch

from .extra import _open_arrays, check_extra_arrays


def load_rst_extra(path, image_shape=None, num_classes=None):
    """Read and check an RST extra-data file. Returns (images (N, C, H, W) uint8, labels (N,) int64), CPU.

    The whole file in memory, channels first; training streams it through ``extra.load_extra`` instead.
    image_shape: (C, H, W) the images must have (the labeled data's), or None to accept any.
    num_classes: labels must lie in [0, num_classes), or None to only require labels >= 0.
    Raises DatasetNotFoundError if the file is missing, DataFormatError naming the offending key otherwise.
    """
    arrays = _open_arrays(path, "rst_extra")
    images, labels = np.array(arrays["images"]), np.array(arrays["labels"])  # read in: a writable copy
    check_extra_arrays(images, labels, path, "rst_extra", image_shape=image_shape, num_classes=num_classes)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))
