"""A user's own images: ``--dataset folder`` (class subfolders) and ``--dataset npz`` (numpy arrays).

folder: torchvision's ``ImageFolder`` layout,

    DIR/train/<class>/<any name>.png|.jpg|...     DIR/test/<class>/...   (or DIR/val/<class>/...)

Classes are the training split's subfolder names in sorted order (label = index); the test split may
lack a class but may not add one. Every image is decoded once with Pillow, converted to RGB (or kept grey
when every image of both splits is grey: 1 channel) and, with ``--image-size S``, resized to S×S
(bilinear, antialiased). Without ``--image-size`` all images must share one square size. The result is
the same (N, C, H, W) uint8 tensor that every other dataset is, and it is cached next to the data in
``DIR/.rwp-fast-cache-<size>.npz``. The cache records a fingerprint of the file list, sizes and
modification times and the options, so adding, removing or touching an image decodes again; it is
written to a temporary file and renamed, so an interrupted write never leaves a half cache.

npz: ``FILE.npz`` (or a ``DIR`` holding ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy``)
with ``x_*`` (N, H, W, C) uint8 (channels last; (N, H, W) is read as grey; uint16 is scaled to uint8) and
``y_*`` (N,) integers.
An optional ``classes`` array of names fixes the number of classes; without it, it is max(y_train) + 1.

Normalisation: ``load_dataset`` measures the per-channel mean and std of the training images.
Augmentation: the CIFAR recipe scaled to the image size: pad ⌊S/8⌋ (4 for 32×32, at least 1) + random
crop + horizontal flip, which assumes that a mirrored image keeps its class, as photographs do (digits
and text do not: for those the built-in ``digits`` dataset shows the alternative, crop only).
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .._fs import atomic_write
from .augment import Augmentation
from .errors import DataFormatError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# Pillow modes that hold one grey channel; everything else (RGB, RGBA, P, CMYK, YCbCr, ...) becomes RGB.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# Grey modes wider than 8 bits, with the value of full white: 16-bit PNGs open as I;16 (or as I, 32-bit, in
# older Pillow), and Pillow's convert("L") clips them at 255 instead of scaling (99% of pixels white).
WIDE_GREY_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535}
CACHE_PREFIX = ".rwp-fast-cache-"
CACHE_VERSION = 2   # bump when the decoding changes, so old caches are not reused (2: 16-bit grey scaled)


@dataclass
class OwnData:
    train: tuple          # (x (N, C, H, W) uint8, y (N,) int64)
    test: tuple
    num_classes: int
    classes: tuple        # class names ('0', '1', ... for npz without 'classes')
    notes: tuple          # one line per thing the user should know (skipped images, cache use)


def own_augmentation(size):
    """Random crop after ⌊size/8⌋ zero padding (4 px at 32×32; at least 1) and a horizontal flip."""
    return Augmentation(pad=max(1, size // 8), flip=True)


def _say(quiet, text):
    if not quiet:
        print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- folder
def _split_dirs(root):
    where = os.path.abspath(root)
    layout = "DIR/train/<class>/<image> and DIR/test/<class>/<image> (or DIR/val/)"
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"dataset 'folder': no directory at --data-dir {where}; expected {layout}")
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise DatasetNotFoundError(f"dataset 'folder': {where} has no train/ subfolder; expected {layout}")
    for name in ("test", "val"):
        if os.path.isdir(os.path.join(root, name)):
            return [("train", train), (name, os.path.join(root, name))]
    raise DatasetNotFoundError(f"dataset 'folder': {where} has no test/ or val/ subfolder; expected {layout}")


def _scan(split, split_dir, classes=None):
    """(classes, [(path, label), ...]) of one split, in sorted order; raises on an empty split or class."""
    names = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
    if not names:
        raise DataFormatError(f"dataset 'folder': the {split} split {os.path.abspath(split_dir)} is empty: it "
                              f"has no class subfolders")
    if classes is None:
        classes = names
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DataFormatError(f"dataset 'folder': the {split} split has class folder(s) {unknown} that the "
                              f"train split lacks; the classes are {classes}")
    files = []
    for name in names:
        class_dir = os.path.join(split_dir, name)
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not found:
            raise DataFormatError(f"dataset 'folder': the class folder {os.path.abspath(class_dir)} has no "
                                  f"images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        files += [(path, classes.index(name)) for path in found]
    return classes, files


def _fingerprint(root, splits, image_size, skip_bad):
    """sha256 of the options and of every image's relative path, size and modification time."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "image_size": image_size,
                                   "skip_bad": bool(skip_bad)}).encode())
    for split, files in splits:
        h.update(split.encode())
        for path, label in files:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(path, image_size):
    """One image as (H, W) grey or (H, W, 3) RGB uint8, resized to image_size² if image_size > 0."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in WIDE_GREY_MODES:   # 0..65535 → 0..255, rounded: a 16-bit image is a valid image
            wide = np.asarray(im, dtype=np.float64)   # decodes: errors surface here
            im = Image.fromarray(np.clip(np.round(wide * (255.0 / WIDE_GREY_MODES[im.mode])), 0, 255)
                                 .astype(np.uint8), mode="L")
        im = im.convert("L" if im.mode in GREY_MODES else "RGB")   # convert() decodes: errors surface here
        if image_size and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_all(split, files, image_size, skip_bad, quiet):
    """Decoded arrays and labels of one split; unreadable files raise, or are skipped and returned."""
    from PIL import Image
    from tqdm import tqdm

    bad_errors = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    arrays, labels, bad = [], [], []
    bar = tqdm(files, desc=f"decoding {split}", unit="img", disable=quiet or not sys.stderr.isatty(),
               leave=False)
    for path, label in bar:
        try:
            arr = _decode(path, image_size)
        except bad_errors as exc:
            if not skip_bad:
                raise DataFormatError(f"dataset 'folder': cannot read the image {os.path.abspath(path)} "
                                      f"({type(exc).__name__}: {exc}); fix or remove it, or pass "
                                      f"--skip-bad-images to skip unreadable files") from None
            bad.append(path)
            continue
        arrays.append(arr)
        labels.append(label)
    return arrays, labels, bad


def _stack(split, arrays, labels, channels, files_for_error):
    """(N, C, H, W) uint8 and (N,) int64 from decoded arrays that must share one size."""
    if not arrays:
        raise DataFormatError(f"dataset 'folder': the {split} split is empty: none of its images could be "
                              f"read")
    first = arrays[0].shape[:2]
    for arr, path in zip(arrays, files_for_error):
        if arr.shape[:2] != first:
            raise DataFormatError(f"dataset 'folder': images differ in size ({first[1]}×{first[0]} and "
                                  f"{arr.shape[1]}×{arr.shape[0]} in {path}); pass --image-size N to resize "
                                  f"all of them to N×N")
    out = np.empty((len(arrays), channels, *first), dtype=np.uint8)
    for i, arr in enumerate(arrays):
        if arr.ndim == 2:
            out[i] = arr[None]        # grey: one channel, repeated into three for an RGB dataset
        else:
            out[i] = arr.transpose(2, 0, 1)
    return torch.from_numpy(out), torch.tensor(labels, dtype=torch.int64)


def _cache_path(root, image_size):
    return os.path.join(root, f"{CACHE_PREFIX}{image_size or 'native'}.npz")


def _read_cache(path, fingerprint):
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) != fingerprint:
                return None
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError, EOFError):   # unreadable cache: decode again and overwrite it
        return None


def _write_atomic_npz(path, **arrays):
    """np.savez to a temporary file in the same directory, fsync, then rename over ``path``."""
    atomic_write(path, lambda f: np.savez(f, **arrays), prefix=CACHE_PREFIX)


def load_folder(root, image_size=0, skip_bad=False, quiet=False):
    """The ImageFolder dataset under ``root`` (see the module docstring), decoded once and cached."""
    (train_name, train_dir), (test_name, test_dir) = _split_dirs(root)
    classes, train_files = _scan(train_name, train_dir)
    _, test_files = _scan(test_name, test_dir, classes)
    splits = [(train_name, train_files), (test_name, test_files)]
    fingerprint = _fingerprint(root, splits, image_size, skip_bad)
    cache = _cache_path(root, image_size)
    cached = _read_cache(cache, fingerprint)
    notes = []
    if cached is not None:
        skipped = int(cached["skipped"])
        notes.append(f"read the decoded images from the cache {cache}")
        if skipped:
            notes.append(f"skipped {skipped} unreadable image(s) when decoding, the first "
                         f"{str(cached['first_bad'])}")
        for note in notes:
            _say(quiet, f"dataset 'folder': {note}")
        train = torch.from_numpy(cached["train_x"]), torch.from_numpy(cached["train_y"])
        test = torch.from_numpy(cached["test_x"]), torch.from_numpy(cached["test_y"])
        return OwnData(train, test, len(classes), tuple(classes), tuple(notes))

    n_files = len(train_files) + len(test_files)
    _say(quiet, f"dataset 'folder': decoding {n_files} images under {os.path.abspath(root)} once; they are "
                f"cached in {cache}")
    start = time.perf_counter()
    decoded, all_bad = [], []
    for split, files in splits:
        arrays, labels, bad = _decode_all(split, files, image_size, skip_bad, quiet)
        all_bad += bad
        bad_set = set(bad)
        decoded.append((split, arrays, labels, [p for p, _ in files if p not in bad_set]))
        present = set(labels)
        for label, name in enumerate(classes):
            if split == train_name and label not in present:
                raise DataFormatError(f"dataset 'folder': the class folder "
                                      f"{os.path.abspath(os.path.join(train_dir, name))} has no readable images")
    channels = 3 if any(a.ndim == 3 for _, arrays, _, _ in decoded for a in arrays) else 1
    (_, a, lab, p), (_, ta, tlab, tp) = decoded
    train = _stack(train_name, a, lab, channels, p)
    test = _stack(test_name, ta, tlab, channels, tp)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataFormatError(f"dataset 'folder': train images are {tuple(train[0].shape[1:])} (C, H, W) but "
                              f"{test_name} images are {tuple(test[0].shape[1:])}; pass --image-size N")
    if all_bad:
        notes.append(f"skipped {len(all_bad)} unreadable image(s), the first {os.path.abspath(all_bad[0])}")
    try:
        _write_atomic_npz(cache, fingerprint=np.array(fingerprint), train_x=train[0].numpy(),
                          train_y=train[1].numpy(), test_x=test[0].numpy(), test_y=test[1].numpy(),
                          classes=np.array(classes), skipped=np.array(len(all_bad)),
                          first_bad=np.array(os.path.abspath(all_bad[0]) if all_bad else ""))
        notes.append(f"decoded {n_files - len(all_bad)} images in {time.perf_counter() - start:.1f} s; "
                     f"cached in {cache}")
    except OSError as exc:   # a read-only data directory: train anyway, decode again next time
        notes.append(f"decoded {n_files - len(all_bad)} images, but could not write the cache {cache} ({exc})")
    for note in notes:
        _say(quiet, f"dataset 'folder': {note}")
    return OwnData(train, test, len(classes), tuple(classes), tuple(notes))


# ---------------------------------------------------------------------------------------------- npz
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_arrays(path):
    where = os.path.abspath(path)
    if os.path.isdir(path):
        files = {k: os.path.join(path, k + ".npy") for k in NPZ_KEYS}
        if all(os.path.isfile(f) for f in files.values()):
            out = {}
            for k, f in files.items():
                try:
                    out[k] = np.load(f, allow_pickle=False)
                except (ValueError, OSError) as exc:
                    raise DataFormatError(f"dataset 'npz': {f} is not a readable .npy of plain numbers "
                                          f"({exc})") from None
            classes = os.path.join(path, "classes.npy")
            if os.path.isfile(classes):
                out["classes"] = np.load(classes, allow_pickle=False)
            return out
        npz = sorted(f for f in os.listdir(path) if f.endswith(".npz") and not f.startswith("."))
        if len(npz) != 1:
            raise DatasetNotFoundError(f"dataset 'npz': --data-dir {where} holds {len(npz)} .npz files and not "
                                       f"all of {', '.join(k + '.npy' for k in NPZ_KEYS)}; pass the .npz file "
                                       f"itself")
        path = os.path.join(path, npz[0])
    elif not os.path.isfile(path):
        raise DatasetNotFoundError(f"dataset 'npz': no file or directory at --data-dir {where}; expected an "
                                   f".npz with {', '.join(NPZ_KEYS)}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise DataFormatError(f"dataset 'npz': {path} is a single .npy array; expected an .npz with "
                                      f"the keys {', '.join(NPZ_KEYS)}")
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataFormatError(f"dataset 'npz': {path} lacks the key(s) {missing}; it has {f.files}")
            return {k: f[k] for k in f.files if k in NPZ_KEYS + ("classes",)}
    except (ValueError, OSError) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"dataset 'npz': {path} is not a readable .npz of plain arrays ({exc})") from None


def _check_split(split, x, y):
    xk, yk = f"x_{split}", f"y_{split}"
    if x.dtype == np.uint16:   # 16-bit images are valid images: 0..65535 scaled to 0..255, as for 16-bit PNGs
        x = np.round(x.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    if x.dtype != np.uint8:
        hint = "; convert with (x * 255).round().astype(np.uint8)" if np.issubdtype(x.dtype, np.floating) else ""
        raise DataFormatError(f"dataset 'npz': key '{xk}' must be uint8 in [0, 255], got {x.dtype}{hint}")
    if x.ndim == 3:
        x = x[..., None]        # (N, H, W): grey
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataFormatError(f"dataset 'npz': key '{xk}' must have shape (N, H, W, C) with C = 1 or 3 "
                              f"(channels last), got {x.shape}")
    if x.shape[0] == 0:
        raise DataFormatError(f"dataset 'npz': the {split} split is empty (key '{xk}' holds no images)")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataFormatError(f"dataset 'npz': key '{yk}' must have shape ({x.shape[0]},) to match '{xk}', "
                              f"got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(f"dataset 'npz': key '{yk}' must hold integers, got {y.dtype}")
    return x, y


def _resize(x, size):
    """(N, C, H, W) uint8 → (N, C, size, size) uint8, bilinear with antialiasing, in chunks."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], 1024):
        part = F.interpolate(x[i:i + 1024].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[i:i + 1024] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_npz(path, image_size=0):
    """The arrays dataset at ``path`` (see the module docstring), checked, as (N, C, H, W) uint8 tensors."""
    arrays = _npz_arrays(path)
    x_train, y_train = _check_split("train", arrays["x_train"], arrays["y_train"])
    x_test, y_test = _check_split("test", arrays["x_test"], arrays["y_test"])
    if x_train.shape[-1] != x_test.shape[-1]:
        raise DataFormatError(f"dataset 'npz': 'x_train' has {x_train.shape[-1]} channel(s) but 'x_test' has "
                              f"{x_test.shape[-1]}")
    if not image_size and x_train.shape[1:] != x_test.shape[1:]:
        raise DataFormatError(f"dataset 'npz': 'x_train' images are {x_train.shape[1:]} (H, W, C) but "
                              f"'x_test' images are {x_test.shape[1:]}; pass --image-size N to resize both")
    if "classes" in arrays:
        classes = tuple(str(c) for c in np.asarray(arrays["classes"]).reshape(-1))
    else:
        classes = tuple(str(i) for i in range(int(y_train.max()) + 1))
    for split, y in (("train", y_train), ("test", y_test)):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= len(classes):
            raise DataFormatError(f"dataset 'npz': key 'y_{split}' must lie in [0, {len(classes)}) "
                                  f"({'the classes array' if 'classes' in arrays else 'max(y_train) + 1'}), "
                                  f"got values in [{low}, {high}]")
    out = []
    for x, y in ((x_train, y_train), (x_test, y_test)):
        xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
        if image_size:
            xt = _resize(xt, image_size)
        out.append((xt, torch.from_numpy(y.astype(np.int64))))
    return OwnData(out[0], out[1], len(classes), classes, ())
