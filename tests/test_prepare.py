import io
import multiprocessing as mp
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from cifar_lightning.data.folder import KerasImageFolder
from cifar_lightning.data.prepare import ensure_layout
from cifar_lightning.errors import UserError
from tests.conftest import write_images

SPLITS = ["train_1", "train_2", "train_3", "train_4", "valid", "test"]
NAMES = ["airplane", "automobile", "bird"]


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
    with pytest.raises(UserError, match=r"fails its official md5 checksum"):
        ensure_layout(tmp_path / "layout", str(archive), SPLITS)
    assert not (tmp_path / "layout").exists()


def _fake_official_batches(base):
    """Batches in the official pickle format (we wrote them, so reading them back is safe)."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(
        [
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
            "test_batch",
        ]
    ):
        labels = [(i + j) % 3 for j in range(6)]
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"data": rng.integers(0, 255, (6, 3072), dtype=np.uint8), "labels": labels}, f
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": NAMES}, f)


def test_official_reader_splits_batches(tmp_path, monkeypatch):
    _fake_official_batches(tmp_path / "src")
    monkeypatch.setattr(
        CIFAR10, "_check_integrity", lambda self: True
    )  # fakes can't match the md5s
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
    with pytest.raises(UserError, match=r"could not download CIFAR-10.*use data.source=PATH"):
        ensure_layout(tmp_path / "layout", "download", SPLITS)


def test_missing_source_and_partial_root_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match=r"data.source=.*nope: no such file"):
        ensure_layout(tmp_path / "layout", str(tmp_path / "nope"), SPLITS)
    (tmp_path / "partial" / "train_1").mkdir(parents=True)
    with pytest.raises(UserError, match=r"lacks \['train_2'"):
        ensure_layout(tmp_path / "partial", "download", SPLITS)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match=r"data.root=.*a_file is a file, not a folder"):
        ensure_layout(tmp_path / "a_file", "download", SPLITS)
    assert (tmp_path / "a_file").read_text() == "not a folder"  # left as it was


def test_unwritable_place_for_the_layout_is_one_error_line(tmp_path, monkeypatch):
    # A read-only mount (here: its first write, the lock file) was an OSError traceback
    import cifar_lightning.data.prepare as prepare

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(prepare, "_lock", read_only)
    with pytest.raises(
        UserError,
        match=r"data.root=.*layout: building the layout failed: Read-only file system: "
        r".*\.layout\.lock$",
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
    with pytest.raises(UserError, match=r"evil.tar.gz: refused: .*escaped.txt"):
        ensure_layout(tmp_path / "a" / "b" / "layout", str(evil), SPLITS)
    assert not list(tmp_path.rglob("escaped.txt"))
    src = make_image_folders(tmp_path / "src")
    torn = tmp_path / "torn.tar.gz"
    with tarfile.open(torn, "w:gz") as tar:
        tar.add(src, arcname="src")
    torn.write_bytes(torn.read_bytes()[:2000])  # as a download cut short
    with pytest.raises(UserError, match=r"torn.tar.gz: a damaged archive"):
        ensure_layout(tmp_path / "layout2", str(torn), SPLITS)
    assert not (tmp_path / "layout2").exists()
