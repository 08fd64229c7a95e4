"""The one builder of a run's parts from a config: the datamodule, the module and the Trainer
(with the configured logger and callbacks, plus ours). train and the benchmark's pipeline (c)
assemble through here, so they run the same thing; prepare builds its datamodule here too."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler
from omegaconf import DictConfig, OmegaConf

from cifar_lightning import precision
from cifar_lightning.callbacks import History, RandomState
from cifar_lightning.data.datamodule import CifarDataModule
from cifar_lightning.errors import UserError
from cifar_lightning.loggers import build_loggers
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
        alternating_flip=cfg.augment.flip and cfg.augment.alternating_flip,
    )


def model_config(cfg: DictConfig, num_classes: int) -> dict:
    """cfg.model as a plain dict, with as many outputs as the data has classes."""
    model = plain(cfg.model)
    if model["num_classes"] != num_classes:
        log.info(f"model.num_classes={model['num_classes']} -> {num_classes}, the class folders")
        model["num_classes"] = num_classes
    return model


def build_module(cfg: DictConfig, class_names: list[str], precision: str) -> Classifier:
    """The Classifier, recording the precision the Trainer runs at (resolve_precision's), so
    evaluate and predict run at it too."""
    return Classifier(
        model=model_config(cfg, len(class_names)),
        optim=plain(cfg.optim),
        scheduler=plain(cfg.scheduler),
        class_names=class_names,
        loss=plain(cfg.loss),
        augment=plain(cfg.augment),
        tta=plain(cfg.tta),
        whiten=plain(cfg.whiten),
        speed=plain(cfg.speed),
        distill=plain(cfg.distill),
        monitor=cfg.monitor,
        image_size=cfg.data.image_size,
        precision=precision,
    )


def build_logger_and_callbacks(cfg: DictConfig) -> tuple:
    """The configured loggers (a list, maybe empty) and callbacks (the LR monitor only with a
    logger), then ours: history.csv and the RNG state. All write into cfg.run_dir."""
    loggers = build_loggers(cfg)
    configured = [
        instantiate(c, f"callbacks.{k}")
        for k, c in cfg.callbacks.items()
        if c is not None and (loggers or k != "lr_monitor")
    ]
    ours = [History(Path(cfg.run_dir) / "history.csv"), RandomState()]
    return loggers, configured + ours


def build_trainer(
    cfg: DictConfig, *callbacks: L.Callback, precision: str, **overrides
) -> L.Trainer:
    """cfg.trainer at `precision` (resolve_precision's), with build_logger_and_callbacks' logger
    and callbacks, then `callbacks`; `overrides` replace Trainer arguments (the benchmark's
    max_epochs, the learning-rate finder's max_steps)."""
    loggers, configured = build_logger_and_callbacks(cfg)
    kwargs = {
        "logger": loggers or False,
        "profiler": build_profiler(cfg),
        "precision": precision,
        **overrides,
    }
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        # submitit requeues a signalled job itself, and the job continues from last.ckpt
        # (resume.requeued_checkpoint). Lightning's SLURM auto-requeue listens on another signal
        # and would requeue it a second time: off.
        kwargs.setdefault("plugins", [SLURMEnvironment(auto_requeue=False)])
    return instantiate(cfg.trainer, "trainer", callbacks=configured + list(callbacks), **kwargs)


def resolve_precision(cfg: DictConfig, resumed: str | None = None) -> str:
    """The precision the run trains at: cfg.trainer.precision, with auto resolved for this
    machine (precision.resolve) and logged with the reason; a resumed run keeps its checkpoint's.
    Called once, before anything is built; the config is left as it was."""
    setting = str(cfg.trainer.precision)
    if setting != precision.AUTO:
        return setting
    if resumed:
        chosen, why = resumed, "the precision the resumed run trained at"
    else:
        chosen, why = precision.resolve(setting, str(cfg.trainer.get("accelerator", "auto")))
    log.info(f"trainer.precision=auto -> {chosen}: {why}")
    return chosen


def refuse_run_dir_inside_data(run_dir: Path, data_root: Path) -> None:
    """A run directory inside data.root would have its figures read as training images by the
    next run (every folder under a split is a class), so it is refused before anything starts."""
    run, root = run_dir.resolve(), data_root.resolve()
    if run == root or root in run.parents:
        raise UserError(
            f"run directory {run} is inside data.root={root}: its files would be read "
            "as images; put runs elsewhere (hydra.run.dir=..., or launch from another "
            "folder)"
        )


PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}


def build_profiler(cfg: DictConfig):
    """trainer.profiler by name, writing its report into the run directory (fit-profile.txt,
    test-profile.txt; fit-profile-<local rank>.txt under DDP; a resumed run appends) instead of
    a few hundred lines onto the console; None when it is off."""
    name = cfg.trainer.get("profiler")
    return PROFILERS[name](dirpath=cfg.run_dir, filename="profile") if name else None
