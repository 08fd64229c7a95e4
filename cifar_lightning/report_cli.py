"""Rebuild a run's report.html from the files in its directory, with no model and no data pass.

    cifar-report run_dir=outputs/DATE/TIME

Works on cifar-train runs (also ones that predate the page, experiment=fast and test=false runs)
and on cifar-evaluate outputs: the page shows what the directory holds and names what is missing.
A run's temperature is fitted during training only (it needs the model and the validation split):
an older run's page says it has none."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.errors import UserError
from cifar_lightning.report.page import write_page
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)


def rebuild(run_dir: str | Path) -> Path:
    """report.html in run_dir, from its files; returns the page's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir}: not a directory")
    if not any((run_dir / name).is_file() for name in ("metrics.json", "predictions.csv")):
        raise UserError(
            f"run_dir={run_dir}: holds neither metrics.json nor predictions.csv; give a "
            "cifar-train run directory or a cifar-evaluate output"
        )
    return write_page(run_dir)


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="report")
def _main(cfg: DictConfig) -> None:
    check_config(cfg)
    rebuild(cfg.run_dir)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
