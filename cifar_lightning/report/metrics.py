"""The test metrics (torchmetrics), predictions.csv, the best epoch of a history, and
write_evaluation: every file of a run's evaluation, metrics and figures."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from cifar_lightning.report.figures import plot_confusion, plot_roc
from cifar_lightning.report.files import save_figure, write_csv, write_json


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]
) -> dict:
    """Accuracy, macro/weighted P/R/F1, one-vs-rest AUROC, confusion matrix, per-class figures."""
    n = len(class_names)
    probs = logits.float().softmax(-1)
    kw = dict(num_classes=n)
    per = {
        k: fn(probs, labels, average="none", **kw)
        for k, fn in (
            ("precision", multiclass_precision),
            ("recall", multiclass_recall),
            ("f1", multiclass_f1_score),
        )
    }
    support = torch.bincount(labels, minlength=n)
    # One-vs-rest AUROC is undefined for a class with no positives or no negatives (torchmetrics
    # reports 0 there): NaN, and the macro mean is over the classes where it is defined.
    defined = (support > 0) & (support < len(labels))
    auroc = multiclass_auroc(probs, labels, average="none", **kw).where(defined, torch.nan)
    out = {
        # Keras's accuracy
        "test_accuracy": multiclass_accuracy(probs, labels, average="micro", **kw).item(),
        "test_loss": F.cross_entropy(logits.float(), labels).item(),
        "precision_macro": multiclass_precision(probs, labels, average="macro", **kw).item(),
        "recall_macro": multiclass_recall(probs, labels, average="macro", **kw).item(),
        "f1_macro": multiclass_f1_score(probs, labels, average="macro", **kw).item(),
        "precision_weighted": multiclass_precision(probs, labels, average="weighted", **kw).item(),
        "recall_weighted": multiclass_recall(probs, labels, average="weighted", **kw).item(),
        "f1_weighted": multiclass_f1_score(probs, labels, average="weighted", **kw).item(),
        "auroc_macro": auroc[defined].mean().item() if defined.any() else math.nan,
        "per_class": {
            c: {
                "precision": per["precision"][i].item(),
                "recall": per["recall"][i].item(),
                "f1": per["f1"][i].item(),
                "auroc": auroc[i].item(),
                "support": int(support[i]),
            }
            for i, c in enumerate(class_names)
        },
        "confusion_matrix": multiclass_confusion_matrix(probs, labels, **kw).tolist(),
    }
    return out


def write_predictions(
    path, paths: list[str], labels: torch.Tensor, logits: torch.Tensor, class_names: list[str]
) -> None:
    probs = logits.float().softmax(-1)
    pred = probs.argmax(-1)
    rows = [
        {
            "path": p,
            "label": int(y),
            "prediction": int(k),
            **{c: f"{v:.6f}" for c, v in zip(class_names, pr)},
        }
        for p, y, k, pr in zip(paths, labels.tolist(), pred.tolist(), probs.tolist())
    ]
    write_csv(path, rows, ["path", "label", "prediction", *class_names])


def history_column(monitor: str) -> str:
    """history.csv's column for a monitored metric (val/loss -> val_loss); metrics.json has it as
    best_<column>."""
    return monitor.replace("/", "_")


def best_epoch(rows: list[dict], monitor: str = "val/loss", mode: str = "min") -> int | None:
    """First epoch with the best finite `monitor` (history.csv's column: val/loss -> val_loss), as
    ModelCheckpoint picks best.ckpt; Keras, too, counts only strict improvements."""
    column, sign = history_column(monitor), (1 if mode == "min" else -1)
    best, best_value = None, math.inf
    for r in rows:
        v = float(r[column]) if r.get(column) not in (None, "") else math.nan
        if math.isfinite(v) and sign * v < best_value:
            best, best_value = int(r["epoch"]), sign * v
    return best


def write_evaluation(
    run_dir: Path, logits, labels, paths, class_names, extra: dict | None = None, on_figure=None
) -> dict:
    """metrics.json, predictions.csv, confusion_matrix.png and roc_curves.png into run_dir;
    `on_figure(name, figure)`, if given, also gets each figure (train sends them to its
    loggers)."""
    metrics = {**(extra or {}), **classification_metrics(logits, labels, class_names)}
    write_json(run_dir / "metrics.json", metrics)
    write_predictions(run_dir / "predictions.csv", paths, labels, logits, class_names)
    for name, fig in (
        ("confusion_matrix", plot_confusion(logits, labels, class_names)),
        ("roc_curves", plot_roc(logits, labels, class_names)),
    ):
        if on_figure is not None:
            on_figure(f"test/{name}", fig)
        save_figure(fig, run_dir / f"{name}.png")
    return metrics
