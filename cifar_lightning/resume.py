"""resume=last|PATH: which checkpoint a run continues from, and the checks that it fits.

A resumed run continues in the interrupted run's directory (its best checkpoint, history and log
are there), with the same classes and network, so everything is checked before fit starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cifar_lightning.errors import UserError
from cifar_lightning.model.checkpoint import hparams_of, load_checkpoint

log = logging.getLogger(__name__)


def resolve(resume: str | None) -> tuple[str, dict] | tuple[None, None]:
    """(path, its content) of the checkpoint to continue; "last" -> the newest
    outputs/**/checkpoints/last.ckpt under the launch directory."""
    if not resume:
        return None, None
    if resume == "last":
        found = sorted(
            Path("outputs").glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
        )
        if not found:
            raise UserError(
                "resume=last: no outputs/**/checkpoints/last.ckpt under the current directory"
            )
        resume = str(found[-1])
        log.info(f"resuming from {resume}")
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"resume={resume}: no such checkpoint file")
    # The run continues in the checkpoint's run directory and overwrites files there: make sure
    # it is one.
    folder = path.resolve().parent
    if folder.name != "checkpoints" or not (folder.parent / "history.csv").is_file():
        raise UserError(
            f"resume={resume}: not in a run directory (RUN/checkpoints/NAME.ckpt beside "
            "RUN/history.csv), where the run would continue and write its files; resume from "
            "the run's own checkpoints/"
        )
    # refuses, as one error line, a file that weights_only=True can't load
    ckpt = load_checkpoint(resume)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not (
        isinstance(hp, dict)
        and {"model", "optim", "class_names"} <= hp.keys()
        and ckpt.get("optimizer_states")
    ):
        raise UserError(
            f"resume={resume}: not a cifar_lightning training checkpoint (no hyperparameters or "
            "optimizer state, as checkpoints/last.ckpt has)"
        )
    return resume, ckpt


def precision_of(ckpt: dict | None) -> str | None:
    """The precision the checkpoint's run trained at, or None."""
    return hparams_of(ckpt)["precision"] if ckpt else None


def check_matches(
    resume: str, hp: dict, class_names: list[str], model_cfg: dict, optim_cfg: dict
) -> None:
    """The data and network must be the checkpoint's, or its weights don't fit."""
    if [str(c) for c in hp["class_names"]] != class_names:
        raise UserError(
            f"resume={resume}: its classes {list(hp['class_names'])} differ from the class folders "
            f"in data.root: {class_names}"
        )
    pairs = [
        (f"model.{k}", model_cfg.get(k), hp["model"].get(k))
        for k in ("name", "widths", "hidden", "num_classes")
    ]
    pairs.append(("optim._target_", optim_cfg.get("_target_"), hp["optim"].get("_target_")))
    for key, mine, theirs in pairs:
        if mine != theirs:
            raise UserError(
                f"resume={resume}: {key}={mine}, but the checkpoint was trained with {theirs}"
            )


def log_also_to(path: Path) -> None:
    """A resumed run writes its messages to the original run's train.log too, beside its artefacts
    (Hydra's file handler writes to this invocation's own directory)."""
    hydra_files = [
        h
        for h in logging.getLogger().handlers  # Hydra's: <run dir>/train.log
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).name == path.name
    ]
    if hydra_files and all(Path(h.baseFilename) != path.resolve() for h in hydra_files):
        handler = logging.FileHandler(path)  # appends
        handler.setFormatter(hydra_files[0].formatter)
        logging.getLogger().addHandler(handler)
        log.info(f"resumed from {Path(hydra_files[0].baseFilename).parent}")


def requeued_checkpoint(run_dir: str | Path) -> str | None:
    """checkpoints/last.ckpt of a requeued submitit job. Preempted or timed out, the job was
    resubmitted by submitit (the launcher's checkpoint(), up to max_num_timeout times) into the
    same run directory; Hydra gives every new job a new directory, so a first start finds none."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if os.environ.get("SUBMITIT_EXECUTOR") and last.is_file():
        log.info(f"requeued job: continuing from {last}")
        return str(last)
    return None


def continue_run(cfg) -> tuple[str, dict] | tuple[None, None]:
    """(checkpoint path, its content) for cfg.resume, or for a requeued job its last.ckpt, or
    (None, None). A resumed run moves cfg.run_dir to the interrupted run's directory and logs to
    its train.log too."""
    # a requeued job's own last.ckpt first: a resume= it was launched with is older than it
    path, ckpt = resolve(requeued_checkpoint(cfg.run_dir) or cfg.resume)
    if path:
        cfg.run_dir = str(Path(path).resolve().parent.parent)
        log.info(f"continuing the run in {cfg.run_dir}")
        log_also_to(Path(cfg.run_dir) / "train.log")
    return path, ckpt
