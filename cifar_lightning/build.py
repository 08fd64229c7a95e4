"""What more than one entry point builds, so that entry points stay leaves that never import each
other: train, prepare and bench build the datamodule (and train and bench the logger and callbacks)
from the same config; evaluate and predict share their options, the device and batched inference."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler
from omegaconf import DictConfig

from cifar_lightning.callbacks import History, RandomState
from cifar_lightning.config import instantiate, one_of, whole
from cifar_lightning.data.datamodule import CifarDataModule
from cifar_lightning.data.folder import RESIZES
from cifar_lightning.errors import UserError


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


def build_logger_and_callbacks(cfg: DictConfig) -> tuple:
    """The configured logger (or False) and callbacks (the LR monitor only with a logger), then the
    history file and the RNG state: what train's Trainer gets, and bench's pipeline (c). All of them
    write into cfg.run_dir."""
    run_dir = Path(cfg.run_dir)
    logger = instantiate(cfg.logger, "logger") if cfg.logger.get("_target_") else False
    callbacks = [
        instantiate(c, f"callbacks.{k}")
        for k, c in cfg.callbacks.items()
        if c is not None and (logger or k != "lr_monitor")
    ]
    return logger, callbacks + [History(run_dir / "history.csv"), RandomState()]


PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}


def build_profiler(cfg: DictConfig):
    """trainer.profiler by name, writing its report into the run directory (fit-profile.txt,
    test-profile.txt; fit-profile-<local rank>.txt under DDP; a resumed run appends) instead of a few
    hundred lines onto the console; None when it is off."""
    name = cfg.trainer.get("profiler")
    return PROFILERS[name](dirpath=cfg.run_dir, filename="profile") if name else None


# evaluate's and predict's own values, checked before the checkpoint loads
INFERENCE_RULES = {
    "batch_size": whole(1),
    "top_k": whole(1),
    "device": one_of("auto", "cpu", "cuda"),
    "resize": one_of(*RESIZES),
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA GPU is usable here; use device=cpu or device=auto")
    return torch.device(name)


@torch.no_grad()
def predict_logits(
    net, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    net = net.to(device)
    return torch.cat(
        [
            net(images[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
