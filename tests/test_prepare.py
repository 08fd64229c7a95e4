"""Building the notebook's layout (data/prepare.py): from image folders, archives or the
official batches (data_batch_5 is valid, test_batch is test), and every way a build can fail or be
interrupted: bad checksums, offline, unwritable, half-built, concurrent builders."""

import io
import logging
import multiprocessing as mp
import pickle
import re
import tarfile
import threading
import urllib.error

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image
from torchvision.datasets import CIFAR10

from cifar_lightning.data.folder import KerasImageFolder
from cifar_lightning.data.prepare import ensure_layout
from cifar_lightning.errors import UserError
from tests.conftest import write_images

SPLITS = ["train_1", "train_2", "train_3", "train_4", "valid", "test"]
NAMES = ["airplane", "automobile", "bird"]


def build_failed(root, source):
    """The start of every build failure's message: it names data.root as well as data.source."""
    return re.escape(
        f"data.root={root} has no layout ({', '.join(SPLITS)}), "
        f"and building it from data.source={source} failed: "
    )


def make_image_folders(base, per_class=10, test_per_class=2):
    for c, name in enumerate(NAMES):
        write_images(base / "train" / name, per_class, c, ext=".jpg")
        write_images(base / "test" / name, test_per_class, c, seed=9, ext=".jpg")
    return base


def _check_split_rule(root, per_class=10):
    run = per_class * 4 // 5 // 4
    for k in range(4):
        files = sorted(p.name for p in (root / f"train_{k + 1}" / "000_airplane").iterdir())
        assert files == [f"{i:04d}.jpg" for i in range(k * run, (k + 1) * run)]
    assert sorted(p.name for p in (root / "valid" / "000_airplane").iterdir()) == [
        f"{i:04d}.jpg" for i in range(4 * run, per_class)
    ]
    assert KerasImageFolder(root / "test").classes == ["000_airplane", "001_automobile", "002_bird"]


def test_image_folder_archive_source(tmp_path):
    src = make_image_folders(tmp_path / "src" / "cifar10-jpeg")
    archive = tmp_path / "jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar10-jpeg")
    root = ensure_layout(tmp_path / "layout", str(archive), SPLITS)
    _check_split_rule(root)
    assert not list(tmp_path.glob(".layout.building-*"))  # the temporary build is gone


def test_image_folder_directory_source(tmp_path):
    src = make_image_folders(tmp_path / "src")
    _check_split_rule(ensure_layout(tmp_path / "layout", str(src), SPLITS))


def test_fake_official_archive_is_refused_before_unpickling(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    payload = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setattr(
        pickle, "load", lambda *a, **k: pytest.fail("unpickled an unverified archive")
    )
    with pytest.raises(
        UserError,
        match=build_failed(tmp_path / "layout", archive)
        + r"looks like cifar-10-python\.tar\.gz but fails its official md5 checksum",
    ):
        ensure_layout(tmp_path / "layout", str(archive), SPLITS)
    assert not (tmp_path / "layout").exists()


# the files of the official cifar-10-python.tar.gz, in label-file order
OFFICIAL_BATCHES = [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]


def _fake_official_batches(base):
    """Batches in the official pickle format (we wrote them, so reading them back is safe)."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(OFFICIAL_BATCHES):
        labels = [(i + j) % 3 for j in range(6)]
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"data": rng.integers(0, 255, (6, 3072), dtype=np.uint8), "labels": labels}, f
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": NAMES}, f)


def test_official_reader_splits_batches(tmp_path, monkeypatch):
    _fake_official_batches(tmp_path / "src")
    # fakes can't match the md5s
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    root = ensure_layout(tmp_path / "layout", str(tmp_path / "src"), SPLITS)
    for split in SPLITS:  # each official batch (6 fake images) becomes one directory
        ds = KerasImageFolder(root / split)
        assert len(ds) == 6 and ds.classes == ["000_airplane", "001_automobile", "002_bird"]


def test_official_reader_refuses_bad_checksums(tmp_path):
    _fake_official_batches(tmp_path / "src")
    with pytest.raises(UserError, match=r"md5"):
        ensure_layout(tmp_path / "layout", str(tmp_path / "src"), SPLITS)


def test_download_offline_says_to_use_a_local_source(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(UserError) as err:
        ensure_layout(tmp_path / "layout", "download", SPLITS)
    assert re.fullmatch(
        build_failed(tmp_path / "layout", "download")
        + re.escape(f"could not download CIFAR-10 from {CIFAR10.url} (")
        + r"[^()]*Name or service not known[^()]*"
        + re.escape(
            "); offline? use data.source=PATH/TO/cifar-10-python.tar.gz or an image-folder "
            "archive such as PATH/TO/cifar10-jpeg.tar.gz"
        ),
        str(err.value),
    ), str(err.value)


@pytest.mark.parametrize("source", ["download", "nope/cifar-10-python.tar.gz"])
def test_a_failed_build_names_the_root_it_looked_in(tmp_path, monkeypatch, source):
    # A mistyped data.root has no layout, so it is built: the error must say where it looked,
    # or a typo in the root reads like a network problem or a bad source.
    def offline(*a, **k):
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(CIFAR10, "download", offline)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "dtaa" / "cifar10"
    with pytest.raises(UserError) as err:
        ensure_layout(root, source, SPLITS)
    message = str(err.value)
    assert f"data.root={root} has no layout" in message
    assert f"building it from data.source={source} failed: " in message
    assert message.count("data.source=") == 1 + (source == "download")  # + the offline hint
    assert not root.exists() and not list(root.parent.glob(".cifar10.building-*"))


def test_missing_source_and_partial_root_are_clear_errors(tmp_path):
    with pytest.raises(
        UserError,
        match=build_failed(tmp_path / "layout", tmp_path / "nope") + "no such file or directory$",
    ):
        ensure_layout(tmp_path / "layout", str(tmp_path / "nope"), SPLITS)
    (tmp_path / "partial" / "train_1").mkdir(parents=True)
    with pytest.raises(UserError, match=r"lacks \['train_2'"):
        ensure_layout(tmp_path / "partial", "download", SPLITS)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match=r"data.root=.*a_file is a file, not a folder"):
        ensure_layout(tmp_path / "a_file", "download", SPLITS)
    assert (tmp_path / "a_file").read_text() == "not a folder"  # left as it was


def test_a_build_without_the_configured_splits_names_them(tmp_path):
    splits = [*SPLITS[:4], "validation", "test"]  # data.val_dir=validation; the build makes valid
    src = make_image_folders(tmp_path / "src")
    with pytest.raises(
        UserError,
        match=re.escape(
            f"data.root={tmp_path / 'layout'} has no layout ({', '.join(splits)}), and building it "
            f"from data.source={src} failed: it built {sorted(SPLITS)}, without ['validation'] "
            "(see data.train_dirs, data.val_dir, data.test_dir)"
        )
        + "$",
    ):
        ensure_layout(tmp_path / "layout", str(src), splits)


def test_unwritable_place_for_the_layout_is_one_error_line(tmp_path, monkeypatch):
    # A read-only mount (here: its first write, the lock file) was an OSError traceback
    import cifar_lightning.data.prepare as prepare

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(prepare, "_lock", read_only)
    with pytest.raises(
        UserError,
        match=build_failed(tmp_path / "layout", "download")
        + re.escape(f"Read-only file system: {tmp_path / '.layout.lock'}")
        + "$",
    ):
        ensure_layout(tmp_path / "layout", "download", SPLITS)


def _prepare(args):
    root, src = args
    return str(ensure_layout(root, src, SPLITS))


def test_concurrent_prepares_both_succeed(tmp_path):
    src = make_image_folders(tmp_path / "src", per_class=20)
    root = tmp_path / "layout"
    with mp.get_context("spawn").Pool(2) as pool:
        assert pool.map(_prepare, [(root, str(src))] * 2) == [str(root)] * 2
    _check_split_rule(root, per_class=20)


def test_archive_escaping_its_folder_or_damaged_is_one_error(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(
        UserError, match=build_failed(tmp_path / "a" / "b" / "layout", evil) + "refused: .*escaped"
    ):
        ensure_layout(tmp_path / "a" / "b" / "layout", str(evil), SPLITS)
    assert not list(tmp_path.rglob("escaped.txt"))
    src = make_image_folders(tmp_path / "src")
    torn = tmp_path / "torn.tar.gz"
    with tarfile.open(torn, "w:gz") as tar:
        tar.add(src, arcname="src")
    torn.write_bytes(torn.read_bytes()[:2000])  # as a download cut short
    with pytest.raises(
        UserError, match=build_failed(tmp_path / "layout2", torn) + "a damaged archive"
    ):
        ensure_layout(tmp_path / "layout2", str(torn), SPLITS)
    assert not (tmp_path / "layout2").exists()


def test_building_folders_left_by_an_interrupted_prepare_are_removed(tmp_path, caplog):
    # A prepare killed mid-build (Ctrl-C, OOM) leaves its .ROOT.building-* folder beside the root;
    # the next build removes it. Another root's folders, and a layout already there, are left be.
    src = make_image_folders(tmp_path / "src")
    stale = tmp_path / ".layout.building-k2x_9qab"
    (stale / "layout" / "train_1").mkdir(parents=True)
    (stale / "layout" / "train_1" / "0000.jpg").write_bytes(b"half")
    others = [tmp_path / ".layout.building-x.building-abcd1234", tmp_path / ".other.building-ab12"]
    for other in others:
        other.mkdir()
    with caplog.at_level(logging.INFO, logger="cifar_lightning.data.prepare"):
        root = ensure_layout(tmp_path / "layout", str(src), SPLITS)
    assert not stale.exists() and all(other.is_dir() for other in others)
    _check_split_rule(root)
    removed = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert removed == [f"removed {stale}, left by an interrupted preparation"]
    stale.mkdir()  # a layout that is there is returned without the lock, and nothing removed
    assert ensure_layout(root, str(src), SPLITS) == root and stale.is_dir()


def test_a_building_folder_is_not_removed_while_its_builder_holds_the_lock(tmp_path):
    # Only a process that holds the lock builds, so a folder seen while it is held may be in use.
    src = make_image_folders(tmp_path / "src")
    live = tmp_path / ".layout.building-inuse123"
    live.mkdir()
    results = []
    with FileLock(tmp_path / ".layout.lock"):  # the other builder, still running
        waiter = threading.Thread(
            target=lambda: results.append(ensure_layout(tmp_path / "layout", str(src), SPLITS))
        )
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and live.is_dir() and not (tmp_path / "layout").exists()
    waiter.join(timeout=60)
    assert results == [tmp_path / "layout"] and not live.exists()  # released: the builder is gone


def _official_batches(base, per_batch=6):
    """Fake official pickles; every image of batch i is one flat grey level, 20 * (i + 1)."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate(OFFICIAL_BATCHES):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "data": np.full((per_batch, 3072), 20 * (i + 1), np.uint8),
                    "labels": [j % 3 for j in range(per_batch)],
                },
                f,
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"]}, f)
    return OFFICIAL_BATCHES


def test_official_batch_5_is_valid_and_test_batch_is_test(tmp_path, monkeypatch):
    # The notebook trains on data_batch_1..4 and validates on data_batch_5: a valid split taken
    # from another batch would be a different experiment with the same numbers of files.
    names = _official_batches(tmp_path / "src")
    # fakes can't match the md5s
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    root = ensure_layout(tmp_path / "layout", str(tmp_path / "src"), SPLITS)
    for i, split in enumerate(SPLITS):  # SPLITS lists the splits in the order of `names`
        files = sorted((root / split).rglob("*.png"))
        levels = {int(np.asarray(Image.open(p)).mean()) for p in files}
        assert len(files) == 6 and levels == {20 * (i + 1)}, (split, names[i], levels)


def test_a_build_that_fails_midway_leaves_no_root_and_can_be_rerun(tmp_path, monkeypatch):
    # The layout is built beside data.root and renamed into place: a crash (disk full, Ctrl-C)
    # must not leave a half-built root that a later run would refuse or, worse, train on.
    import shutil

    src = tmp_path / "src"
    for c, name in enumerate(["airplane", "automobile", "bird"]):
        write_images(src / "train" / name, 5, c, ext=".jpg")
        write_images(src / "test" / name, 1, c, seed=9, ext=".jpg")
    copy, copied = shutil.copyfile, []

    def copy_then_fail(a, b, *args, **kw):
        if len(copied) == 4:
            raise OSError("No space left on device")
        copied.append(b)
        return copy(a, b, *args, **kw)

    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)
    root = tmp_path / "layout"
    with pytest.raises(
        UserError,
        match=r"data.root=.*layout has no layout \(.*\), and building it from "
        r"data.source=.*src failed: No space left on device$",
    ):
        ensure_layout(root, str(src), SPLITS)  # one error line, not an OSError traceback
    assert len(copied) == 4 and not root.exists()
    assert not list(tmp_path.glob(".layout.building-*"))
    monkeypatch.undo()
    assert ensure_layout(root, str(src), SPLITS) == root
    assert len(KerasImageFolder(root / "valid")) == 3 and len(KerasImageFolder(root / "test")) == 3
