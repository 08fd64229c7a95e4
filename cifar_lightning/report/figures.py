"""The figures, as matplotlib Figures for files.save_figure (and train's loggers): the confusion
matrix, the one-vs-rest ROC curves, the training curves and a sweep's validation curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from cifar_lightning.report.files import read_csv  # noqa: E402


def short_name(name: str) -> str:
    return name.split("_", 1)[1] if name[:3].isdigit() and "_" in name else name


def plot_confusion(logits, labels, class_names):
    from torchmetrics.classification import MulticlassConfusionMatrix

    # data is already gathered
    m = MulticlassConfusionMatrix(len(class_names), sync_on_compute=False)
    m.update(logits.float().softmax(-1), labels)
    fig, ax = plt.subplots(figsize=(9, 8))
    m.plot(ax=ax, labels=[short_name(c) for c in class_names])
    ax.set_title("Confusion matrix (rows: true class, columns: predicted)")
    return fig


def plot_roc(logits, labels, class_names):
    from torchmetrics.classification import MulticlassROC

    m = MulticlassROC(len(class_names), sync_on_compute=False)
    m.update(logits.float().softmax(-1), labels)
    fig, ax = plt.subplots(figsize=(8, 7))
    # legend: class and its AUC
    m.plot(score=True, ax=ax, labels=[short_name(c) for c in class_names])
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("One-vs-rest ROC curves")
    return fig


def plot_history(
    rows: list[dict],
    reference: list[dict] | None = None,
    reference_name: str = "notebook",
    best: int | None = None,
):
    """Accuracy and loss per epoch, train against validation; LR drops and the `best` epoch
    marked."""
    f = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else math.nan  # noqa: E731
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, what in zip(axes, ("acc", "loss")):
        ax.plot(epochs, [f(r, f"train_{what}") for r in rows], "o-", ms=3, label=f"train {what}")
        # only the validated epochs, so that validating every N epochs still draws a line
        validated = [(e, f(r, f"val_{what}")) for e, r in zip(epochs, rows)]
        validated = [(e, v) for e, v in validated if math.isfinite(v)] or [(math.nan, math.nan)]
        ax.plot(*zip(*validated), "o-", ms=3, label=f"val {what}")
        for ref_rows, color, style, cut_color in [(rows, None, None, "grey")] + (
            [(reference, "C3", "s--", "C3")] if reference else []
        ):
            if ref_rows is not rows:
                for split, c in (("train", "C0"), ("val", "C1")):
                    pts = [
                        (int(r["epoch"]), f(r, f"{split}_{what}"))
                        for r in ref_rows
                        if r.get(f"{split}_{what}") is not None
                    ]
                    if pts:
                        # e.g. the notebook's two known val accuracies: no line
                        sparse = len(pts) < len(ref_rows)
                        ax.plot(
                            *zip(*pts),
                            style[0] if sparse else style,
                            c=c,
                            ms=5,
                            alpha=0.7,
                            label=f"{reference_name} {split} {what}",
                        )
            lrs = [f(r, "lr") for r in ref_rows]
            for i in range(1, len(ref_rows)):
                if lrs[i] < lrs[i - 1]:
                    ax.axvline(int(ref_rows[i - 1]["epoch"]) + 0.5, c=cut_color, ls=":", lw=1)
        if best:
            ax.axvline(best, c="green", ls="--", lw=1, label=f"best epoch {best}")
        ax.set_xlabel("epoch"), ax.set_ylabel(what), ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        cuts = "dotted: learning-rate cut" + (f" (red: {reference_name}'s)" if reference else "")
        ax.set_title(f"{'Accuracy' if what == 'acc' else 'Loss'} ({cuts})")
        ax.legend(fontsize=8)
    return fig


def plot_sweep(sweep_dir: Path, rows: list[dict]):
    """Validation accuracy per epoch, one line per job."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        hist = sweep_dir / r["job"] / "history.csv"
        if hist.exists():
            h = read_csv(hist)
            label = f"{r['job']}: {r['overrides'] or '(defaults)'}"
            epochs, acc = [int(x["epoch"]) for x in h], [float(x["val_acc"]) for x in h]
            ax.plot(epochs, acc, "o-", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val acc")
    ax.grid(alpha=0.3)
    ax.set_title("Validation accuracy per job")
    if ax.lines:
        ax.legend(fontsize=8)
    return fig
