"""The one builder of a run's parts from a config: the datamodule, the module and the Trainer
(with the configured logger and callbacks, plus ours). train and the benchmark's pipeline (c)
assemble through here, so they run the same thing; prepare builds its datamodule here too."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler
from omegaconf import DictConfig, OmegaConf

from cifar_lightning import precision
from cifar_lightning.callbacks import History, RandomState, RunSettings
from cifar_lightning.data.datamodule import CifarDataModule
from cifar_lightning.model.graphed import CudaGraphSteps
from cifar_lightning.model.module import Classifier
from cifar_lightning.targets import instantiate

log = logging.getLogger(__name__)


def plain(node) -> dict:
    """A config node as plain dicts and lists: what checkpoints store (weights_only-safe)."""
    return OmegaConf.to_container(node, resolve=True)


def build_datamodule(cfg: DictConfig) -> CifarDataModule:
    d = cfg.data
    return CifarDataModule(
        root=d.root,
        source=str(d.source),
        train_dirs=list(d.train_dirs),
        val_dir=d.val_dir,
        test_dir=d.test_dir,
        batch_size=d.batch_size,
        image_size=d.image_size,
        cache=d.cache,
        num_workers=d.num_workers,
        skip_bad_files=d.skip_bad_files,
        batching=cfg.fidelity.batching,
        resize=cfg.fidelity.resize,
        seed=cfg.seed,
        eval_batch_size=d.eval_batch_size,
    )


def model_config(cfg: DictConfig, num_classes: int) -> dict:
    """cfg.model as a plain dict, with as many outputs as the data has classes."""
    model = plain(cfg.model)
    if model["num_classes"] != num_classes:
        log.info(f"model.num_classes={model['num_classes']} -> {num_classes}, the class folders")
        model["num_classes"] = num_classes
    return model


def build_module(cfg: DictConfig, class_names: list[str]) -> Classifier:
    return Classifier(
        model=model_config(cfg, len(class_names)),
        optim=plain(cfg.optim),
        scheduler=plain(cfg.scheduler),
        class_names=class_names,
        monitor=cfg.monitor,
        image_size=cfg.data.image_size,
    )


def build_logger_and_callbacks(cfg: DictConfig) -> tuple:
    """The configured logger (or False) and callbacks (the LR monitor only with a logger), then
    ours: history.csv, the RNG state and model.cuda_graph's step. All write into cfg.run_dir."""
    logger = instantiate(cfg.logger, "logger") if cfg.logger.get("_target_") else False
    configured = [
        instantiate(c, f"callbacks.{k}")
        for k, c in cfg.callbacks.items()
        if c is not None and (logger or k != "lr_monitor")
    ]
    ours = [History(Path(cfg.run_dir) / "history.csv"), RandomState(), RunSettings()]
    if cfg.model.get("cuda_graph"):
        ours.append(CudaGraphSteps())
    return logger, configured + ours


def build_trainer(cfg: DictConfig, *callbacks: L.Callback, **overrides) -> L.Trainer:
    """cfg.trainer with build_logger_and_callbacks' logger and callbacks, then `callbacks`;
    `overrides` replace Trainer arguments (the benchmark's max_epochs and precision)."""
    resolve_precision(cfg)
    logger, configured = build_logger_and_callbacks(cfg)
    kwargs = {"logger": logger, "profiler": build_profiler(cfg), **overrides}
    return instantiate(cfg.trainer, "trainer", callbacks=configured + list(callbacks), **kwargs)


def resolve_precision(cfg: DictConfig, resumed: str | None = None) -> str:
    """cfg.trainer.precision=auto, replaced by what it resolves to (precision.resolve) and logged
    with the reason, so metrics.json and the hparams show the precision that ran. A resumed run
    keeps its checkpoint's precision."""
    setting = str(cfg.trainer.precision)
    if setting != precision.AUTO:
        return setting
    if resumed:
        chosen, why = resumed, "the precision the resumed run trained at"
    else:
        chosen, why = precision.resolve(setting, str(cfg.trainer.get("accelerator", "auto")))
    log.info(f"trainer.precision=auto -> {chosen}: {why}")
    cfg.trainer.precision = chosen
    return chosen


PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}


def build_profiler(cfg: DictConfig):
    """trainer.profiler by name, writing its report into the run directory (fit-profile.txt,
    test-profile.txt; fit-profile-<local rank>.txt under DDP; a resumed run appends) instead of
    a few hundred lines onto the console; None when it is off."""
    name = cfg.trainer.get("profiler")
    return PROFILERS[name](dirpath=cfg.run_dir, filename="profile") if name else None
