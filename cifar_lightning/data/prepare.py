"""The notebook's "Group Datasets" step: build root/{train_1..4,valid,test}/<NNN_class>/.

    python -m cifar_lightning.prepare data.root=data/cifar10 data.source=PATH/TO/cifar10-jpeg.tar.gz

Sources: "download" (torchvision, md5-checked), the official cifar-10-python.tar.gz (checksum-
verified before anything is unpickled), or image folders train/<class>/ + test/<class>/ as a
.tar.gz or a directory. Split rule: official batches 1-4 -> train_1..4, batch 5 -> valid; for
image folders, per class in file-name order, the first 4/5 go to train_1..4 in four equal runs
(files 0-3999, 1,000 each, for CIFAR-10) and the rest to valid. The layout is built beside the
target and renamed into place under a lock, so an interrupted or concurrent prepare never leaves
a half-built root; the next prepare removes the building folder an interrupted one left."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

from cifar_lightning.data.folder import EXTENSIONS, check_same_classes, find_classes
from cifar_lightning.errors import UserError

log = logging.getLogger(__name__)

TRAIN_DIRS = ["train_1", "train_2", "train_3", "train_4"]


def has_layout(root: Path, splits: list[str]) -> bool:
    return all((root / s).is_dir() for s in splits)


def ensure_layout(root: str | Path, source: str, splits: list[str]) -> Path:
    """Return root, building it from source first if it lacks the layout.

    A root that has the layout is returned without taking the lock (a read-only dataset needs
    no lock file). Otherwise the build runs under the lock file .ROOT.lock beside root: a
    concurrent prepare waits, then finds the layout built. With the lock held, building folders
    .ROOT.building-* that an interrupted prepare left beside root are removed first (each one
    logged): every builder holds the lock until its own folder is gone, so none of them is in
    use. Any failure while building is one UserError naming both data.root and data.source."""
    root = Path(root)
    if has_layout(root, splits):
        return root
    if root.exists() and not root.is_dir():
        raise UserError(
            f"data.root={root} is a file, not a folder; point data.root at the folder of the splits"
        )
    if root.exists() and any(root.iterdir()):
        missing = [s for s in splits if not (root / s).is_dir()]
        raise UserError(
            f"data.root={root} exists but lacks {missing}; point data.root at a full layout "
            "or at a new directory to build one there"
        )

    def failed(detail: str) -> UserError:
        # A mistyped data.root also lands here; naming it keeps that from reading as a bad source.
        return UserError(
            f"data.root={root} has no layout ({', '.join(splits)}), and building it from "
            f"data.source={source} failed: {detail}"
        )

    try:  # a read-only or full disk, a folder we may not write: one line naming the file
        root.parent.mkdir(parents=True, exist_ok=True)
        with _lock(root.parent / f".{root.name}.lock"):
            _remove_stale_builds(root)
            if has_layout(root, splits):  # another process built it while we waited
                return root
            tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.building-"))
            try:
                build(source, tmp / "layout", work=tmp)
                if root.exists():
                    root.rmdir()  # empty (checked above)
                os.rename(tmp / "layout", root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UserError as exc:
        # build()'s messages start with the source to stand alone; here failed() names it once.
        raise failed(str(exc).removeprefix(f"data.source={source}: ")) from exc
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise failed(f"{exc.strerror or exc}{where}") from exc
    if not has_layout(root, splits):
        built = sorted(p.name for p in root.iterdir() if p.is_dir())
        missing = [s for s in splits if not (root / s).is_dir()]
        raise failed(
            f"it built {built}, without {missing} (see data.train_dirs, data.val_dir, "
            "data.test_dir)"
        )
    return root


def _lock(path: Path) -> FileLock:
    """An exclusive lock on path, waiting as long as another process holds it. filelock locks on
    every OS (fcntl is POSIX-only); the OS releases a process's lock when it dies, so a killed
    prepare does not block the next one."""
    return FileLock(path)


def _remove_stale_builds(root: Path) -> None:
    """Remove the .ROOT.building-* folders beside root. Call only with root's lock held."""
    prefix = f".{root.name}.building-"
    for path in root.parent.iterdir():
        rest = path.name[len(prefix) :] if path.name.startswith(prefix) else ""
        # mkdtemp's random part has no ".": a root named "ROOT.building-x" has its own lock,
        # and its folders .ROOT.building-x.building-* are not ours to remove.
        if not re.fullmatch(r"\w+", rest) or path.is_symlink() or not path.is_dir():
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:  # left in place costs only disk space: the build goes on
            log.warning(f"could not remove {path}, left by an interrupted preparation: {exc}")
        else:
            log.info(f"removed {path}, left by an interrupted preparation")


def build(source: str, out: Path, work: Path) -> None:
    if source == "download":
        return from_official(download(work), out)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source={source}: no such file or directory")
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir():
            return from_official(path, out)
        return from_image_folders(path, out)
    if not tarfile.is_tarfile(path):
        raise UserError(f"data.source={source}: not a .tar.gz archive or a directory")
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            if any(n.startswith("cifar-10-batches-py") for n in names):
                verify_official_archive(path)  # before anything is extracted or unpickled
            # filter="data" refuses absolute paths, .. and devices
            tar.extractall(work / "src", filter="data")
    except tarfile.FilterError as exc:  # the member is named; nothing outside work/ was written
        raise UserError(f"data.source={source}: refused: {exc}") from exc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise UserError(
            f"data.source={source}: a damaged archive ({type(exc).__name__}: {exc})"
        ) from exc
    if (work / "src" / "cifar-10-batches-py").is_dir():
        return from_official(work / "src", out)
    return from_image_folders(work / "src", out)


def download(work: Path) -> Path:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(work / "download"), download=True)  # md5-checked by torchvision
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(
            f"could not download CIFAR-10 from {CIFAR10.url} ({reason}); offline? use "
            "data.source=PATH/TO/cifar-10-python.tar.gz or an image-folder archive such as "
            "PATH/TO/cifar10-jpeg.tar.gz"
        ) from exc
    return work / "download"


def verify_official_archive(path: Path) -> None:
    from torchvision.datasets import CIFAR10

    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    if md5.hexdigest() != CIFAR10.tgz_md5:
        raise UserError(
            f"data.source={path}: looks like cifar-10-python.tar.gz but fails its official md5 "
            f"checksum ({md5.hexdigest()} != {CIFAR10.tgz_md5}); refusing to unpickle it"
        )


def from_official(base: Path, out: Path) -> None:
    """base holds cifar-10-batches-py/. torchvision checks every batch's md5 before unpickling."""
    from torchvision.datasets import CIFAR10

    try:
        train, test = CIFAR10(str(base), train=True), CIFAR10(str(base), train=False)
    except RuntimeError as exc:
        raise UserError(
            f"{base / 'cifar-10-batches-py'}: {exc} (official md5 checksums failed)"
        ) from exc
    folders = [f"{i:03d}_{c}" for i, c in enumerate(train.classes)]
    n = len(train.data) // 5  # 10,000 per official batch
    splits = [
        (d, train.data[k * n : (k + 1) * n], train.targets[k * n : (k + 1) * n])
        for k, d in enumerate([*TRAIN_DIRS, "valid"])
    ] + [("test", test.data, test.targets)]
    for split, images, labels in splits:
        for f in folders:
            (out / split / f).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(
            tqdm(list(zip(images, labels)), desc=f"writing {split}", unit="img", mininterval=1.0)
        ):
            Image.fromarray(np.asarray(img)).save(out / split / folders[label] / f"{i:05d}.png")


def _find_split_dirs(base: Path) -> tuple[Path, Path]:
    for cand in [
        base,
        *sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
    ]:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand / "train", cand / "test"
    raise UserError(
        f"{base}: no train/ and test/ image folders found "
        "(expected train/<class>/ and test/<class>/)"
    )


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def from_image_folders(base: Path, out: Path) -> None:
    train_dir, test_dir = _find_split_dirs(base)
    classes = check_same_classes(
        {str(train_dir): find_classes(train_dir), str(test_dir): find_classes(test_dir)}
    )
    for i, cls in enumerate(tqdm(classes, desc="grouping", unit="class")):
        folder = cls if re.match(r"^\d{3}_", cls) else f"{i:03d}_{cls}"
        files = _images(train_dir / cls)
        run = len(files) * 4 // 5 // 4  # files per train directory: 1,000 of 5,000
        if run == 0:
            raise UserError(
                f"{train_dir / cls}: {len(files)} images, "
                "too few to split into train_1..4 and valid"
            )
        parts = {d: files[k * run : (k + 1) * run] for k, d in enumerate(TRAIN_DIRS)}
        parts["valid"], parts["test"] = files[4 * run :], _images(test_dir / cls)
        for split, paths in parts.items():
            (out / split / folder).mkdir(parents=True, exist_ok=True)
            for p in paths:
                shutil.copyfile(p, out / split / folder / p.name)
