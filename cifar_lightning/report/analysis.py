"""The notebook's reading of a run, computed from its predictions.csv and metrics.json: the
most-confused pairs, the worst and best classes, vehicles against animals, the most confident
mistakes and their images (as small PNG thumbnails), and the calibration."""

from __future__ import annotations

import base64
import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from cifar_lightning.report.calibration import expected_calibration_error, reliability_bins

log = logging.getLogger(__name__)

CIFAR10 = {
    "airplane": "vehicle",
    "automobile": "vehicle",
    "ship": "vehicle",
    "truck": "vehicle",
    "bird": "animal",
    "cat": "animal",
    "deer": "animal",
    "dog": "animal",
    "frog": "animal",
    "horse": "animal",
}
THUMBNAIL = 64  # pixels on the longer side: a 32x32 image doubled, a larger one shrunk


def label_of(name: str) -> str:
    """A class folder's name without the NNN_ index that orders the notebook's folders."""
    return re.sub(r"^\d{3}_", "", name)


@dataclass
class Predictions:
    """predictions.csv: the image paths, true and predicted class indices, and the probabilities
    (one column per class, in the run's class order)."""

    class_names: list[str]
    paths: list[str]
    labels: torch.Tensor
    predicted: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def read(cls, path: Path) -> Predictions:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = list(reader)
        class_names = header[3:]
        probs = torch.tensor([[float(v) for v in r[3:]] for r in rows], dtype=torch.float64)
        return cls(
            class_names=class_names,
            paths=[r[0] for r in rows],
            labels=torch.tensor([int(r[1]) for r in rows], dtype=torch.long),
            predicted=torch.tensor([int(r[2]) for r in rows], dtype=torch.long),
            probs=probs.reshape(len(rows), len(class_names)),
        )


@dataclass
class Example:
    """One test image for the page: its thumbnail (a data: URI, or None if it can't be shown),
    true and predicted labels and the predicted class's probability."""

    path: str
    true: str
    predicted: str
    probability: float
    image: str | None


@dataclass
class Gallery:
    """Thumbnails of a run's test images, read only from inside the folder every path in
    predictions.csv shares: a path that leads out of it (a symlink, `..`) is not followed."""

    root: Path | None
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def for_paths(cls, paths: list[str]) -> Gallery:
        if not paths:
            return cls(None)
        try:
            root = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
        except ValueError:  # paths on different drives, or absolute mixed with relative
            return cls(None)
        if len(paths) == 1 or root.is_file():
            root = root.parent
        return cls(root.resolve())

    def thumbnail(self, path: str) -> str | None:
        if self.root is None:
            self.skipped.append(path)
            return None
        try:
            real = Path(path).resolve(strict=True)
            if not real.is_relative_to(self.root) or not real.is_file():
                raise FileNotFoundError(path)
            with Image.open(real) as img:
                img = img.convert("RGB")
                scale = THUMBNAIL / max(img.size)
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img = img.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError):  # missing, outside, unreadable
            self.skipped.append(path)
            return None
        return png_data_uri(buf.getvalue())


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def confused_pairs(pred: Predictions, top: int = 5) -> list[dict]:
    """The `top` (true, predicted) pairs of different classes with the largest share of the true
    class's test images; ties go to the larger count, then to class order."""
    n = len(pred.class_names)
    counts = torch.zeros(n, n, dtype=torch.long)
    counts.index_put_((pred.labels, pred.predicted), torch.ones_like(pred.labels), accumulate=True)
    support = counts.sum(1)
    pairs = [
        {
            "true": i,
            "predicted": j,
            "count": int(counts[i, j]),
            "support": int(support[i]),
            "fraction": int(counts[i, j]) / int(support[i]),
        }
        for i in range(n)
        for j in range(n)
        if i != j and counts[i, j] > 0
    ]
    pairs.sort(key=lambda p: (-p["fraction"], -p["count"], p["true"], p["predicted"]))
    for p in pairs:
        p["true_name"] = label_of(pred.class_names[p["true"]])
        p["predicted_name"] = label_of(pred.class_names[p["predicted"]])
    return pairs[:top]


def describe_pair(p: dict) -> str:
    return (
        f"{p['true_name']} → {p['predicted_name']}: {100 * p['fraction']:.1f}% of "
        f"{p['true_name']} ({p['count']} of {p['support']})"
    )


def ranked_classes(per_class: dict, key: str, k: int = 3) -> dict | None:
    """The k worst and k best classes by per_class[*][key] (classes where it is undefined left
    out), or None if no class has it."""
    scored = []
    for name, row in per_class.items():
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((value, label_of(name)))
    if not scored:
        return None
    scored.sort()
    k = min(k, max(1, len(scored) // 2))
    return {"worst": scored[:k], "best": scored[::-1][:k]}


def vehicles_and_animals(pred: Predictions) -> str | None:
    """The accuracy on CIFAR-10's vehicles against its animals, if the classes are CIFAR-10's."""
    kinds = [CIFAR10.get(label_of(c).lower()) for c in pred.class_names]
    if sorted(label_of(c).lower() for c in pred.class_names) != sorted(CIFAR10):
        return None
    correct = pred.labels == pred.predicted
    acc = {}
    for kind in ("vehicle", "animal"):
        members = torch.tensor([kinds[int(y)] == kind for y in pred.labels])
        if not members.any():
            return None
        acc[kind] = correct[members].double().mean().item()
    better, worse = sorted(acc, key=acc.get, reverse=True)
    return (
        f"Better on {better}s than on {worse}s: {100 * acc[better]:.1f}% of the {better} images "
        f"right against {100 * acc[worse]:.1f}% of the {worse} images."
    )


def example(pred: Predictions, gallery: Gallery, i: int) -> Example:
    k = int(pred.predicted[i])
    return Example(
        path=pred.paths[i],
        true=label_of(pred.class_names[int(pred.labels[i])]),
        predicted=label_of(pred.class_names[k]),
        probability=float(pred.probs[i, k]),
        image=gallery.thumbnail(pred.paths[i]),
    )


def confident_mistakes(pred: Predictions, gallery: Gallery, k: int = 16) -> list[Example]:
    """The k wrong predictions with the highest probability on the predicted class."""
    wrong = (pred.labels != pred.predicted).nonzero().flatten()
    confidence = pred.probs[wrong, pred.predicted[wrong]]
    order = wrong[confidence.argsort(descending=True, stable=True)][:k]
    return [example(pred, gallery, int(i)) for i in order]


def pair_examples(pred: Predictions, gallery: Gallery, pair: dict, k: int = 8) -> list[Example]:
    """Up to k images of a confused pair, the most confident mistakes first."""
    hit = ((pred.labels == pair["true"]) & (pred.predicted == pair["predicted"])).nonzero()
    hit = hit.flatten()
    confidence = pred.probs[hit, pair["predicted"]]
    order = hit[confidence.argsort(descending=True, stable=True)][:k]
    return [example(pred, gallery, int(i)) for i in order]


def calibration(pred: Predictions, temperature: float | None) -> dict:
    """The test ECE from predictions.csv's probabilities and their reliability bins; with a
    temperature, the same after scaling (the log of a 6-decimal probability stands for its logit:
    softmax is unchanged by a constant per row)."""
    out = {
        "ece": expected_calibration_error(pred.probs, pred.labels),
        "bins": reliability_bins(pred.probs, pred.labels),
    }
    if temperature:
        logits = pred.probs.clamp_min(1e-12).log()
        scaled = (logits / temperature).softmax(-1)
        out["ece_scaled"] = expected_calibration_error(scaled, pred.labels)
        out["bins_scaled"] = reliability_bins(scaled, pred.labels)
    return out
