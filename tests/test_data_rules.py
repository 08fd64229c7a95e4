"""Keras data rules that the other data tests leave open: which files count, how the train
batches are ordered, that the config reaches the datamodule, and how the cache is kept honest."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifar_lightning.data.cache as cache
from cifar_lightning.build import build_datamodule
from cifar_lightning.data.cache import load_split
from cifar_lightning.data.folder import KerasImageFolder, decode
from cifar_lightning.data.sampler import DirectoryBatchSampler
from tests.conftest import CLASSES, SPLITS, RunsCode, cfg_for, make_layout, write_images

TRAIN_DIRS = ["train_1", "train_2", "train_3", "train_4"]


def test_keras_extensions_case_insensitive_and_recursive(tmp_path):
    # Keras takes .bmp .gif .jpeg .jpg .png in any case, in sub-folders too; ImageFolder's list
    # differs (no .gif, but .tif/.webp), so a wrong rule silently drops or adds training images.
    cls = tmp_path / "split" / CLASSES[0]
    (cls / "sub" / "deeper").mkdir(parents=True)
    rgb = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    for name, fmt in [
        ("a.BMP", "BMP"),
        ("b.gif", "GIF"),
        ("c.JPEG", "JPEG"),
        ("x.GIF", "GIF"),
        ("y.JPG", "JPEG"),
        ("z.Png", "PNG"),
        ("sub/w.png", "PNG"),
        ("sub/deeper/v.jpg", "JPEG"),
        ("t.tiff", "TIFF"),
        ("u.webp", "WEBP"),
        ("sub/s.ppm", "PPM"),
    ]:
        rgb.save(cls / name, format=fmt)
    (cls / "notes.txt").write_text("not an image")
    ds = KerasImageFolder(tmp_path / "split")
    got = sorted(Path(p).relative_to(cls).as_posix() for p, _ in ds.samples)
    assert got == sorted(
        ["a.BMP", "b.gif", "c.JPEG", "x.GIF", "y.JPG", "z.Png", "sub/w.png", "sub/deeper/v.jpg"]
    )
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))  # each one also decodes


def _directory(i, sizes):
    return int(np.searchsorted(np.cumsum(sizes), i, side="right"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_order_is_shuffled_across_directories(seed):
    # The notebook shuffles the concatenated batches (buffer 1000 > 628): directory 0's batches are
    # not all served first, which would make every epoch drift from one directory to the next.
    sizes = [100] * 4
    dirs = [_directory(b[0], sizes) for b in DirectoryBatchSampler(sizes, 8, seed=seed).batches()]
    assert dirs != sorted(dirs)
    assert len(set(dirs[:13])) > 1  # the first 13 batches (one directory's worth) come from several


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_files_are_shuffled_inside_each_directory(seed):
    # Keras shuffles each directory's file list before batching: a batch is not a run of
    # consecutive (sorted, so same-class) files.
    batches = DirectoryBatchSampler([100] * 4, 8, seed=seed).batches()
    runs = sum(b == list(range(b[0], b[0] + len(b))) for b in batches)
    assert runs < len(batches) // 4
    assert (
        sum(sorted(b) == list(range(min(b), min(b) + len(b))) for b in batches) < len(batches) // 4
    )


def _train_batches(cfg):
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()
    paths = [p for d in TRAIN_DIRS for p in dm.paths[d]]
    dirs = [{Path(paths[i]).parent.parent.name for i in b} for b in loader.batch_sampler]
    sizes = sorted(len(y) for _, y in loader)
    return len(loader), dirs, sizes


def test_configured_batching_reaches_the_train_loader(tiny_layout, tmp_path):
    # 20 images per train directory at batch 8: Keras batches each directory alone,
    # 4 x ceil(20/8) = 12 steps with a 4-image batch per directory and no batch mixing two;
    # fidelity=torch is one random permutation of all 80: ceil(80/8) = 10 steps. Both must come
    # from the composed config.
    n = SPLITS["train_1"] * len(CLASSES)
    assert n % 8 != 0
    steps, dirs, sizes = _train_batches(cfg_for(tmp_path, tiny_layout, "data.batch_size=8"))
    assert steps == 4 * -(-n // 8) == 12
    assert sizes == [4] * 4 + [8] * 8
    assert all(len(d) == 1 for d in dirs)
    steps, dirs, sizes = _train_batches(
        cfg_for(tmp_path, tiny_layout, "data.batch_size=8", "fidelity=torch")
    )
    assert steps == -(-4 * n // 8) == 10 and sizes == [8] * 10
    assert any(len(d) > 1 for d in dirs)
    steps, _, _ = _train_batches(
        cfg_for(
            tmp_path,
            tiny_layout,
            "data.batch_size=8",
            "fidelity=torch",
            "fidelity.batching=per_directory",
        )
    )
    assert steps == 12  # the single key wins over the preset


def _counting_decoder(monkeypatch):
    built = []
    monkeypatch.setattr(
        cache, "read_rgb", lambda p: built.append(p) or decode(p).permute(1, 2, 0).numpy()
    )
    return built


def test_same_bytes_with_new_mtime_rebuild_the_cache(tmp_path, monkeypatch):
    # The fingerprint keys on size and mtime (no hashing of 40,000 files): a file touched or
    # rewritten must be decoded again, even if its size did not change.
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    target = root / "valid" / CLASSES[0] / "0000.png"
    target.write_bytes(target.read_bytes())
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    built = _counting_decoder(monkeypatch)
    load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    assert len(built) == 4
    assert len(list(root.glob(".cache-valid-*.pt"))) == 1


def test_new_size_with_same_mtime_rebuilds_the_cache(tmp_path):
    # A copy keeping timestamps (cp -p, rsync -t, tar) can change a file without changing its mtime.
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    target = root / "valid" / CLASSES[0] / "0000.png"
    st = target.stat()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size != st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    images, _, paths = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    assert paths[0] == str(target)
    assert int(images[0].float().mean()) == 7  # the new pixels, not the cached ones


def test_failed_cache_write_keeps_the_old_cache_and_no_temp_file(tmp_path, monkeypatch):
    # A failure (disk full) while saving must leave the previous cache readable, not a torn file;
    # the run goes on with the images it decoded. Switching the resize rule with a resized image
    # rebuilds the cache under the same file name.
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    write_images(root / "valid" / CLASSES[0], 1, 0, size=48)
    images, _, _ = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    (old,) = root.glob(".cache-valid-*.pt")
    before = old.read_bytes()

    def torn_save(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(before[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.warns(
        UserWarning,
        match=rf"{old.name}: cache not saved \(No space left on device\); the next run "
        "decodes valid again",
    ):
        resized, _, _ = load_split(KerasImageFolder(root / "valid"), 32, "pil_bilinear")
    monkeypatch.undo()
    # no temp file left
    assert sorted(p.name for p in root.iterdir()) == sorted([old.name, "valid"])
    assert old.read_bytes() == before
    assert torch.equal(torch.load(old, weights_only=True)["images"], images)
    assert torch.equal(resized, load_split(KerasImageFolder(root / "valid"), 32, "pil_bilinear")[0])
    assert not torch.equal(resized, images)  # the 48-pixel image, resized by the other rule


def test_read_only_data_folder_trains_from_the_decoded_images(tmp_path, monkeypatch):
    # A shared, read-only dataset: no cache can be written beside it, so each run decodes, and says
    # so.
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    expected = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    for f in root.glob(".cache-*"):
        f.unlink()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.tempfile, "mkstemp", read_only)
    with pytest.warns(
        UserWarning,
        match=r"cache not saved \(Permission denied\).*make .* writable, or set "
        r"data.cache=false",
    ):
        got = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    assert (
        torch.equal(got[0], expected[0])
        and torch.equal(got[1], expected[1])
        and got[2] == expected[2]
    )
    assert not list(root.glob(".cache-*"))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_cache_file_permissions_follow_the_umask(tmp_path, umask, mode):
    # Atomic writes go through mkstemp, which makes 0600 files: others sharing the dataset could
    # not read the cache.
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    was = os.umask(umask)
    try:
        load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    finally:
        os.umask(was)
    (path,) = root.glob(".cache-valid-*.pt")
    assert path.stat().st_mode & 0o777 == mode


def test_cache_file_that_would_run_code_is_rebuilt_not_run(tmp_path, monkeypatch):
    # The cache sits beside the data, which may come from elsewhere: it is loaded with
    # weights_only=True, so a planted pickle is an unreadable cache (rebuilt), never code that runs.
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    images, _, _ = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    (path,) = root.glob(".cache-valid-*.pt")
    torch.save({"fingerprint": RunsCode()}, path)
    again, _, _ = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    assert not marker.exists()
    assert torch.equal(again, images)
    assert torch.equal(torch.load(path, weights_only=True)["images"], images)  # rebuilt in place
