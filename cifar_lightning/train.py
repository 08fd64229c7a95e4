"""Train Model S as the notebook did, then test the best weights.

    cifar-train                                        # the notebook's recipe (downloads CIFAR-10)
    cifar-train data.source=PATH/TO/cifar10-jpeg.tar.gz   # offline, from a local archive
    cifar-train -m optim=rmsprop,adam                  # a sweep; see its summary.md
    cifar-train fidelity=torch                         # PyTorch's defaults instead of Keras's
    cifar-train resume=last                            # continue the newest run

(`python -m cifar_lightning.train` is the same.) Everything lands in the run directory
(outputs/<date>/<time>/): .hydra/, checkpoints/, TensorBoard events, history.csv, metrics.json,
predictions.csv and the PNG figures."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning import resume as resuming
from cifar_lightning.build import (
    build_datamodule,
    build_module,
    build_profiler,
    build_trainer,
    refuse_run_dir_inside_data,
    resolve_precision,
)
from cifar_lightning.callbacks import RunReport
from cifar_lightning.loggers import recipe_hparams
from cifar_lightning.model.checkpoint import load_weights
from cifar_lightning.model.net import summary
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit, test the best checkpoint, write the artefacts; return metrics.json's content."""
    check_config(cfg)
    ckpt_path, ckpt = resuming.continue_run(cfg)
    precision = resolve_precision(cfg, resumed=resuming.precision_of(ckpt))
    run_dir = Path(cfg.run_dir)
    refuse_run_dir_inside_data(run_dir, Path(cfg.data.root))
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it, as TF used

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    model = build_module(cfg, datamodule.class_names(), precision)
    if ckpt_path:
        resuming.check_matches(
            ckpt_path,
            ckpt["hyper_parameters"],
            model.hparams.class_names,
            model.hparams.model,
            model.hparams.optim,
        )
    log.info(summary(model.net))
    hparams = recipe_hparams(cfg, precision)
    report = RunReport(
        run_dir,
        cfg.monitor,
        cfg.monitor_mode,
        hparams,
        cfg.test,
        page=cfg.report,
        calibration=cfg.report_calibration,
    )
    trainer = build_trainer(cfg, report, precision=precision)
    # Ctrl-C and SIGTERM leave fit() by SystemExit (cli.run)
    report.start_clock()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cfg.test:
        # a fresh profiler, if any: one keeps what it recorded, and test's would repeat fit's rows
        trainer.profiler = build_profiler(cfg) or trainer.profiler
        if report.best_ckpt:
            # The weights best.ckpt holds, loaded here rather than by test(ckpt_path=...): with a
            # weight-averaging callback (callbacks=ema) Lightning would restore the raw weights
            # kept for resume over the average the checkpoint holds, and evaluate reads.
            load_weights(model, report.best_ckpt)
        trainer.test(model, datamodule=datamodule, verbose=False)
    log.info(f"artefacts in {run_dir}")
    return report.metrics


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="config")
def _main(cfg: DictConfig) -> float:
    return train(cfg)[cfg.sweep_objective]  # what a sweeper (hparams_search=optuna) maximises


def main() -> None:
    cli.run(_main, after_sigterm="continue with resume=PATH/checkpoints/last.ckpt")


if __name__ == "__main__":
    main()
