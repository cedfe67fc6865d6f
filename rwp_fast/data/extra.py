"""Extra (generated or pseudo-labeled) training data, memory-mapped, mixed into every batch.

``--extra-data FILE.npz --extra-fraction F`` puts round(F·B) extra examples into each batch of B and
takes the rest from the training set; the epoch is still one pass over the training set, as in RST
(Carmon et al. 2019), which is the case F = 0.5 (``--method rst --rst-extra FILE``).

The file holds
  * ``images``: (N, H, W, C) uint8, channels last (C = 1 or 3), as numpy image arrays and the RST
    release's 'data' are;
  * ``labels``: (N,) integers in [0, classes): pseudo-labels or the generator's classes.
Either as one ``.npz`` (``np.savez``, *not* ``savez_compressed``) or as a directory holding
``images.npy`` and ``labels.npy``.

Memory. A million 32×32×3 images are 3 GB: the images are memory-mapped, never read whole into host
memory. An uncompressed ``.npz`` member is a plain ``.npy`` stored at some offset of the zip file, so it
is mapped with ``np.memmap`` at that offset (numpy's own ``np.load(mmap_mode='r')`` does not map npz
members); a ``.npy`` is mapped by ``np.load(mmap_mode='r')``. A compressed member cannot be mapped: it is
read into memory, with a warning saying how to re-save it. ``BatchIterator`` copies the extra images to
the GPU whole only when they fit (``extra_fits_on_device``); otherwise it streams each step's images in
pinned chunks (see ``batches.py``). The labels (8 bytes each, 8 MB per million) are always read.

Pickles are never loaded (``allow_pickle=False``): unpickling runs code named by the file.
"""

import os
import warnings
import zipfile

import numpy as np
import torch

from .errors import DataFormatError, DatasetNotFoundError

EXTRA_KEYS = ("images", "labels")


class ExtraData:
    """Extra examples and the share of each batch they fill.

    images: (M, C, H, W) uint8 tensor on the host; usually a channels-last *view* of a memory-mapped
    (M, H, W, C) array, so rows are read from disk only when a batch gathers them.
    labels: (M,) int64 tensor. fraction: F in (0, 1): each batch of B holds round(F·B) extra examples.
    """

    def __init__(self, images, labels, fraction, source=""):
        if not 0 < fraction < 1:
            raise ValueError(f"extra_fraction: must be in (0, 1), got {fraction!r}")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"extra: expected uint8 images (M, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"extra: expected integer labels ({images.shape[0]},), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.fraction = float(fraction)
        self.source = source

    def __len__(self):
        return self.images.shape[0]

    @property
    def nbytes(self):
        return self.images.numel()

    def per_batch(self, batch_size):
        """(labeled, extra) examples in a full batch of ``batch_size``: extra = round(F·B), half up."""
        n_extra = int(np.floor(self.fraction * batch_size + 0.5))
        if not 0 < n_extra < batch_size:
            raise ValueError(f"extra_fraction: {self.fraction} of batch_size {batch_size} rounds to "
                             f"{n_extra} extra examples; it must leave between 1 and {batch_size - 1}")
        return batch_size - n_extra, n_extra


def _npz_member_memmap(path, member):
    """np.memmap of an uncompressed .npy member of a zip file, or None when it cannot be mapped."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            # The local file header: 30 fixed bytes, then the name and an extra field whose lengths
            # are at bytes 26 and 28 (the central directory's copy of 'extra' may differ; read this one).
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                return None
            name_len = int.from_bytes(header[26:28], "little")
            extra_len = int.from_bytes(header[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
    if dtype.hasobject or fortran:
        return None
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _open_arrays(path, what):
    """{'images': array (memory-mapped when possible), 'labels': array} from an .npz or a directory."""
    where = os.path.abspath(path)
    if os.path.isdir(path):
        arrays = {}
        for key in EXTRA_KEYS:
            file = os.path.join(path, key + ".npy")
            if not os.path.isfile(file):
                raise DataFormatError(f"{what}: the directory {where} lacks {key}.npy; expected images.npy "
                                      f"(N, H, W, C) uint8 and labels.npy (N,)")
            try:
                arrays[key] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DataFormatError(f"{what}: {file} is not a readable .npy of plain numbers ({exc})") from exc
        return arrays
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{what}: no file at {where}; expected an .npz with 'images' (N, H, W, C) "
                                   f"uint8 and 'labels' (N,), or a directory with images.npy and labels.npy")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise DataFormatError(f"{what}: {path} is a single .npy array; expected an .npz with the "
                                      f"keys 'images' and 'labels'")
            missing = [k for k in EXTRA_KEYS if k not in f.files]
            if missing:
                raise DataFormatError(f"{what}: {path} lacks the key(s) {missing}; it has {f.files}")
            labels = f["labels"]
            images = _npz_member_memmap(path, "images.npy")
            if images is None:
                images = f["images"]
                if images.nbytes > 1 << 28:   # 256 MB: worth saying why memory fills up
                    warnings.warn(f"{what}: 'images' in {path} is compressed (np.savez_compressed) and was "
                                  f"read into memory ({images.nbytes / 1e9:.1f} GB); re-save it with np.savez "
                                  f"to memory-map it", stacklevel=3)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{what}: {path} is not a readable .npz of plain arrays ({exc})") from exc
    return {"images": images, "labels": labels}


def check_extra_arrays(images, labels, path, what, image_shape=None, num_classes=None):
    """Raise DataFormatError naming the key at fault. images: (N, H, W, C) array; labels: (N,)."""
    if images.dtype != np.uint8:
        raise DataFormatError(f"{what}: key 'images' must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataFormatError(f"{what}: key 'images' must have shape (N, H, W, C) with C = 1 or 3 "
                              f"(channels last, as the RST pickle's 'data'), got {images.shape}")
    n = images.shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataFormatError(f"{what}: key 'labels' must have shape ({n},) to match 'images', "
                              f"got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{what}: key 'labels' must hold integers, got {labels.dtype}")
    if n == 0:
        raise DataFormatError(f"{what}: key 'images' holds no images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise DataFormatError(f"{what}: key 'labels' must lie in {bound}, got values in [{low}, {high}]")
    if image_shape is not None:
        h, w, c = images.shape[1:]
        if (c, h, w) != tuple(image_shape):
            raise DataFormatError(f"{what}: key 'images' holds {h}×{w}×{c} (H×W×C) images, but the labeled "
                                  f"data is C×H×W = {tuple(image_shape)}")


def host_tensor(array):
    """torch view of a (possibly read-only, memory-mapped) numpy array, without a copy."""
    with warnings.catch_warnings():
        # A read-only memmap: torch warns that writing would be undefined; nothing here writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def load_extra(path, fraction, image_shape=None, num_classes=None, what="extra_data"):
    """Open and check an extra-data file; returns ExtraData with images a (M, C, H, W) view of the map.

    image_shape: (C, H, W) the training images have, or None; num_classes: labels must be < it, or None.
    Raises DatasetNotFoundError for a missing file and DataFormatError naming the key otherwise.
    """
    arrays = _open_arrays(path, what)
    images, labels = arrays["images"], np.asarray(arrays["labels"])
    check_extra_arrays(images, labels, path, what, image_shape, num_classes)
    x = host_tensor(images).permute(0, 3, 1, 2)          # (M, C, H, W) view: no copy, no read
    y = torch.from_numpy(labels.astype(np.int64))
    return ExtraData(x, y, fraction, source=os.path.abspath(path))


def extra_fits_on_device(nbytes, device, share=0.25):
    """True when ``nbytes`` of extra images may live on ``device`` whole.

    CPU: the images already are host memory (a memory map), so "on the device" costs nothing more.
    CUDA: at most ``share`` (a quarter) of the memory free now, leaving the rest to the model, its
    activations under attack and the training set: WRN-34-10 at batch 128 takes ~20 GB of an 80 GB card.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free
