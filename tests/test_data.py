"""Data: digits offline, torchvision errors and layout, synthetic data, seeded resumable batches with
on-device augmentation, RST mixing and the RST .npz loader."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwp_fast.config import RunConfig
from rwp_fast.data import (
    CIFAR_AUGMENTATION,
    DATASET_STATS,
    DIGITS_AUGMENTATION,
    NO_AUGMENTATION,
    Augmentation,
    BatchIterator,
    DataFormatError,
    DatasetNotFoundError,
    ExtraData,
    augment_batch,
    derive_seed,
    epoch_batches,
    eval_batches,
    load_dataset,
    load_digits_uint8,
    load_rst_extra,
    make_synthetic,
    steps_per_epoch,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(RunConfig(dataset="digits"))


def _ids_dataset(n=100, shape=(3, 6, 6), seed=0):
    """Random images and labels = example index, so every batch says exactly which examples it holds."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.arange(n)


def _collect(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


# ------------------------------------------------------------------------------------------- digits
def test_digits_load_offline_with_a_fixed_split(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert (digits.in_channels, digits.image_size) == (1, 8)
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == torch.uint8 and digits.train_y.dtype == torch.int64
    assert int(digits.train_x.min()) == 0 and int(digits.train_x.max()) == 255
    # The first labels of the seeded split (RandomState(0) permutation) — any change to the split shows here.
    assert digits.train_y[:10].tolist() == [2, 8, 2, 6, 6, 7, 1, 9, 8, 5]
    # Train and test together are exactly the 1797 images, each once.
    all_x, all_y = load_digits_uint8()
    assert all_x.shape[0] == 1797
    joined = torch.cat([digits.train_x, digits.test_x]).flatten(1)
    joined_y = torch.cat([digits.train_y, digits.test_y])
    key = lambda x, y: sorted(zip(y.tolist(), map(bytes, x.flatten(1).numpy())))
    assert key(joined, joined_y) == key(all_x, all_y)
    assert torch.bincount(joined_y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # Pixels 0..16 map to round(v · 255 / 16): exactly 17 distinct values.
    assert torch.unique(all_x).tolist() == [round(v * 255 / 16) for v in range(17)]
    assert digits.augment == DIGITS_AUGMENTATION == Augmentation(pad=1, flip=False)


def test_digits_split_does_not_depend_on_the_run_seed(digits):
    other = load_dataset(RunConfig(dataset="digits", seed=123))
    assert torch.equal(other.train_x, digits.train_x) and torch.equal(other.test_y, digits.test_y)


def test_digits_statistics_match_the_data():
    x = load_digits_uint8()[0].double() / 255
    (mean,), (std,) = DATASET_STATS["digits"]
    assert abs(x.mean().item() - mean) < 5e-6 and abs(x.std(unbiased=False).item() - std) < 5e-6


def test_train_examples_keeps_the_first_n(digits):
    small = load_dataset(RunConfig(dataset="digits", train_examples=100))
    assert torch.equal(small.train_x, digits.train_x[:100]) and torch.equal(small.train_y, digits.train_y[:100])
    assert small.test_x.shape[0] == 360


# -------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-batches-py/"),
                                            ("cifar100", "cifar-100-python/"),
                                            ("svhn", "train_32x32.mat")])
def test_missing_dataset_says_where_and_how(tmp_path, name, expected):
    root = tmp_path / "no_such_dir"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(RunConfig(dataset=name, data_dir=str(root)))
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert str(root) in message and expected in message and "--download" in message
    assert "download=True" not in message   # torchvision's Python-API hint would mislead CLI users


def test_torchvision_layout_is_converted(monkeypatch):
    import torchvision

    rng = np.random.RandomState(0)

    class FakeCIFAR10:   # torchvision keeps CIFAR as (N, H, W, C) uint8 plus a list of labels
        def __init__(self, root, train, download):
            n = 5 if train else 3
            self.data = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
            self.targets = list(range(n))

    class FakeSVHN:      # ... and SVHN as (N, C, H, W) uint8 plus a numpy array of labels
        def __init__(self, root, split, download):
            n = 4 if split == "train" else 2
            self.data = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
            self.labels = np.arange(n) % 10

    made = {}
    monkeypatch.setattr(torchvision.datasets, "CIFAR10",
                        lambda *a, **k: made.setdefault(("c", k["train"]), FakeCIFAR10(*a, **k)))
    monkeypatch.setattr(torchvision.datasets, "SVHN",
                        lambda *a, **k: made.setdefault(("s", k["split"]), FakeSVHN(*a, **k)))
    cifar = load_dataset(RunConfig(dataset="cifar10"))
    raw = made[("c", True)].data
    assert cifar.train_x.shape == (5, 3, 32, 32) and cifar.test_x.shape == (3, 3, 32, 32)
    assert cifar.train_x[2, 1, 7, 30].item() == raw[2, 7, 30, 1]
    assert torch.equal(cifar.train_x, torch.from_numpy(raw).permute(0, 3, 1, 2))
    assert cifar.train_y.tolist() == [0, 1, 2, 3, 4] and cifar.train_y.dtype == torch.int64
    assert cifar.augment == CIFAR_AUGMENTATION and cifar.mean == DATASET_STATS["cifar10"][0]
    svhn = load_dataset(RunConfig(dataset="svhn"))
    assert torch.equal(svhn.test_x, torch.from_numpy(made[("s", "test")].data))
    assert svhn.train_y.tolist() == [0, 1, 2, 3] and not svhn.augment


# ---------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_shaped():
    a = make_synthetic(n_train=50, n_test=20, num_classes=4, shape=(1, 8, 8), seed=3)
    b = make_synthetic(n_train=50, n_test=20, num_classes=4, shape=(1, 8, 8), seed=3)
    c = make_synthetic(n_train=50, n_test=20, num_classes=4, shape=(1, 8, 8), seed=4)
    (xa, ya), (ta, _), extra = a
    assert extra is None and xa.shape == (50, 1, 8, 8) and ta.shape == (20, 1, 8, 8)
    assert xa.dtype == torch.uint8 and ya.dtype == torch.int64 and set(ya.tolist()) == {0, 1, 2, 3}
    assert torch.equal(xa, b[0][0]) and torch.equal(ya, b[0][1]) and torch.equal(ta, b[1][0])
    assert not torch.equal(xa, c[0][0])
    assert not torch.equal(xa[:20], ta)   # train and test are different draws


def test_synthetic_bundle_with_rst_extra():
    bundle = load_dataset(RunConfig(dataset="synthetic", method="rst", train_examples=64))
    assert bundle.train_x.shape == (64, 3, 32, 32) and bundle.test_x.shape == (2000, 3, 32, 32)
    assert bundle.extra_x.shape == (64, 3, 32, 32) and bundle.extra_y.shape == (64,)
    assert bundle.extra is not None and bundle.augment == CIFAR_AUGMENTATION
    plain = load_dataset(RunConfig(dataset="synthetic", train_examples=64))
    assert plain.extra is None and torch.equal(plain.train_x, bundle.train_x)


# ------------------------------------------------------------------------------------------ batches
def test_steps_per_epoch():
    assert [steps_per_epoch(10, 3, True), steps_per_epoch(10, 3, False), steps_per_epoch(9, 3, True),
            steps_per_epoch(9, 3, False), steps_per_epoch(2, 3, True)] == [3, 4, 3, 3, 0]


def test_derive_seed_is_stable():
    # Frozen values: a change here silently changes every run's data order.
    assert derive_seed(0, 1, 0) == derive_seed(0, 1, 0) != derive_seed(0, 1, 1)
    assert derive_seed(0) == 0xE220A8397B1DCDAF >> 1


def test_same_seed_and_epoch_give_identical_batches_whatever_the_global_rng():
    x, y = _ids_dataset()
    it = BatchIterator(x, y, 16, seed=7, augment=CIFAR_AUGMENTATION)
    torch.manual_seed(1)
    first = _collect(it.epoch(3))
    torch.manual_seed(2)
    again = _collect(BatchIterator(x, y, 16, seed=7, augment=CIFAR_AUGMENTATION).epoch(3))
    assert len(first) == 6 and _same(first, again)


@pytest.mark.parametrize("drop_last, steps", [(True, 6), (False, 7)])
def test_resume_at_step_k_yields_the_remaining_batches(drop_last, steps):
    x, y = _ids_dataset()
    it = BatchIterator(x, y, 16, seed=7, augment=CIFAR_AUGMENTATION, drop_last=drop_last)
    full = _collect(it.epoch(2))
    assert len(full) == steps and full[-1][1].shape == ((16,) if drop_last else (4,))
    for k in (0, 1, 4, steps - 1, steps):
        assert _same(_collect(it.epoch(2, start_step=k)), full[k:])
    with pytest.raises(ValueError, match=f"start_step: must be in \\[0, {steps}\\], got {steps + 1}"):
        it.epoch(2, start_step=steps + 1)


def test_epochs_and_seeds_differ_and_each_epoch_is_a_permutation():
    x, y = _ids_dataset()
    it = BatchIterator(x, y, 16, seed=7)
    ids = [torch.cat([yb for _, yb in it.epoch(e)]) for e in range(2)]
    other_seed = torch.cat([yb for _, yb in BatchIterator(x, y, 16, seed=8).epoch(0)])
    assert ids[0].shape == (96,) and len(set(ids[0].tolist())) == 96   # drop_last: 6 full batches
    assert not torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], other_seed)
    keep_all = torch.cat([yb for _, yb in BatchIterator(x, y, 16, seed=7, drop_last=False).epoch(0)])
    assert sorted(keep_all.tolist()) == list(range(100))
    assert torch.equal(keep_all[:96], ids[0])   # same permutation; the partial batch is its tail


def test_without_augmentation_a_batch_is_the_raw_images_over_255():
    x, y = _ids_dataset()
    for xb, yb in BatchIterator(x, y, 32, seed=1, augment=NO_AUGMENTATION).epoch(0):
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.equal(xb, x[yb].float() / 255)
    batches = _collect(eval_batches(x, y, 32, "cpu"))
    assert [b[1].shape[0] for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert _same(_collect(epoch_batches(x, y, 32, 0, 1, "cpu", None)),
                 _collect(BatchIterator(x, y, 32, seed=1).epoch(0)))


def _crop_ref(img, oy, ox, pad, flip, mode):
    """Independent reference: F.pad the float image, slice, flip."""
    padded = F.pad(img.float()[None], (pad,) * 4, mode="constant" if mode == "zeros" else "reflect")[0]
    out = padded[:, oy:oy + img.shape[1], ox:ox + img.shape[2]]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_augment_batch_matches_pad_and_slice(mode):
    x, _ = _ids_dataset(n=5, shape=(3, 7, 9))
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [8, 0]])
    flips = torch.tensor([False, True, True, False, False])
    out = augment_batch(x, offsets, flips, 4, mode)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for b in range(5):
        ref = _crop_ref(x[b], *offsets[b].tolist(), 4, bool(flips[b]), mode)
        assert torch.equal(out[b].float(), ref)
    assert torch.equal(out[3], x[3])                        # offset (pad, pad), no flip: the image itself
    assert out[0, :, :4, :].sum() == 0 if mode == "zeros" else out[0, :, :4, :].sum() > 0


def test_iterator_crops_are_shifts_of_the_padded_image():
    """Each augmented example equals exactly one crop of F.pad(image, 4); the shifts vary."""
    x, y = _ids_dataset(n=40, shape=(3, 12, 12))
    xb, yb = next(BatchIterator(x, y, 40, seed=5, augment=Augmentation(pad=4, flip=False)).epoch(0))
    found = []
    for b in range(40):
        img = x[yb[b]]
        matches = [(oy, ox) for oy in range(9) for ox in range(9)
                   if torch.equal(xb[b], _crop_ref(img, oy, ox, 4, False, "zeros") / 255)]
        assert len(matches) == 1
        found.append(matches[0])
    assert len(set(found)) > 10 and {o for f in found for o in f} == set(range(9))


def test_each_step_and_epoch_draws_its_own_crops():
    # Identical images, so batches can only differ through their augmentation parameters.
    x = _ids_dataset(n=1, shape=(3, 8, 8))[0].expand(64, 3, 8, 8).contiguous()
    it = BatchIterator(x, torch.zeros(64, dtype=torch.int64), 16, seed=0, augment=CIFAR_AUGMENTATION)
    batches = [xb for xb, _ in it.epoch(0)]
    assert len(batches) == 4
    assert all(not torch.equal(batches[i], batches[j]) for i in range(4) for j in range(i + 1, 4))
    assert not torch.equal(next(it.epoch(1))[0], batches[0])      # and each epoch its own


def test_flip_happens_for_about_half():
    x, y = _ids_dataset(n=1000, shape=(1, 4, 4))
    xb, yb = next(BatchIterator(x, y, 1000, seed=0, augment=Augmentation(pad=0, flip=True)).epoch(0))
    raw = x[yb].float() / 255
    same = (xb == raw).flatten(1).all(1)
    mirrored = (xb == raw.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())                 # each example is the image or its mirror
    n_flipped = int((mirrored & ~same).sum())
    assert 430 <= n_flipped <= 570                        # Binomial(1000, 1/2): ±4.4σ


@pytest.mark.gpu
def test_batches_on_the_device_match_the_cpu():
    x, y = _ids_dataset()
    cpu = _collect(BatchIterator(x, y, 16, seed=3, augment=CIFAR_AUGMENTATION).epoch(1))
    gpu = [(a.cpu(), b.cpu()) for a, b in BatchIterator(x, y, 16, seed=3, device="cuda",
                                                        augment=CIFAR_AUGMENTATION).epoch(1)]
    assert _same(cpu, gpu)


def test_iterator_argument_errors():
    x, y = _ids_dataset(n=10)
    with pytest.raises(ValueError, match="batch_size: 16 needs at least 16 labeled examples"):
        BatchIterator(x, y, 16)
    with pytest.raises(ValueError, match="x: expected a uint8 tensor"):
        BatchIterator(x.float(), y, 4)
    with pytest.raises(ValueError, match="batch_size: RST batches are half labeled, half extra"):
        BatchIterator(x, y, 5, extra=(x, y))


# ------------------------------------------------------------------------------- channels-last batches
CL = torch.channels_last


def _is_cl(t):
    """NHWC memory and not NCHW: with C = 3 and H = W = 6 the two orders differ."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _nhwc_extra(n, shape=(3, 6, 6), offset=1000, seed=3):
    """Extra images as the loader gives them: an (N, C, H, W) view of NHWC storage (the file's layout)."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    nhwc = torch.randint(0, 256, (n, h, w, c), generator=g, dtype=torch.uint8)
    return nhwc.permute(0, 3, 1, 2), torch.arange(n) + offset


def _iterator_cases():
    ex, ey = _nhwc_extra(33)
    return {  # name: BatchIterator keyword arguments besides channels_last
        "plain": dict(augment=NO_AUGMENTATION),
        "crop-flip": dict(augment=CIFAR_AUGMENTATION),
        "reflect-keep-last": dict(augment=Augmentation(pad=2, flip=True, pad_mode="reflect"), drop_last=False),
        "extra-resident": dict(augment=CIFAR_AUGMENTATION, extra=ExtraData(ex, ey, 0.375), extra_resident=True),
        "extra-streamed": dict(augment=CIFAR_AUGMENTATION, extra=ExtraData(ex, ey, 0.375), extra_resident=False,
                               stream_chunk_steps=3),
        "extra-nchw-resident": dict(extra=(ex.contiguous(), ey), extra_resident=True),   # RST pair, NCHW
        "shard": dict(augment=CIFAR_AUGMENTATION, shard=(1, 2)),
        "shard-extra": dict(augment=CIFAR_AUGMENTATION, extra=ExtraData(ex, ey, 0.25), shard=(1, 2)),
    }


@pytest.mark.parametrize("case", list(_iterator_cases()))
def test_channels_last_batches_equal_the_contiguous_ones(case):
    """channels_last=True: every batch (training rows, extra rows, augmented, sharded, resumed) is
    channels-last and bitwise equal to the channels_last=False batch of the same seed, which stays
    NCHW-contiguous."""
    x, y = _ids_dataset(n=50)
    kw = _iterator_cases()[case]
    plain = BatchIterator(x, y, 8, seed=4, **kw)
    cl = BatchIterator(x, y, 8, seed=4, channels_last=True, **kw)
    for epoch, start in ((0, 0), (1, 3)):
        ref = list(plain.epoch(epoch, start))
        got = list(cl.epoch(epoch, start))
        assert len(got) == len(ref) > 0
        for (xr, yr), (xg, yg) in zip(ref, got):
            assert xr.is_contiguous() and xr.dtype == xg.dtype == torch.float32
            assert _is_cl(xg), xg.stride()
            assert torch.equal(xg, xr) and torch.equal(yg, yr)
    if not {"extra_resident", "shard"} & kw.keys():   # epoch_batches passes channels_last on too
        wrapped = epoch_batches(x, y, 8, 2, 4, "cpu", kw.get("augment"), extra=kw.get("extra"),
                                drop_last=kw.get("drop_last", True), channels_last=True)
        assert _same(_collect(cl.epoch(2)), _collect(wrapped))


def test_channels_last_eval_batches():
    x, y = _ids_dataset(n=50)
    ref, got = _collect(eval_batches(x, y, 16, "cpu")), _collect(eval_batches(x, y, 16, "cpu", channels_last=True))
    assert _same(got, ref) and [b[1].shape[0] for b in got] == [16, 16, 16, 2]
    assert all(_is_cl(xb) for xb, _ in got) and all(xb.is_contiguous() for xb, _ in ref)


def test_augment_batch_keeps_a_channels_last_layout():
    x, _ = _ids_dataset(n=5, shape=(3, 7, 9))
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [8, 0]])
    flips = torch.tensor([False, True, True, False, False])
    for mode in ("zeros", "reflect"):
        ref = augment_batch(x, offsets, flips, 4, mode)
        got = augment_batch(x.contiguous(memory_format=CL), offsets, flips, 4, mode)
        assert _is_cl(got) and ref.is_contiguous() and torch.equal(got, ref)


class _CountCopies(torch.utils._python_dispatch.TorchDispatchMode):
    COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES:
            self.copies.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [True, False])
def test_channels_last_batches_on_the_device_match_the_cpu(resident):
    """On CUDA (pinned, non-blocking streamed chunks; the advanced-index gather of the crops): channels-last
    batches, equal to the CPU's NCHW ones."""
    x, y = _ids_dataset(n=50)
    ex, ey = _nhwc_extra(33)
    kw = dict(augment=CIFAR_AUGMENTATION, extra=ExtraData(ex, ey, 0.375), extra_resident=resident,
              stream_chunk_steps=3)
    cpu = _collect(BatchIterator(x, y, 8, seed=3, **kw).epoch(1))
    gpu = list(BatchIterator(x, y, 8, seed=3, device="cuda", channels_last=True, **kw).epoch(1))
    assert all(_is_cl(xb) and xb.is_cuda for xb, _ in gpu)
    assert _same(cpu, [(a.cpu(), b.cpu()) for a, b in gpu])


@pytest.mark.parametrize("resident", [True, False])
def test_channels_last_extra_data_is_read_in_place(resident):
    """The extra images are NHWC in their file: channels_last keeps the resident set as that storage (no
    conversion) and a step copies nothing but the uint8 → float32 conversion; the NCHW batches copy the
    streamed rows to NCHW every step (a clone)."""
    x, y = _ids_dataset(n=50)
    ex, ey = _nhwc_extra(33)
    kw = dict(augment=CIFAR_AUGMENTATION, extra=ExtraData(ex, ey, 0.375), extra_resident=resident,
              stream_chunk_steps=3)
    cl = BatchIterator(x, y, 8, seed=4, channels_last=True, **kw)
    assert _is_cl(cl.x)
    if resident:
        assert cl.extra_x.data_ptr() == ex.data_ptr() and cl.extra_x.stride() == ex.stride()

    def copies_per_step(it):
        batches = it.epoch(0)
        counts = []
        for _ in range(len(it)):
            with _CountCopies() as mode:
                next(batches)
            counts.append(mode.copies)
        batches.close()
        return counts

    assert copies_per_step(cl) == [[torch.ops.aten._to_copy.default]] * len(cl)
    plain = copies_per_step(BatchIterator(x, y, 8, seed=4, **kw))
    extra_copy = [] if resident else [torch.ops.aten.clone.default]
    assert plain == [extra_copy + [torch.ops.aten._to_copy.default]] * len(cl)


# --------------------------------------------------------------------------------------- RST mixing
def test_rst_batches_are_half_labeled_half_extra():
    x, y = _ids_dataset(n=30, shape=(1, 4, 4))
    extra_x, _ = _ids_dataset(n=10, shape=(1, 4, 4), seed=1)
    extra_y = torch.arange(10) + 100                     # extra ids 100..109, labeled ids 0..29
    it = BatchIterator(x, y, 6, seed=2, extra=(extra_x, extra_y))
    assert len(it) == 10                                 # the labeled set sets the epoch: 30 / 3
    seen_extra = []
    for xb, yb in it.epoch(0):
        assert yb.shape == (6,) and bool((yb[:3] < 30).all()) and bool((yb[3:] >= 100).all())
        assert torch.equal(xb[:3], x[yb[:3]].float() / 255)
        assert torch.equal(xb[3:], extra_x[yb[3:] - 100].float() / 255)
        seen_extra += yb[3:].tolist()
    # 30 extra draws over 10 extra images: three full reshuffles, so each exactly three times.
    assert sorted(seen_extra) == sorted(list(range(100, 110)) * 3)
    assert sorted(t for xb, yb in it.epoch(0) for t in yb[:3].tolist()) == list(range(30))
    again = _collect(BatchIterator(x, y, 6, seed=2, extra=(extra_x, extra_y)).epoch(0))
    assert _same(_collect(it.epoch(0)), again)
    assert _same(_collect(it.epoch(0, start_step=4)), again[4:])


def test_rst_partial_last_batch_stays_half_and_half():
    x, y = _ids_dataset(n=31, shape=(3, 8, 8))
    extra_x, _ = _ids_dataset(n=50, shape=(3, 8, 8), seed=1)
    it = BatchIterator(x, y, 8, seed=0, augment=CIFAR_AUGMENTATION, extra=(extra_x, torch.arange(50) + 100),
                       drop_last=False)
    batches = _collect(it.epoch(1))
    assert [b[1].shape[0] for b in batches] == [8] * 7 + [6]     # 31 = 7·4 + 3 labeled examples
    assert batches[-1][1][:3].max() < 31 and batches[-1][1][3:].min() >= 100
    assert _same(_collect(it.epoch(1, start_step=6)), batches[6:])


# ------------------------------------------------------------------------------------ RST npz loader
def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_rst_extra_round_trip(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (5, 4, 6, 3)).astype(np.uint8)
    path = _write_npz(tmp_path / "extra.npz", images=images, labels=np.array([0, 1, 2, 9, 3]))
    x, y = load_rst_extra(path, image_shape=(3, 4, 6), num_classes=10)
    assert x.shape == (5, 3, 4, 6) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x[3, 2, 1, 5].item() == images[3, 1, 5, 2]
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert y.tolist() == [0, 1, 2, 9, 3]


GOOD_IMAGES = np.zeros((4, 8, 8, 1), np.uint8)
GOOD_LABELS = np.array([0, 1, 2, 3])


@pytest.mark.parametrize("arrays, key, expected", [
    ({"images": GOOD_IMAGES.astype(np.float32), "labels": GOOD_LABELS}, "images", "must be uint8"),
    ({"images": GOOD_IMAGES[..., 0], "labels": GOOD_LABELS}, "images", "must have shape \\(N, H, W, C\\)"),
    ({"images": np.zeros((4, 1, 8, 8), np.uint8), "labels": GOOD_LABELS}, "images", "\\(N, H, W, C\\)"),
    ({"images": GOOD_IMAGES, "labels": GOOD_LABELS[:3]}, "labels", "must have shape \\(4,\\)"),
    ({"images": GOOD_IMAGES, "labels": GOOD_LABELS.astype(np.float64)}, "labels", "must hold integers"),
    ({"images": GOOD_IMAGES, "labels": np.array([0, 1, 2, 10])}, "labels", "must lie in \\[0, 10\\)"),
    ({"images": GOOD_IMAGES, "labels": np.array([0, -1, 2, 3])}, "labels", "must lie in \\[0, 10\\)"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": GOOD_LABELS}, "images", "labeled data"),
    ({"data": GOOD_IMAGES, "labels": GOOD_LABELS}, "images", "lacks the key"),
])
def test_rst_extra_bad_files_name_the_key(tmp_path, arrays, key, expected):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=expected) as info:
        load_rst_extra(path, image_shape=(1, 8, 8), num_classes=10)
    assert f"'{key}'" in str(info.value)


def test_rst_extra_refuses_pickles_and_missing_files(tmp_path):
    path = _write_npz(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object), labels=GOOD_LABELS)
    with pytest.raises(DataFormatError, match="not a readable .npz of plain arrays"):
        load_rst_extra(path)
    with pytest.raises(DatasetNotFoundError, match="rst_extra: no file at"):
        load_rst_extra(str(tmp_path / "missing.npz"))


def test_load_dataset_attaches_the_rst_file(tmp_path):
    images = np.random.RandomState(1).randint(0, 256, (7, 8, 8, 1)).astype(np.uint8)
    path = _write_npz(tmp_path / "extra.npz", images=images, labels=np.arange(7))
    bundle = load_dataset(RunConfig(dataset="digits", method="rst", rst_extra=path))
    assert bundle.extra_x.shape == (7, 1, 8, 8) and bundle.extra_y.tolist() == list(range(7))
    assert load_dataset(RunConfig(dataset="digits", rst_extra=path)).extra is None   # only for method rst
    assert os.path.exists(path)
