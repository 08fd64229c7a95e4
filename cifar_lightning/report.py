"""Run artefacts from tensors and paths (never from a Trainer), so train and evaluate write the
same files through the same code: metrics.json, predictions.csv, history.csv and PNG figures,
plus the sweep summary (summary.csv / .md / .png) as a Hydra callback."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from filelock import FileLock  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from cifar_lightning.errors import one_line, to_log_files, user_facing_cause  # noqa: E402


# ---------------------------------------------------------------- files, written atomically
def _atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artefacts are for people to open
        os.replace(tmp, path)
    finally:  # a failed write (disk full, say) leaves the old file and no temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write(path, buf.getvalue().encode())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------- test metrics (torchmetrics)
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


# ---------------------------------------------------------------- figures
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


def short_name(name: str) -> str:
    return name.split("_", 1)[1] if name[:3].isdigit() and "_" in name else name


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


# ---------------------------------------------------------------- sweep summary
SUMMARY_COLUMNS = [
    "job",
    "overrides",
    "seed",
    "status",
    "error",
    "best_epoch",
    "best_val_loss",
    "best_val_acc",
    "test_accuracy",
    "f1_macro",
    "auroc_macro",
    "epochs_run",
    "wall_seconds",
]


class SweepSummary(Callback):
    """Hydra callback: after each multirun job, rewrite summary.csv/.md/.png in the sweep directory,
    so the summary exists even when a job fails or the sweep is cut short; and once more at the
    multirun's end. Jobs of a parallel launcher (joblib, submitit) finish in any order, at once:
    each writes its own summary_row.json, and the summary is rebuilt from all of them under a
    file lock."""

    def __init__(self):
        self._start: dict[str, float] = {}

    def on_job_start(self, config, **kwargs):
        self._start[config.hydra.runtime.output_dir] = time.perf_counter()

    def on_job_end(self, config, job_return, **kwargs):
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        row = {
            "job": run_dir.name,
            "overrides": " ".join(config.hydra.overrides.task),
            # the recipe: what the job ran apart from its seed, so a seed sweep can be averaged
            "recipe": recipe_of(config.hydra.overrides.task),
            "seed": config.get("seed"),
            "monitor": config.get("monitor"),
            "monitor_mode": config.get("monitor_mode"),
            "wall_seconds": round(
                time.perf_counter() - self._start.pop(str(run_dir), time.perf_counter()), 1
            ),
        }
        if job_return.status == JobStatus.COMPLETED:
            row["status"] = "completed"
        else:
            err = job_error(job_return)
            row["status"] = "failed"
            row["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            # into this job's <job>.log while Hydra's handler for it is still open (cli.run
            # prints it on the console at the end)
            to_log_files(one_line(user_facing_cause(err) or err))
        if (run_dir / "metrics.json").exists():
            m = json.loads((run_dir / "metrics.json").read_text())
            row.update({k: m.get(k) for k in SUMMARY_COLUMNS if k in m})
        write_json(run_dir / "summary_row.json", row)
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and any(sweep_dir.glob("*/summary_row.json")):
            write_summary(sweep_dir)
        (sweep_dir / ".summary.lock").unlink(missing_ok=True)  # every job has ended


def job_error(job_return) -> BaseException:
    """The exception a failed job raised: JobReturn.return_value re-raises it."""
    try:
        job_return.return_value
    except BaseException as exc:  # noqa: BLE001 - whatever the job raised is its error
        return exc
    raise ValueError("job_error() of a job that did not fail")


SEED_STAT_COLUMNS = [
    "test_accuracy",
    "f1_macro",
    "auroc_macro",
    "best_val_loss",
    "best_epoch",
    "epochs_run",
    "wall_seconds",
]


def recipe_of(overrides) -> str:
    """A job's overrides without its seed: the jobs of a seed sweep share it."""
    return " ".join(o for o in overrides if not o.startswith("seed=")) or "(defaults)"


def seed_stats(rows: list[dict]) -> list[dict]:
    """Per recipe (a job's overrides without seed=), the mean and sample std of each metric over its
    completed jobs; the std is None for a single seed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "recipe" not in r:  # a row written before rows named their recipe: split its overrides
            words = r.get("overrides", "").split()
            r["recipe"] = recipe_of(words)
            r["seed"] = next((w[5:] for w in words if w.startswith("seed=")), None)
        if r.get("status") == "completed":
            groups.setdefault(r["recipe"], []).append(r)
    out = []
    for recipe, jobs in groups.items():
        jobs.sort(key=lambda j: str(j.get("seed")))
        row = {"recipe": recipe, "seeds": " ".join(str(j.get("seed")) for j in jobs)}
        for k in SEED_STAT_COLUMNS:
            values = [float(j[k]) for j in jobs if j.get(k) is not None]
            if values:
                row[k] = statistics.mean(values)
                row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(row)
    return out


def fmt_mean_std(key: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    f = ".1f" if key in ("wall_seconds", "best_epoch", "epochs_run") else ".4f"
    return format(mean, f) + ("" if std is None else f" ± {std:{f}}")


def sort_by_monitor(rows: list[dict]) -> None:
    """Best job first, by the metric the jobs monitored (rows from before monitors were recorded:
    val/loss); a sweep over the monitor itself stays in job order, as its values don't compare."""
    monitors = {(r.get("monitor") or "val/loss", r.get("monitor_mode") or "min") for r in rows}
    if len(monitors) != 1:
        rows.sort(key=lambda r: int(r["job"]) if str(r["job"]).isdigit() else 0)
        return
    ((monitor, mode),) = monitors
    key, sign = "best_" + history_column(monitor), -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.get(key) is None, sign * (r.get(key) or 0.0)))


def write_summary(sweep_dir: Path) -> list[dict]:
    """summary.csv, summary.md and summary.png (and seeds.csv) from the jobs' summary rows, under
    the sweep's lock: two jobs ending at once would otherwise each write a summary missing the
    other's row."""
    with FileLock(str(sweep_dir / ".summary.lock")):
        return _write_summary(sweep_dir)


def _write_summary(sweep_dir: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary_row.json"))]
    sort_by_monitor(rows)
    # also names the recipe and seed of rows written before rows recorded them
    stats = seed_stats(rows)
    write_csv(sweep_dir / "summary.csv", rows, SUMMARY_COLUMNS)
    md = md_table(SUMMARY_COLUMNS, [[_cell(c, r.get(c)) for c in SUMMARY_COLUMNS] for r in rows])
    if stats:
        stat_columns = [c for k in SEED_STAT_COLUMNS for c in (k, f"{k}_std")]
        write_csv(sweep_dir / "seeds.csv", stats, ["recipe", "seeds", *stat_columns])
        md += [
            "",
            "Mean ± std (sample, n-1) over seeds: the jobs that finished, grouped by their "
            "overrides apart from `seed=`.",
            "",
        ]
        cells = [
            [_cell("recipe", r["recipe"]), r["seeds"]]
            + [fmt_mean_std(k, r.get(k), r.get(f"{k}_std")) for k in SEED_STAT_COLUMNS]
            for r in stats
        ]
        md += md_table(["recipe", "seeds", *SEED_STAT_COLUMNS], cells)
    _atomic_write(sweep_dir / "summary.md", ("\n".join(md) + "\n").encode())
    save_figure(plot_sweep(sweep_dir, rows), sweep_dir / "summary.png")
    return rows


def _cell(key: str, v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if key == "wall_seconds" else f"{v:.4f}"
    return "" if v is None else str(v).replace("|", "\\|")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


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
