"""report.html: one self-contained page per run directory (and per evaluate output), rendered by
Jinja2 from templates/report.html.j2. Every figure is a data: URI and there is no stylesheet,
script or font to fetch, so the page opens anywhere, offline. It shows what the directory holds
and names what is missing.

    write_page(run_dir)            # the page from the directory's files
    write_page_safely(run_dir)     # the same, as train and evaluate call it: never raises"""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path

import jinja2

from cifar_lightning.report.analysis import (
    Gallery,
    Predictions,
    calibration,
    confident_mistakes,
    confused_pairs,
    describe_pair,
    label_of,
    pair_examples,
    png_data_uri,
    ranked_classes,
    vehicles_and_animals,
)
from cifar_lightning.report.calibration import ECE_BINS, plot_reliability
from cifar_lightning.report.files import atomic_write

log = logging.getLogger(__name__)

PAGE = "report.html"
FIGURES = {
    "training_curves": "Training curves",
    "confusion_matrix": "Confusion matrix",
    "roc_curves": "ROC curves",
}
HEADLINE = [  # metrics.json key, label, format
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("f1_macro", "macro F1", "{:.4f}"),
    ("auroc_macro", "macro AUROC", "{:.4f}"),
    ("epochs_run", "epochs", "{}"),
    ("best_epoch", "best epoch", "{}"),
    ("train_seconds", "training time", "{:.1f} s"),
    ("hardware", "hardware", "{}"),
    ("precision", "precision", "{}"),
]
TOP_PAIRS_WITH_EXAMPLES = 3


def write_page_safely(run_dir: str | Path, hparams: dict | None = None) -> Path | None:
    """write_page, as a run calls it: a failure is one warning, never the run's failure."""
    try:
        return write_page(run_dir, hparams)
    except Exception as exc:  # noqa: BLE001 - the page is a reading aid; the run's files stand
        log.warning(
            f"{PAGE} not written ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            f"the run's other files are complete; rebuild it with cifar-report run_dir={run_dir}"
        )
        return None


def write_page(run_dir: str | Path, hparams: dict | None = None) -> Path:
    """report.html in run_dir from its files; `hparams` are the recipe's (loggers.recipe_hparams),
    else read from the run's .hydra/config.yaml when it has one."""
    run_dir = Path(run_dir)
    html = render(page_context(run_dir, hparams))
    path = run_dir / PAGE
    atomic_write(path, html.encode("utf-8"))
    log.info(f"report: {path}")
    return path


def render(context: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cifar_lightning.report", "templates"),
        autoescape=True,  # class names and paths are the user's: never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**context)


def read_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def recipe_of_run(run_dir: Path, metrics: dict) -> dict | None:
    """The recipe's hparams of a training run, from its .hydra/config.yaml (None if it has none,
    as evaluate outputs and runs started from Python don't)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    from cifar_lightning.loggers import recipe_hparams

    cfg = OmegaConf.load(path)
    if "trainer" not in cfg:  # not a training run's config
        return None
    return recipe_hparams(cfg, metrics.get("precision") or cfg.trainer.get("precision"))


def fmt(value, spec: str = "{:.4f}") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "undefined"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def figure_uri(fig) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_data_uri(buf.getvalue())


def page_context(run_dir: Path, hparams: dict | None) -> dict:
    metrics = read_metrics(run_dir)
    missing: list[str] = []
    kind = "evaluation" if metrics and "ckpt_path" in metrics else "training run"
    if metrics is None:
        missing.append("metrics.json: no metrics (the run did not finish its fit, or failed)")
        metrics = {}
    if kind == "training run":
        if hparams is None:
            try:
                hparams = recipe_of_run(run_dir, metrics)
            except Exception as exc:  # noqa: BLE001 - an unreadable config costs one line
                missing.append(f".hydra/config.yaml could not be read ({type(exc).__name__})")
        if hparams is None:
            missing.append("the recipe: no .hydra/config.yaml in the run directory")
        if not (run_dir / "checkpoints" / "best.ckpt").is_file():
            missing.append(
                "checkpoints/best.ckpt: none kept (callbacks.checkpoint=null, as experiment=fast "
                "sets): the test phase scored the final weights"
            )
    else:
        missing.append(
            "training curves, epochs and the recipe: this is an evaluation of "
            f"{metrics.get('ckpt_path')} on {metrics.get('eval_dir')}"
        )
    if metrics and "test_accuracy" not in metrics:
        missing.append("test metrics: the run had no test phase (test=false)")
    if metrics and "hardware" not in metrics:
        missing.append("hardware: metrics.json has no `hardware` (a run from an older version)")
    headline = [
        (label, fmt(metrics.get(key), spec)) for key, label, spec in HEADLINE if key in metrics
    ]
    figures = []
    for name, title in FIGURES.items():
        path = run_dir / f"{name}.png"
        if path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
            figures.append({"id": name, "title": title, "src": png_data_uri(path.read_bytes())})
        elif not (name == "training_curves" and kind == "evaluation"):
            missing.append(f"{name}.png")
    per_class = metrics.get("per_class") or {}
    per_class_rows = [
        {
            "name": label_of(name),
            "cells": [fmt(row.get(k)) for k in ("precision", "recall", "f1", "auroc")]
            + [fmt(row.get("support"), "{}")],
        }
        for name, row in per_class.items()
    ]
    rankings = [
        (what, ranked)
        for what, key in (("F1", "f1"), ("AUROC", "auroc"))
        if (ranked := ranked_classes(per_class, key)) is not None
    ]
    reading = analysis = cal = None
    predictions = run_dir / "predictions.csv"
    if predictions.is_file():
        pred = Predictions.read(predictions)
        gallery = Gallery.for_paths(pred.paths)
        pairs = confused_pairs(pred)
        for p in pairs:
            p["text"] = describe_pair(p)
        reading = {"pairs": pairs, "groups": vehicles_and_animals(pred)}
        analysis = {
            "mistakes": confident_mistakes(pred, gallery),
            "pair_rows": [
                {"pair": p, "examples": pair_examples(pred, gallery, p)}
                for p in pairs[:TOP_PAIRS_WITH_EXAMPLES]
            ],
            "skipped": gallery.skipped,
            "root": str(gallery.root) if gallery.root else None,
        }
        cal = calibration_section(pred, metrics)
    else:
        missing.append(
            "predictions.csv: no test predictions, so no confused pairs, mistakes or calibration"
        )
    if metrics and "temperature" not in metrics and predictions.is_file():
        why = (
            "an evaluation has no validation split to fit it on"
            if kind == "evaluation"
            else "report_calibration=false, or a run from an older version"
        )
        missing.append(f"the fitted temperature: {why}")
    return {
        "title": f"{kind}: {run_dir.resolve().name}",
        "run_dir": str(run_dir.resolve()),
        "kind": kind,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "headline": headline,
        "hparams": sorted((hparams or {}).items()),
        "figures": figures,
        "per_class": per_class_rows,
        "rankings": rankings,
        "reading": reading,
        "analysis": analysis,
        "calibration": cal,
        "missing": missing,
    }


def calibration_section(pred: Predictions, metrics: dict) -> dict:
    temperature = metrics.get("temperature")
    cal = calibration(pred, temperature)
    curves = {f"test (ECE {cal['ece']:.4f})": cal["bins"]}
    # metrics.json's value comes from the logits; predictions.csv's rounded probabilities give
    # nearly the same, for a run that only recorded the temperature
    scaled = metrics.get("ece_temperature_scaled", cal.get("ece_scaled"))
    if temperature:
        curves[f"scaled by T={temperature:.3f} (ECE {scaled:.4f})"] = cal["bins_scaled"]
    return {
        "ece": cal["ece"],
        "ece_scaled": scaled,
        "temperature": temperature,
        "seconds": metrics.get("calibration_seconds"),
        "images": metrics.get("calibration_images"),
        "bins": ECE_BINS,
        "diagram": figure_uri(plot_reliability(curves)),
    }
