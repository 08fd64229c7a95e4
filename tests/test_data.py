"""The data package (data/): per-directory batching and each DDP rank's share of a batch, the
decoded-image cache (cached and per-file paths agree; invalidation; concurrent writers; a torn
file), class folders, decoding and resizing, bad files, and the evaluation batch size."""

import logging
import multiprocessing as mp
import os
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_lightning.data.cache import load_split
from cifar_lightning.data.datamodule import CifarDataModule
from cifar_lightning.data.folder import KerasImageFolder, check_same_classes, decode
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.errors import UserError
from tests.conftest import CLASSES, cfg_for, make_layout, write_images


def test_per_directory_batching_gives_628_steps():
    s = DirectoryBatchSampler([10_000] * 4, 64, "per_directory", seed=1)
    batches = s.batches()
    assert len(batches) == len(s) == 628
    assert sorted(i for b in batches for i in b) == list(range(40_000))
    assert all(len({i // 10_000 for i in b}) == 1 for b in batches)  # no batch mixes directories
    # each directory's last batch kept
    assert sorted(len(b) for b in batches)[:4] == [16, 16, 16, 16]
    assert len(DirectoryBatchSampler([10_000] * 4, 64, "random").batches()) == 625


def test_batches_are_seeded_and_reshuffled_each_epoch():
    a, b = DirectoryBatchSampler([100, 50], 8, seed=3), DirectoryBatchSampler([100, 50], 8, seed=3)
    assert a.batches() == b.batches()
    a.set_epoch(1)
    assert a.batches() != b.batches()
    assert DirectoryBatchSampler([100, 50], 8, seed=4).batches() != b.batches()


def test_ranks_split_every_batch():
    full = DirectoryBatchSampler([100, 50], 8, seed=0).batches()
    parts = [
        DirectoryBatchSampler([100, 50], 8, seed=0, rank=r, world_size=2).batches() for r in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1]) == len(full)
    assert [a + b for a, b in zip(*parts)] == full


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    def mirrored(epoch):
        s = DirectoryBatchSampler([100, 50], 8, seed=3, mirror=True)
        s.set_epoch(epoch)
        pairs = [p for b in s.batches() for p in b]
        plain = DirectoryBatchSampler([100, 50], 8, seed=3)
        plain.set_epoch(epoch)
        assert [i for i, _ in pairs] == [i for b in plain.batches() for i in b]  # same order
        return torch.tensor([m for _, m in sorted(pairs)])

    first, second, third = mirrored(0), mirrored(1), mirrored(2)
    assert 50 < int(first.sum()) < 100  # about half, at random
    assert torch.equal(second, ~first) and torch.equal(third, first)
    other_seed = DirectoryBatchSampler([100, 50], 8, seed=4, mirror=True).mirrored(150)
    assert not torch.equal(other_seed, first)


@pytest.mark.parametrize("cache", [True, False])
def test_alternating_flip_serves_the_samplers_mirrored_images(tiny_layout, cache):
    plain = _datamodule(tiny_layout, batch_size=4, cache=cache)
    flipping = _datamodule(tiny_layout, batch_size=4, cache=cache, alternating_flip=True)
    seen = {0: [], 1: []}
    for epoch in (0, 1):
        a, b = plain.train_dataloader(), flipping.train_dataloader()
        a.batch_sampler.set_epoch(epoch)
        b.batch_sampler.set_epoch(epoch)
        for (xa, ya), (xb, yb), pairs in zip(a, b, b.batch_sampler.batches()):
            assert torch.equal(ya, yb)
            for img_a, img_b, (_, m) in zip(xa, xb, pairs):
                assert torch.equal(img_b, img_a.flip(-1) if m else img_a)
                seen[epoch].append(m)
    assert sorted(seen[0]) != [seen[0][0]] * len(seen[0])  # some mirrored, some not
    # each image the other way in epoch 1: as many mirrored as were not
    assert sum(seen[1]) == len(seen[0]) - sum(seen[0])


def _datamodule(root, **kw):
    dm = CifarDataModule(str(root), source="unused", **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_cached_and_per_file_paths_give_identical_batches(tiny_layout):
    cached, per_file = (
        _datamodule(tiny_layout, batch_size=4, cache=True),
        _datamodule(tiny_layout, batch_size=4, cache=False),
    )
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        a, b = list(getattr(cached, loader)()), list(getattr(per_file, loader)())
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.dtype == xb.dtype == torch.uint8
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert cached.classes == CLASSES


def test_whitening_sample_spans_every_class_of_the_train_directories(tiny_layout):
    # 4 directories x 10 classes x 2 images, each sorted by class: the first 16 images would be
    # classes 0-7 of train_1 only
    cached, per_file = (_datamodule(tiny_layout, cache=c) for c in (True, False))
    images, labels = cached._data["train"][0].images, cached._data["train"][0].labels
    assert len(labels) == 80 and labels[:16].unique().tolist() == list(range(8))
    sample = cached.first_train_images(16)
    index = torch.linspace(0, 79, 16, dtype=torch.float64).long()
    assert sample.dtype == torch.uint8 and torch.equal(sample, images[index])
    assert labels[index].unique().tolist() == list(range(10))  # every class
    assert torch.equal(per_file.first_train_images(16), sample)
    assert torch.equal(cached.first_train_images(1000), images)  # at most the whole set
    rng = torch.random.get_rng_state()
    cached.first_train_images(16)
    assert torch.equal(torch.random.get_rng_state(), rng)  # no random numbers drawn


def test_per_file_batches_are_pinned_only_when_training_on_a_gpu(tiny_layout):
    from types import SimpleNamespace

    dm = _datamodule(tiny_layout, cache=False)
    assert not dm.train_dataloader().pin_memory
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), global_rank=0, world_size=1
    )
    assert all(getattr(dm, f"{role}_dataloader")().pin_memory for role in ("train", "val", "test"))


def test_changed_folder_invalidates_cache(tmp_path):
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 3})
    ds = KerasImageFolder(root / "valid")
    images, _, _ = load_split(ds, 32, "tf_bilinear")
    t0 = time.perf_counter()
    again, _, _ = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    assert torch.equal(images, again) and time.perf_counter() - t0 < 1.0
    target = root / "valid" / CLASSES[0] / "0000.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a changed mtime alone must rebuild too
    changed, _, _ = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    assert not torch.equal(images, changed) and int(changed[0].float().mean()) == 7
    assert len(list(root.glob(".cache-valid-*.pt"))) == 1  # the stale cache file is removed


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "text"])
def test_a_broken_cache_file_is_named_in_one_warning_and_rebuilt(tmp_path, caplog, damage):
    # a disk that filled up or a copy cut short: the cache is only decoded images, so it is rebuilt
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2}) / "valid"
    images, labels, paths = load_split(KerasImageFolder(root), 32, "tf_bilinear")
    (cache,) = root.parent.glob(".cache-valid-*.pt")
    whole = cache.read_bytes()
    broken = {
        "truncated": whole[: len(whole) // 2],
        "random bytes": np.random.default_rng(0).bytes(len(whole)),
        "text": b"images, labels and pa",
    }[damage]
    cache.write_bytes(broken)
    again = load_split(KerasImageFolder(root), 32, "tf_bilinear")
    assert torch.equal(again[0], images) and torch.equal(again[1], labels) and again[2] == paths
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert re.fullmatch(
        rf"{re.escape(str(cache))}: unreadable image cache \(\w+\); decoding valid again to "
        "rebuild it",
        warning.getMessage(),
    )
    assert cache.read_bytes() != broken and not list(root.parent.glob("*.tmp"))
    caplog.clear()
    load_split(KerasImageFolder(root), 32, "tf_bilinear")  # the rebuilt cache is read, silently
    assert not caplog.records


def test_resize_rule_rebuilds_the_cache_only_when_an_image_was_resized(tmp_path, monkeypatch):
    import cifar_lightning.data.cache as cache

    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")
    built = []
    monkeypatch.setattr(
        cache, "read_rgb", lambda p: built.append(p) or decode(p).permute(1, 2, 0).numpy()
    )
    # all 32x32: same pixels, no rebuild
    load_split(KerasImageFolder(root / "valid"), 32, "pil_bilinear")
    assert built == []
    monkeypatch.undo()
    write_images(root / "valid" / CLASSES[0], 1, 0, size=48)  # one image that must be resized
    tf = load_split(KerasImageFolder(root / "valid"), 32, "tf_bilinear")[0]
    pil = load_split(KerasImageFolder(root / "valid"), 32, "pil_bilinear")[0]
    # only the resized image differs
    assert not torch.equal(tf[0], pil[0]) and torch.equal(tf[1:], pil[1:])
    assert len(list(root.glob(".cache-valid-*.pt"))) == 1


def test_class_mismatch_between_splits_names_classes_and_splits(tmp_path):
    root = make_layout(
        tmp_path / "d", classes=CLASSES[:3], splits={"train_1": 1, "valid": 1, "test": 1}
    )
    write_images(root / "train_1" / "099_extra", 1, 0)
    dm = CifarDataModule(str(root), train_dirs=["train_1"])
    with pytest.raises(UserError, match=r"\['099_extra'\] only in train_1"):
        dm.setup()


def test_class_check_names_the_classes_or_the_order_that_differ():
    assert check_same_classes({"a": ["x", "y"], "b": ["x", "y"]}) == ["x", "y"]
    with pytest.raises(UserError, match=r"splits a and c: \['y'\] only in a; \['z'\] only in c$"):
        check_same_classes({"a": ["x", "y"], "b": ["x", "y"], "c": ["x", "z"]})
    with pytest.raises(UserError, match=r"order \['x', 'y'\] vs \['y', 'x'\]$"):
        check_same_classes({"a": ["x", "y"], "b": ["y", "x"]})


def test_class_names_are_the_first_train_directory_s_folders_before_setup(tmp_path, monkeypatch):
    # What train sizes the model by, read before setup() decodes anything, by the rule setup uses.
    root = make_layout(
        tmp_path / "d", classes=CLASSES[:3], splits={"train_1": 1, "valid": 1, "test": 1}
    )
    make_layout(root, classes=CLASSES[1:3], splits={"train_2": 1})
    write_images(root / "train_1" / ".ipynb_checkpoints", 1, 0)  # hidden: not a class
    (root / "train_1" / "notes.txt").write_text("not a class")
    dm = CifarDataModule(str(root), source="unused", train_dirs=["train_1", "train_2"])
    dm.prepare_data()
    monkeypatch.setattr(KerasImageFolder, "__init__", lambda *a, **k: pytest.fail("decoded"))
    assert dm.class_names() == CLASSES[:3]
    assert (
        CifarDataModule(str(root), train_dirs=["train_2", "train_1"]).class_names()
        == (CLASSES[1:3])
    )
    monkeypatch.undo()
    dm = CifarDataModule(str(root), train_dirs=["train_1"])
    dm.setup()
    assert dm.classes == dm.class_names()
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no class folders"):
        CifarDataModule(str(root), train_dirs=["empty"]).class_names()


def test_hidden_folders_and_stray_files_are_ignored(tmp_path):
    root = make_layout(tmp_path / "d", classes=CLASSES[:2], splits={"valid": 2})
    write_images(root / "valid" / ".ipynb_checkpoints", 1, 0)
    (root / "valid" / ".DS_Store").write_bytes(b"\0\0")
    (root / "valid" / CLASSES[0] / ".DS_Store").write_bytes(b"\0\0")
    (root / "valid" / CLASSES[0] / "notes.txt").write_text("hi")
    ds = KerasImageFolder(root / "valid")
    assert ds.classes == CLASSES[:2] and len(ds) == 4


def test_empty_class_folder_and_no_class_folders_are_errors(tmp_path):
    (tmp_path / "split" / "000_airplane").mkdir(parents=True)
    with pytest.raises(UserError, match=r"000_airplane: class folder has no images"):
        KerasImageFolder(tmp_path / "split")
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match=r"none: no class folders"):
        KerasImageFolder(tmp_path / "none")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_any_mode_and_size_decodes_to_rgb_32(mode, tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).convert(
        mode if mode != "I;16" else "L"
    )
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img).astype(np.uint16) * 257))  # 16-bit grey, full range
    ext = ".jpg" if mode == "CMYK" else ".png"
    img.save(tmp_path / f"x{ext}")
    x = decode(tmp_path / f"x{ext}")
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    if mode == "I;16":  # scaled to 8 bits, not saturated at 255
        assert x.float().mean() < 200 and x.max() > 100


def test_resize_is_bilinear_without_antialiasing(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "big.png")
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(a).permute(2, 0, 1)[None].float(),
        size=(32, 32),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )[0]
    assert torch.equal(decode(tmp_path / "big.png"), ref.round().clamp(0, 255).to(torch.uint8))
    assert not torch.equal(
        decode(tmp_path / "big.png", resize="pil_bilinear"), decode(tmp_path / "big.png")
    )


def test_truncated_and_fake_images_are_errors_naming_the_file(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    for name in ("cut.jpg", "text.jpg"):
        with pytest.raises(UserError, match=rf"{name}: not a readable image"):
            decode(tmp_path / name)


def test_decompression_bomb_is_refused_quickly(tmp_path):
    Image.new("1", (20_000, 20_000)).save(tmp_path / "bomb.png")  # small file, 400 megapixel canvas
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"bomb.png: .*(decompression bomb|exceeds limit)"):
        decode(tmp_path / "bomb.png")
    assert time.perf_counter() - t0 < 2.0


def test_bad_file_found_at_setup_or_skipped(tmp_path):
    root = make_layout(
        tmp_path / "d", classes=CLASSES[:2], splits={"train_1": 2, "valid": 2, "test": 2}
    )
    (root / "valid" / CLASSES[1] / "zz_bad.png").write_text("junk")
    for cache in (True, False):
        with pytest.raises(UserError, match=r"zz_bad.png: not a readable image"):
            _datamodule(root, train_dirs=["train_1"], cache=cache)
        with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*zz_bad.png"):
            dm = _datamodule(root, train_dirs=["train_1"], cache=cache, skip_bad_files=True)
        assert len(dm.paths["valid"]) == 4 and not any("zz_bad" in p for p in dm.paths["valid"])


def test_eval_batch_size_auto_is_the_train_batch_on_the_cpu_and_1024_on_a_gpu():
    from cifar_lightning.data.datamodule import eval_batch_size

    assert eval_batch_size("auto", 64, torch.device("cpu")) == 64
    assert eval_batch_size("auto", 64, torch.device("cuda")) == 1024
    assert eval_batch_size("auto", 2048, torch.device("cuda")) == 2048
    assert eval_batch_size(100, 64, torch.device("cuda")) == 100


def test_validation_and_test_loaders_use_the_eval_batch_size(tiny_layout, tmp_path):
    from cifar_lightning.build import build_datamodule

    dm = build_datamodule(
        cfg_for(tmp_path, tiny_layout, "data.batch_size=8", "data.eval_batch_size=3")
    )
    dm.setup("fit")
    assert [len(b) for b in dm.val_dataloader().batch_sampler] == [3] * 6 + [2]  # 20 images
    assert len(dm.test_dataloader().batch_sampler) == 10  # 30 images
    # 20 per directory: 8, 8, 4
    assert {len(b) for b in dm.train_dataloader().batch_sampler} == {8, 4}


def test_validation_and_test_results_do_not_depend_on_the_eval_batch_size(tiny_layout, tmp_path):
    # Per-image means: batches of 3 or of 1,000 images give the same metrics up to float rounding,
    # and the same predictions in the same file order. Training batches are the same, so training
    # is too.
    import csv
    import json

    from cifar_lightning.train import train

    runs = {}
    for size in (3, 1000):
        run = tmp_path / str(size)
        train(
            cfg_for(
                run,
                tiny_layout,
                "trainer.max_epochs=2",
                "data.batch_size=8",
                "logger=none",
                f"data.eval_batch_size={size}",
            )
        )
        with open(run / "history.csv") as f:
            history = list(csv.DictReader(f))
        with open(run / "predictions.csv") as f:
            predictions = [(r["path"], r["prediction"]) for r in csv.DictReader(f)]
        runs[size] = history, predictions, json.loads((run / "metrics.json").read_text())
    (h3, p3, m3), (h1000, p1000, m1000) = runs[3], runs[1000]
    for a, b in zip(h3, h1000, strict=True):
        assert a["train_loss"] == b["train_loss"]  # the same training
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)
        assert float(a["val_acc"]) == pytest.approx(float(b["val_acc"]), abs=1e-6)
    assert p3 == p1000 and len(p3) == 30
    assert m3["test_accuracy"] == pytest.approx(m1000["test_accuracy"], abs=1e-9)


def test_ddp_ranks_share_the_global_batch(tiny_layout):
    # data.batch_size is the global batch: under DDP the ranks' chunks of a step put together are
    # the one-process batch (same images, same labels), so each image is seen once per epoch.
    def loaders(rank, world):
        dm = CifarDataModule(str(tiny_layout), source="unused", batch_size=8, cache=True)
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
            global_rank=rank,
            world_size=world,
        )
        dm.setup()
        return dm, list(dm.train_dataloader())

    dm, single = loaders(0, 1)
    (_, rank0), (_, rank1) = loaders(0, 2), loaders(1, 2)
    assert len(rank0) == len(rank1) == len(single)
    for (x0, y0), (x1, y1), (x, y) in zip(rank0, rank1, single):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    n_train = sum(len(KerasImageFolder(tiny_layout / d)) for d in dm.train_dirs)
    assert max(len(y) for _, y in single) == 8
    assert sum(len(y0) + len(y1) for (_, y0), (_, y1) in zip(rank0, rank1)) == n_train


def _cache(root):
    images, labels, _ = load_split(KerasImageFolder(root), 32, "tf_bilinear")
    return images.sum().item(), len(labels)


def test_concurrent_caching_and_a_torn_cache_file(tmp_path):
    root = make_layout(tmp_path / "d", classes=CLASSES[:3], splits={"valid": 20}) / "valid"
    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_cache, [root, root])
    assert a == b and len(list(root.parent.glob(".cache-valid-*.pt"))) == 1
    cache = next(root.parent.glob(".cache-valid-*.pt"))
    cache.write_bytes(cache.read_bytes()[:1000])  # as if a writer had crashed mid-file
    assert _cache(root) == a  # rebuilt, not trusted
    assert not list(root.parent.glob("*.tmp"))
