"""The sweep summary: summary.csv, summary.md, summary.png and seeds.csv from the summary_row.json
each job writes, and SweepSummary, the Hydra callback that writes them as the jobs end."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from filelock import FileLock
from hydra.experimental.callback import Callback

from cifar_lightning.errors import one_line, to_log_files, user_facing_cause
from cifar_lightning.report.figures import plot_sweep
from cifar_lightning.report.files import atomic_write, save_figure, write_csv, write_json
from cifar_lightning.report.metrics import history_column

log = logging.getLogger(__name__)

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
    """Best job first, by the metric the jobs monitored; a sweep over the monitor itself stays in
    job order, as its values don't compare (so do jobs that recorded no monitor)."""
    monitors = {(r.get("monitor"), r.get("monitor_mode")) for r in rows}
    if len(monitors) != 1 or not isinstance(next(iter(monitors))[0], str):
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
    rows = read_rows(sweep_dir)
    sort_by_monitor(rows)
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
    atomic_write(sweep_dir / "summary.md", ("\n".join(md) + "\n").encode())
    save_figure(plot_sweep(sweep_dir, rows), sweep_dir / "summary.png")
    return rows


# what the summary reads of every row; SweepSummary.on_job_end writes them all
ROW_KEYS = ("job", "overrides", "recipe", "status")
_reported: set[Path] = set()  # broken rows already named: each job's end rereads every row


def read_rows(sweep_dir: Path) -> list[dict]:
    """Every job's summary_row.json. One that is not a row (cut short by a full disk, say) is named
    in one warning line, once per process, and left out: the other jobs are still summarised, and
    the file and the job's run directory stay as they are."""
    rows = []
    for path in sorted(sweep_dir.glob("*/summary_row.json")):
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict) or not all(k in row for k in ROW_KEYS):
                raise ValueError(f"not a summary row: it lacks {', '.join(ROW_KEYS)}")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
            if path not in _reported:
                _reported.add(path)
                log.warning(
                    f"{path}: unreadable summary row ({' '.join(str(exc).split())[:120]}), so job "
                    f"{path.parent.name} is left out of the sweep's summary; its run directory is "
                    "untouched (its metrics.json has its results). Delete the file to leave the "
                    "job out without this warning"
                )
            continue
        rows.append(row)
    return rows


def _cell(key: str, v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if key == "wall_seconds" else f"{v:.4f}"
    return "" if v is None else str(v).replace("|", "\\|")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]
