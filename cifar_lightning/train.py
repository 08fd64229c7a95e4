"""Train Model S as the notebook did, then test the best weights.

    python -m cifar_lightning.train                                   # the notebook's recipe
    python -m cifar_lightning.train data.source=../shared/data/cifar10-jpeg.tar.gz   # offline
    python -m cifar_lightning.train -m optim=rmsprop,adam             # a sweep; see summary.md
    python -m cifar_lightning.train fidelity=torch                    # PyTorch's defaults instead of Keras's
    python -m cifar_lightning.train resume=last                       # continue the newest run

Everything lands in the run directory (outputs/<date>/<time>/): .hydra/, checkpoints/,
TensorBoard events, history.csv, metrics.json, predictions.csv and the PNG figures."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cifar_lightning.callbacks import History
from cifar_lightning.config import check_targets, check_values, instantiate
from cifar_lightning.data.folder import find_classes
from cifar_lightning.errors import UserError, cli
from cifar_lightning.model.checkpoint import load_checkpoint
from cifar_lightning.model.module import Classifier
from cifar_lightning.model.net import count_params, summary
from cifar_lightning.report import (
    best_epoch,
    history_column,
    plot_history,
    save_figure,
    write_evaluation,
    write_json,
)
from cifar_lightning.wiring import build_datamodule, build_logger_and_callbacks, build_profiler

log = logging.getLogger(__name__)


def resolve_resume(resume: str | None) -> tuple[str, dict] | tuple[None, None]:
    """(path, its hyperparameters) of the checkpoint to continue; "last" -> the newest
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
    # The run continues in the checkpoint's run directory and overwrites files there: make sure it is one.
    folder = path.resolve().parent
    if folder.name != "checkpoints" or not (folder.parent / "history.csv").is_file():
        raise UserError(
            f"resume={resume}: not in a run directory (RUN/checkpoints/NAME.ckpt beside RUN/history.csv), "
            "where the run would continue and write its files; resume from the run's own checkpoints/"
        )
    ckpt = load_checkpoint(
        resume
    )  # refuses, as one error line, a file that weights_only=True can't load
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
    return resume, hp


def check_resume_matches(
    resume: str, hp: dict, class_names: list[str], model_cfg: dict, optim_cfg: dict
) -> None:
    """The data and network must be the checkpoint's, or its weights don't fit (found before fit starts)."""
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


def train(cfg: DictConfig) -> dict:
    """Fit, test the best checkpoint, write the artefacts; return metrics.json's content."""
    check_targets(cfg)
    check_values(cfg)
    resume, resume_hp = resolve_resume(cfg.resume)
    if (
        resume
    ):  # continue in the interrupted run's directory, where its best checkpoint and history are
        cfg.run_dir = str(Path(resume).resolve().parent.parent)
        log.info(f"continuing the run in {cfg.run_dir}")
        log_also_to(Path(cfg.run_dir) / "train.log")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(
        "high"
    )  # TF32 on GPUs that have it, as TF used; no-op on CPU

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    class_names = find_classes(Path(cfg.data.root) / cfg.data.train_dirs[0])
    container = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731 - plain, weights_only-safe
    model_cfg = container(cfg.model)
    if model_cfg["num_classes"] != len(class_names):  # the data decides how many outputs
        log.info(
            f"model.num_classes={model_cfg['num_classes']} -> {len(class_names)}, the class folders in {cfg.data.root}"
        )
        model_cfg["num_classes"] = len(class_names)
    if resume:
        check_resume_matches(resume, resume_hp, class_names, model_cfg, container(cfg.optim))
    model = Classifier(
        model=model_cfg,
        optim=container(cfg.optim),
        scheduler=container(cfg.scheduler),
        class_names=class_names,
        monitor=cfg.monitor,
        image_size=cfg.data.image_size,
        resize=cfg.fidelity.resize,
    )
    trainable, stats = count_params(model.net)
    log.info(summary(model.net))

    logger, callbacks = build_logger_and_callbacks(cfg)
    history = next(c for c in callbacks if isinstance(c, History))
    trainer = instantiate(
        cfg.trainer, "trainer", callbacks=callbacks, logger=logger, profiler=build_profiler(cfg)
    )

    t0 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    train_seconds = (
        time.perf_counter() - t0
    )  # Ctrl-C and SIGTERM leave fit() by SystemExit (errors.cli)

    rows = history.rows
    best = best_epoch(rows, cfg.monitor, cfg.monitor_mode)  # the epoch of best.ckpt
    # best.ckpt: the checkpoint callback that follows the monitor (last.ckpt's has none)
    best_ckpt = next(
        (c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor == cfg.monitor), ""
    )
    if best is None:  # Lightning keeps a non-finite first epoch as best.ckpt (score inf): drop it
        if best_ckpt:
            Path(best_ckpt).unlink(missing_ok=True)
        raise UserError(
            f"training diverged: no epoch had a finite {cfg.monitor}, no best checkpoint kept "
            f"(try a lower optim.lr than {cfg.optim.lr})"
        )
    best_row = next(r for r in rows if r["epoch"] == best)
    metrics = {
        "trainable_params": trainable,
        "non_trainable_params": stats,
        "best_epoch": best,
        "best_val_loss": best_row["val_loss"],
        "best_val_acc": best_row["val_acc"],
        "epochs_run": len(rows),
        "train_seconds": round(train_seconds, 2),
    }
    if trainer.is_global_zero:
        fig = plot_history(rows, monitor=cfg.monitor, mode=cfg.monitor_mode)
        if logger:
            logger.experiment.add_figure("training_curves", fig, close=False)
        save_figure(fig, run_dir / "training_curves.png")

    if cfg.test:
        log.info(
            f"Restoring best weights from the end of epoch {best}: {best_ckpt}"
            if best_ckpt
            else "no best checkpoint (callbacks.checkpoint=null): testing the final weights"
        )
        # a fresh profiler, if any: one keeps what it recorded, and test's report would repeat fit's rows
        trainer.profiler = build_profiler(cfg) or trainer.profiler
        trainer.test(
            model,
            datamodule=datamodule,
            ckpt_path=best_ckpt or None,
            weights_only=True,
            verbose=False,
        )
        test_paths = datamodule.paths[cfg.data.test_dir]
        logits, labels = gather_test_outputs(
            model.test_outputs, trainer.world_size, len(test_paths)
        )
        if not trainer.is_global_zero:
            return metrics
        tb = logger.experiment if logger else None
        metrics = write_evaluation(
            run_dir, logits, labels, test_paths, class_names, extra=metrics, tb_writer=tb
        )
        log.info(
            f"test accuracy {metrics['test_accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  "
            f"AUROC {metrics['auroc_macro']:.4f}"
        )
    elif trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
    if logger:
        flat = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
        }
        logger.log_hyperparams(
            _flatten(container(cfg)), {f"hparams/{k}": v for k, v in flat.items()}
        )
    log.info(f"artefacts in {run_dir}")
    return metrics


def gather_test_outputs(
    outputs: list, world_size: int, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the whole test split in file order. Under DDP each rank holds a chunk of
    every batch (DirectoryBatchSampler), so batches are re-interleaved rank by rank; a last batch
    smaller than world_size repeats its last image at the end, which n_images cuts off."""
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, outputs)
        outputs = [out for per_batch in zip(*everyone) for out in per_batch]
    logits, labels = zip(*outputs)
    return torch.cat(logits)[:n_images], torch.cat(labels)[:n_images]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> float:
    return train(cfg)["best_" + history_column(cfg.monitor)]  # the monitored value, for sweepers


if __name__ == "__main__":
    cli(_main, after_sigterm="continue with resume=PATH/checkpoints/last.ckpt")
