"""Build the notebook's layout under data.root from data.source, without training.

    python -m cifar_lightning.prepare data.root=data/cifar10 data.source=../shared/data/cifar10-jpeg.tar.gz
    python -m cifar_lightning.prepare data.source=PATH/cifar-10-python.tar.gz
    python -m cifar_lightning.prepare                       # downloads (needs internet)
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from cifar_lightning.data.prepare import ensure_layout
from cifar_lightning.errors import cli


log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    d = cfg.data
    root = ensure_layout(d.root, str(d.source), [*d.train_dirs, d.val_dir, d.test_dir])
    log.info(f"layout ready: {root}")


if __name__ == "__main__":
    cli(_main)
