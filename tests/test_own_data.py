"""Own data (--dataset folder / npz) and extra data (--extra-data / --extra-fraction)."""

import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from rwp_fast.cli import main
from rwp_fast.config import ConfigError, RunConfig
from rwp_fast.data import BatchIterator, DataFormatError, ExtraData, channel_stats, load_dataset, load_extra
from rwp_fast.data.own import CACHE_PREFIX

Image = pytest.importorskip("PIL.Image")


# ------------------------------------------------------------------------------------------- folder
def _image(path, size, color, mode="RGB"):
    arr = np.random.RandomState(zlib.crc32(path.encode())).randint(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    arr[..., 0] = color                      # channel 0 carries the class, so the net can learn it
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    img.save(path)


def make_folder(root, corrupt=True):
    """train/ and test/ of 3 classes: PNG and JPEG, several sizes, one grey image, one corrupt file."""
    sizes = [(12, 12), (16, 10), (9, 14)]
    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(("cat", "dog", "emu")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                _image(str(d / f"{i}.{ext}"), sizes[i % 3], 40 + 90 * c)
    _image(str(root / "train" / "dog" / "grey.png"), (11, 11), 130, mode="L")
    if corrupt:
        (root / "train" / "emu" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def _folder_cfg(root, **kw):
    return RunConfig(dataset="folder", data_dir=str(root), image_size=8, quiet=True, **kw)


def test_folder_names_the_corrupt_file_and_skips_it_only_when_asked(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DataFormatError, match=r"cannot read the image .*broken\.jpg.*--skip-bad-images"):
        load_dataset(_folder_cfg(root))
    data = load_dataset(_folder_cfg(root, skip_bad_images=True))
    assert data.train_x.shape == (19, 3, 8, 8) and data.test_x.shape == (9, 3, 8, 8)   # 3·6 + grey
    assert data.train_x.dtype == torch.uint8 and data.classes == ("cat", "dog", "emu")
    assert sorted(data.train_y.tolist()) == [0] * 6 + [1] * 7 + [2] * 6
    assert any("skipped 1 unreadable image(s), the first" in n and "broken.jpg" in n for n in data.notes)
    # The grey image became three equal channels.
    assert data.num_classes == 3 and data.in_channels == 3
    mean, std = channel_stats(data.train_x)
    assert data.mean == mean and data.std == std
    assert abs(mean[0] - data.train_x[:, 0].float().mean().item() / 255) < 1e-5


def test_folder_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", corrupt=False)
    first = load_dataset(_folder_cfg(root))
    caches = [f for f in os.listdir(root) if f.startswith(CACHE_PREFIX)]
    assert caches == [f"{CACHE_PREFIX}8.npz"]                  # no temporary file left behind
    from rwp_fast.data import own
    calls = []
    real = own._decode
    monkeypatch.setattr(own, "_decode", lambda *a: calls.append(a) or real(*a))
    again = load_dataset(_folder_cfg(root))
    assert calls == [] and torch.equal(first.train_x, again.train_x)
    assert any("from the cache" in n for n in again.notes)
    _image(str(root / "train" / "cat" / "new.png"), (8, 8), 40)   # a new file: decode again
    third = load_dataset(_folder_cfg(root))
    assert len(calls) == 18 + 1 + 9 + 1 and third.train_x.shape[0] == first.train_x.shape[0] + 1


def test_folder_cache_write_is_atomic(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", corrupt=False)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(_folder_cfg(root))
    assert [f for f in os.listdir(root) if f.startswith(CACHE_PREFIX)] == []   # nothing half-written


@pytest.mark.parametrize("breakage, expected", [
    (lambda r: [p.unlink() for p in (r / "train" / "emu").iterdir()], "class folder .*emu has no images"),
    (lambda r: [p.unlink() for p in (r / "test").glob("*/*")] and None, "class folder .*test.* has no images"),
    (lambda r: (r / "test" / "yak").mkdir() or _image(str(r / "test" / "yak" / "a.png"), (8, 8), 1),
     r"class folder\(s\) \['yak'\] that the train split lacks"),
    (lambda r: os.rename(r / "test", r / "elsewhere"), "has no test/ or val/ subfolder"),
])
def test_folder_errors_are_one_line(tmp_path, breakage, expected):
    root = make_folder(tmp_path / "imgs", corrupt=False)
    breakage(root)
    with pytest.raises((DataFormatError, FileNotFoundError, RuntimeError), match=expected) as info:
        load_dataset(_folder_cfg(root))
    assert "\n" not in str(info.value)


def test_folder_without_image_size_needs_one_size(tmp_path):
    root = make_folder(tmp_path / "imgs", corrupt=False)
    with pytest.raises(DataFormatError, match="images differ in size .*--image-size"):
        load_dataset(RunConfig(dataset="folder", data_dir=str(root), quiet=True))


def test_grey_folder_has_one_channel_and_val_split(tmp_path):
    root = tmp_path / "grey"
    for split in ("train", "val"):
        for c in range(2):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(3):
                _image(str(root / split / str(c) / f"{i}.png"), (6, 6), 100 * c, mode="L")
    data = load_dataset(RunConfig(dataset="folder", data_dir=str(root), quiet=True))
    assert data.train_x.shape == (6, 1, 6, 6) and data.test_x.shape == (6, 1, 6, 6)
    assert len(data.mean) == 1


def test_16_bit_grey_pngs_are_scaled_not_saturated(tmp_path):
    """A 16-bit PNG is a valid image: 0..65535 maps to 0..255 (v · 255 / 65535, rounded). Pillow's own
    convert("L") clips at 255, which turned 99% of a 16-bit image's pixels white."""
    root = tmp_path / "wide"
    values = {}
    for split in ("train", "test"):
        for c in range(2):
            (root / split / str(c)).mkdir(parents=True)
            arr = (np.arange(16, dtype=np.uint32).reshape(4, 4) * 4000 + 1000 * c).astype(np.uint16)
            Image.fromarray(arr).save(root / split / str(c) / "0.png")   # Pillow writes 16-bit grey
            values[(split, c)] = np.round(arr.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert Image.open(root / "train" / "0" / "0.png").mode.startswith("I")
    data = load_dataset(RunConfig(dataset="folder", data_dir=str(root), quiet=True))
    assert data.train_x.shape == (2, 1, 4, 4)
    for c in range(2):
        assert np.array_equal(data.train_x[data.train_y == c][0, 0].numpy(), values[("train", c)])
    assert int(data.train_x.max()) < 255   # the brightest value, 61000 + 1000, is 237, not a clipped 255


# ---------------------------------------------------------------------------------------------- npz
def make_npz(path, n_train=64, n_test=16, hw=8, c=3, classes=4, **override):
    rng = np.random.RandomState(0)
    y_train, y_test = rng.randint(0, classes, n_train), rng.randint(0, classes, n_test)
    arrays = dict(x_train=rng.randint(0, 256, (n_train, hw, hw, c)).astype(np.uint8), y_train=y_train,
                  x_test=rng.randint(0, 256, (n_test, hw, hw, c)).astype(np.uint8), y_test=y_test)
    arrays["x_train"][..., 0] = (y_train * 60)[:, None, None]
    arrays["x_test"][..., 0] = (y_test * 60)[:, None, None]
    arrays.update(override)
    np.savez(path, **arrays)
    return str(path)


def test_npz_16_bit_arrays_are_scaled_to_8_bits(tmp_path):
    wide = (np.arange(4 * 8 * 8 * 3, dtype=np.uint32).reshape(4, 8, 8, 3) * 97 % 65536).astype(np.uint16)
    path = make_npz(tmp_path / "d.npz", n_train=4, x_train=wide)
    data = load_dataset(RunConfig(dataset="npz", data_dir=path))
    want = np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8).transpose(0, 3, 1, 2)
    assert np.array_equal(data.train_x.numpy(), want)


def test_npz_loads_channels_last_and_measures_its_statistics(tmp_path):
    path = make_npz(tmp_path / "d.npz")
    data = load_dataset(RunConfig(dataset="npz", data_dir=path))
    raw = np.load(path)
    assert data.train_x.shape == (64, 3, 8, 8)
    assert torch.equal(data.train_x[5, 2], torch.from_numpy(raw["x_train"][5, :, :, 2]))
    assert data.num_classes == 4 and data.test_y.tolist() == raw["y_test"].tolist()
    expect = (raw["x_train"] / 255.0).reshape(-1, 3)
    assert np.allclose(data.mean, expect.mean(0), atol=1e-5) and np.allclose(data.std, expect.std(0), atol=1e-5)
    resized = load_dataset(RunConfig(dataset="npz", data_dir=path, image_size=4))
    assert resized.train_x.shape == (64, 3, 4, 4) and resized.train_x.dtype == torch.uint8


@pytest.mark.parametrize("override, expected", [
    (dict(x_train=np.zeros((4, 8, 8, 3), np.float32)), "'x_train' must be uint8.*astype"),
    (dict(x_test=np.zeros((4, 6, 6, 3), np.uint8), y_test=np.zeros(4, int)), "'x_test' images are .*--image-size"),
    (dict(x_test=np.zeros((4, 8, 8, 1), np.uint8), y_test=np.zeros(4, int)), "3 channel.*'x_test' has 1"),
    (dict(y_train=np.zeros(63, int)), r"'y_train' must have shape \(64,\)"),
    (dict(y_test=np.full(16, 7)), r"'y_test' must lie in \[0, 4\)"),
    (dict(y_train=np.full(64, -1)), r"'y_train' must lie in"),
    (dict(x_test=np.zeros((0, 8, 8, 3), np.uint8), y_test=np.zeros(0, int)), "test split is empty"),
    (dict(y_train=np.zeros(64, np.float32)), "must hold integers"),
])
def test_npz_errors_name_the_key(tmp_path, override, expected):
    path = make_npz(tmp_path / "d.npz", **override)
    with pytest.raises(DataFormatError, match=expected) as info:
        load_dataset(RunConfig(dataset="npz", data_dir=path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source", ["folder", "npz"])
def test_own_data_trains_a_step_and_evaluates(tmp_path, source):
    if source == "folder":
        data_dir = str(make_folder(tmp_path / "imgs"))
        extra = ["--image-size", "8", "--skip-bad-images"]
    else:
        data_dir = make_npz(tmp_path / "d.npz")
        extra = []
    run = tmp_path / "run"
    assert main(["train", "--dataset", source, "--data-dir", data_dir, *extra, "--epochs", "1",
                 "--batch-size", "8", "--attack-steps", "1", "--eval-attack-steps", "2", "--device", "cpu",
                 "--backend", "torch", "--quiet", "--out-dir", str(run)]) == 0
    assert main(["eval", str(run / "best.pt"), "--attacks", "natural,pgd20", "--device", "cpu"]) == 0
    assert (run / "best_eval.json").exists()


# ------------------------------------------------------------------------------------------ extra data
def _ids(n, shape=(1, 4, 4), offset=0):
    """Images whose every pixel is the example id (mod 256), labels = id + offset."""
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, *shape).contiguous()
    return x, torch.arange(n) + offset


def _collect(it):
    return [(x.clone(), y.clone()) for x, y in it]


@pytest.mark.parametrize("fraction, batch, n_extra", [(0.3, 10, 3), (0.25, 6, 2), (0.7, 9, 6)])
def test_extra_batches_hold_round_fb_extra_examples(fraction, batch, n_extra):
    x, y = _ids(40)
    ex, ey = _ids(25, offset=1000)
    it = BatchIterator(x, y, batch, seed=1, extra=ExtraData(ex, ey, fraction))
    n_lab = batch - n_extra
    assert len(it) == 40 // n_lab                         # the training set alone sets the epoch
    for xb, yb in it.epoch(0):
        assert yb.shape == (batch,)
        assert bool((yb[:n_lab] < 1000).all()) and bool((yb[n_lab:] >= 1000).all())
        assert torch.equal(xb[n_lab:, 0, 0, 0] * 255, (yb[n_lab:] - 1000).float())   # images follow labels


@pytest.mark.parametrize("resident", [True, False])
def test_extra_is_reproducible_resumable_and_streaming_changes_nothing(resident):
    x, y = _ids(50, (3, 6, 6))
    ex, ey = _ids(33, (3, 6, 6), offset=500)
    mk = lambda: BatchIterator(x, y, 8, seed=4, extra=ExtraData(ex, ey, 0.375), extra_resident=resident,
                               stream_chunk_steps=3)
    ref = _collect(BatchIterator(x, y, 8, seed=4, extra=ExtraData(ex, ey, 0.375), extra_resident=True).epoch(2))
    a = _collect(mk().epoch(2))
    assert len(a) == 10 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, ref))
    tail = _collect(mk().epoch(2, start_step=4))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(tail, ref[4:]))
    other = _collect(mk().epoch(3))
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(other, ref))
    # Leaving an epoch early stops the streaming thread.
    gen = mk().epoch(0)
    next(gen)
    gen.close()


def _write_extra(path, n=20, hw=8, c=3, classes=4, **override):
    arrays = dict(images=(np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, hw, hw, c), np.uint8)),
                  labels=np.arange(n) % classes)
    arrays.update(override)
    np.savez(path, **arrays)
    return str(path)


def test_extra_file_is_memory_mapped_and_checked(tmp_path):
    path = _write_extra(tmp_path / "extra.npz")
    extra = load_extra(path, 0.5, image_shape=(3, 8, 8), num_classes=4)
    assert isinstance(extra.images.untyped_storage().nbytes(), int)
    base = extra.images.permute(0, 2, 3, 1).numpy()
    assert isinstance(base.base, np.memmap) or isinstance(base, np.memmap) or not base.flags.owndata
    assert torch.equal(extra.images[7], torch.full((3, 8, 8), 7, dtype=torch.uint8))
    with pytest.raises(DataFormatError, match="extra_data: key 'images' holds 8×8×1"):
        load_extra(_write_extra(tmp_path / "grey.npz", c=1), 0.5, image_shape=(3, 8, 8))
    with pytest.raises(DataFormatError, match="extra_data: key 'labels' must have shape"):
        load_extra(_write_extra(tmp_path / "short.npz", labels=np.arange(3)), 0.5)
    with pytest.raises(DataFormatError, match=r"extra_data: key 'labels' must lie in \[0, 4\)"):
        load_extra(_write_extra(tmp_path / "many.npz", labels=np.arange(20)), 0.5, num_classes=4)


def test_extra_config_errors():
    with pytest.raises(ConfigError, match="extra_fraction: --extra-data needs --extra-fraction"):
        RunConfig(extra_data="x.npz").validate()
    with pytest.raises(ConfigError, match="extra_fraction: needs --extra-data"):
        RunConfig(extra_fraction=0.3).validate()
    with pytest.raises(ConfigError, match=r"extra_fraction: must be in \[0, 1\)"):
        RunConfig(extra_data="x.npz", extra_fraction=1.0).validate()
    assert RunConfig(method="rst", rst_extra="x.npz").validate().extra_mix == 0.5


def test_extra_cli_wrong_shape_is_one_line_error(tmp_path, capsys):
    path = _write_extra(tmp_path / "extra.npz", hw=5, c=1)
    code = main(["train", "--dataset", "digits", "--extra-data", path, "--extra-fraction", "0.25", "--epochs",
                 "1", "--quiet", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "extra_data: key 'images' holds 5×5×1 (H×W×C) images" in err and err.count("\n") == 1


_KILL_SCRIPT = """
import sys, torch
from rwp_fast.config import RunConfig
from rwp_fast.train import Trainer
cfg = RunConfig(dataset="npz", data_dir=sys.argv[1], extra_data=sys.argv[2], extra_fraction=0.25, epochs=3,
                batch_size=8, attack_steps=1, eval_attack_steps=1, eval_examples=8, device="cpu",
                backend="torch", quiet=True, out_dir=sys.argv[3], lr=0.01)
t = Trainer.resume(sys.argv[3]) if sys.argv[4] == "resume" else Trainer(cfg)
t.fit()
"""


def test_extra_run_resumes_after_a_kill(tmp_path):
    data = make_npz(tmp_path / "d.npz", n_train=64, n_test=8)
    extra = _write_extra(tmp_path / "extra.npz", n=30, classes=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = lambda out, mode: [sys.executable, "-c", _KILL_SCRIPT, data, extra, str(out), mode]
    subprocess.run(run(tmp_path / "full", "new"), check=True, env=env, timeout=600)
    proc = subprocess.Popen(run(tmp_path / "killed", "new"), env=env)
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "last.pt").exists() and time.time() < deadline:   # epoch 1 saved
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] < 3   # killed mid-run
    subprocess.run(run(tmp_path / "killed", "resume"), check=True, env=env, timeout=600)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
