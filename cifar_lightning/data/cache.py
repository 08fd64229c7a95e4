"""Decode each split once into a uint8 tensor file beside the data, keyed by a fingerprint.

The file holds only tensors, lists of strings and ints: it is loaded with weights_only=True."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from cifar_lightning.data.folder import KerasImageFolder, fit_size, read_rgb
from cifar_lightning.errors import UserError

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def fingerprint(ds: KerasImageFolder, image_size: int) -> str:
    """Paths, sizes, mtimes, class list and image size: a changed folder rebuilds. The resize rule
    is checked apart (see load_split), as it matters only if some image was not image_size."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}|{ds.skip_bad_files}|{ds.classes}".encode())
    for path, label in ds.samples:
        st = os.stat(path)
        h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_split(
    ds: KerasImageFolder, image_size: int, resize: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images uint8 N x 3 x S x S, labels int64 N, paths) of an ImageFolder split, from the cache
    if its fingerprint matches. Bad files are an error, or skipped with skip_bad_files."""
    root = Path(ds.root)
    key = fingerprint(ds, image_size)
    path = root.parent / f".cache-{root.name}-{key}.pt"
    if path.exists():
        try:
            data = torch.load(path, weights_only=True)
            cached = data["images"], data["labels"], data["paths"]
            if data["fingerprint"] != key or cached[0].shape[0] != len(cached[2]):
                raise ValueError("not this folder's images")
            resized_with = data["resized_with"]
        except Exception as exc:  # noqa: BLE001 - torn, garbage or foreign: rebuilt, never trusted
            # the type only: torch's text for a non-pickle suggests weights_only=False
            log.warning(
                f"{path}: unreadable image cache ({type(exc).__name__}); decoding {root.name} "
                "again to rebuild it"
            )
        else:
            # "resized_with" is None when every image was already image_size: then the fidelity
            # presets' resize rules give the same pixels and switching them rebuilds nothing.
            if resized_with in (None, resize):
                return cached
    images = torch.empty(len(ds.samples), 3, image_size, image_size, dtype=torch.uint8)
    bad, resized = [], False
    # `with`: the bar is closed (its line ended) before an error line is printed
    with tqdm(ds.samples, desc=f"caching {root.name}", unit="img", mininterval=1.0) as samples:
        for i, (p, _) in enumerate(samples):
            try:
                arr = read_rgb(p)
                resized |= arr.shape[:2] != (image_size, image_size)
                images[i] = fit_size(arr, image_size, resize)
            except UserError as exc:
                if not ds.skip_bad_files:
                    raise
                bad.append((i, exc))
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    paths = [p for p, _ in ds.samples]
    if bad:
        keep = torch.ones(len(images), dtype=torch.bool)
        keep[[i for i, _ in bad]] = False
        images, labels = images[keep], labels[keep]
        paths = [p for p, k in zip(paths, keep.tolist()) if k]
        warn_skipped(root, [str(e) for _, e in bad])
    try:
        _atomic_save(
            {
                "fingerprint": key,
                "images": images,
                "labels": labels,
                "paths": paths,
                "classes": list(ds.classes),
                "resized_with": resize if resized else None,
            },
            path,
        )
    except OSError as exc:  # a read-only or full disk: this run has its images, the next one pays
        warnings.warn(
            f"{path}: cache not saved ({exc.strerror or exc}); the next run decodes {root.name} "
            f"again (make {root.parent} writable, or set data.cache=false)",
            stacklevel=2,
        )
        return images, labels, paths
    for old in root.parent.glob(f".cache-{root.name}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return images, labels, paths


def warn_skipped(root: Path, messages: list[str]) -> None:
    first = "; ".join(messages[:3])
    warnings.warn(
        f"{root}: skipped {len(messages)} unreadable image(s) (data.skip_bad_files=true): {first}",
        stacklevel=2,
    )


def _atomic_save(obj, path: Path) -> None:
    """Write beside the target then rename: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        # mkstemp makes 0600: others who may read the data may read its cache
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
