"""Class discovery and image decoding with Keras's rules; every path (cache, per-file, evaluate,
predict) goes through this one ImageFolder subclass."""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import ImageFolder

from cifar_lightning.errors import UserError

# Keras image_dataset_from_directory's extensions (ImageFolder's differ: no .gif, extra .tif...)
EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# fidelity.resize: tf.image.resize's bilinear, or PIL's (antialiased when shrinking)
RESIZES = ("tf_bilinear", "pil_bilinear")
MAX_PIXELS = 64_000_000  # larger canvases are refused from the header, before any decoding


def find_classes(directory: str | Path) -> list[str]:
    """Sorted sub-folder names, skipping hidden ones (.ipynb_checkpoints), as Keras does."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    return sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )


def require_classes(directory: str | Path) -> list[str]:
    """find_classes, where a folder without any class folder is an error naming it."""
    classes = find_classes(directory)
    if not classes:
        raise UserError(f"{directory}: no class folders (expected e.g. {directory}/000_airplane/)")
    return classes


def check_same_classes(splits: dict[str, list[str]]) -> list[str]:
    """All splits must have the same class folders; else name the classes and the splits."""
    (first, classes), *rest = splits.items()
    for name, other in rest:
        if other != classes:
            only_first = sorted(set(classes) - set(other))
            only_other = sorted(set(other) - set(classes))
            detail = []
            if only_first:
                detail.append(f"{only_first} only in {first}")
            if only_other:
                detail.append(f"{only_other} only in {name}")
            raise UserError(
                f"class folders differ between splits {first} and {name}: "
                + ("; ".join(detail) or f"order {classes} vs {other}")
            )
    return classes


def decode(path: str | Path, size: int = 32, resize: str = "tf_bilinear") -> torch.Tensor:
    """One image file -> uint8 tensor 3 x size x size, as Keras decodes it: RGB (grey expanded,
    alpha dropped), bilinear resize without antialiasing. Raises UserError naming the file."""
    return fit_size(read_rgb(path), size, resize)


def read_rgb(path: str | Path) -> np.ndarray:
    """One image file -> uint8 H x W x 3 array at its own size. Raises UserError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size  # from the header: nothing decoded yet
                if w * h > MAX_PIXELS:
                    raise UserError(
                        f"{path}: image claims {w}x{h} pixels, over the {MAX_PIXELS:,} limit "
                        "(a decompression bomb?)"
                    )
                img.load()  # a truncated file raises here: PIL's LOAD_TRUNCATED_IMAGES stays False
                return _to_rgb_uint8(img)
    except UserError:
        raise
    except Exception as exc:  # PIL raises many types for unreadable files
        raise UserError(f"{path}: not a readable image ({' '.join(str(exc).split())})") from exc


def fit_size(arr: np.ndarray, size: int, resize: str) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x size x size uint8; an image already that size is returned as is."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if x.shape[1:] == (size, size):
        return x.contiguous()
    if resize == "pil_bilinear":  # PIL antialiases when shrinking (PyTorch/torchvision habit)
        img = Image.fromarray(arr).resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    # tf.image.resize(bilinear) == interpolate(antialias=False, align_corners=False)
    y = F.interpolate(
        x[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )
    return y[0].round().clamp(0, 255).to(torch.uint8)


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits (PIL's convert("RGB") would saturate it)
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


class KerasImageFolder(ImageFolder):
    """ImageFolder with Keras's class and file rules, yielding (uint8 3xHxW tensor, label)."""

    def __init__(
        self,
        root: str | Path,
        image_size: int = 32,
        resize: str = "tf_bilinear",
        skip_bad_files: bool = False,
    ):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: no such directory")
        self.skip_bad_files = skip_bad_files
        try:
            super().__init__(
                str(root),
                loader=partial(decode, size=image_size, resize=resize),
                is_valid_file=lambda p: p.lower().endswith(EXTENSIONS),
                allow_empty=False,
            )
        except FileNotFoundError as exc:
            raise UserError(f"{root}: {exc}") from exc

    def find_classes(self, directory):
        classes = require_classes(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(
        directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ):
        # Keras walks recursively and sorts; hidden folders inside a class are skipped too.
        samples = []
        for cls, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            files = sorted(
                str(p)
                for p in Path(directory, cls).rglob("*")
                if p.is_file()
                and is_valid_file(str(p))
                and not any(part.startswith(".") for part in p.relative_to(directory).parts)
            )
            if not files:
                raise UserError(
                    f"{Path(directory, cls)}: class folder has no images ({', '.join(EXTENSIONS)})"
                )
            samples += [(f, idx) for f in files]
        return samples
