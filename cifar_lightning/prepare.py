"""Get everything before training ready under data.root: build the notebook's layout from
data.source, check the splits' class folders and every image, and (data.cache=true) decode each
split into its cache file, so the first training run starts warm.

    python -m cifar_lightning.prepare data.root=data/cifar10 data.source=PATH/TO/cifar10-jpeg.tar.gz
    python -m cifar_lightning.prepare data.source=PATH/cifar-10-python.tar.gz
    python -m cifar_lightning.prepare                       # downloads (needs internet)
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.build import build_datamodule
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    check_config(cfg)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()  # the layout
    # classes across splits, every image decoded once: into the caches, or checked
    datamodule.setup()
    kind = "cached" if cfg.data.cache else "checked"
    log.info(
        f"ready: {cfg.data.root} ({len(datamodule.classes)} classes, "
        + ", ".join(f"{name} {len(paths):,}" for name, paths in datamodule.paths.items())
        + f" images, {kind})"
    )


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
