"""Lightning's learning-rate finder (a range test) on the training config.

    cifar-lr-find data.root=data/cifar10                       # RMSprop, the notebook's recipe
    cifar-lr-find data.root=data/cifar10 optim=adam max_lr=0.1 num_training=200

(`python -m cifar_lightning.lr_find` is the same.) The datamodule, module and Trainer are built
as train builds them (cifar_lightning.build). From min_lr the learning rate grows every optimizer
step up to max_lr (Lightning's Tuner swaps in its own schedule and steps it), and the loss of
each step is recorded, smoothed as Lightning does (a running mean, beta 0.98). Written to the run
directory (outputs/lr_find/<date>/<time>/): lr_find.png (loss against learning rate, the
suggestion in red), lr_find.csv (lr, loss) and lr_find.json (the suggestion: the steepest descent
of the loss). The weights and the optimizer end as they started; nothing is trained for real."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.build import (
    build_datamodule,
    build_module,
    build_trainer,
    refuse_run_dir_inside_data,
    resolve_precision,
)
from cifar_lightning.errors import UserError
from cifar_lightning.report.files import save_figure, write_csv, write_json
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)

# Lightning's LRFinder.suggestion() skips the first 10 and the last recorded loss
SUGGESTION_NEEDS = 13


def check_lr_find(cfg: DictConfig) -> None:
    """What Lightning's finder can't run under, as one `error:` line (schema.LRFindConfig checks
    the finder's own keys)."""
    if cfg.trainer.get("fast_dev_run"):
        raise UserError(
            f"trainer.fast_dev_run={cfg.trainer.fast_dev_run}: Lightning skips the learning-rate "
            "finder under it; run without debug=fdr"
        )


def lr_find(cfg: DictConfig) -> dict:
    """Run the range test; write lr_find.png, .csv and .json; return lr_find.json's content."""
    check_config(cfg)
    check_lr_find(cfg)
    precision = resolve_precision(cfg)
    run_dir = Path(cfg.run_dir)
    refuse_run_dir_inside_data(run_dir, Path(cfg.data.root))
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")  # as train

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    model = build_module(cfg, datamodule.class_names(), precision)
    # No logger (nothing to log: Lightning's finder mutes it anyway). max_steps: the finder counts
    # steps, not epochs, and a schedule planned for the whole fit (one-cycle) needs a finite one;
    # the finder replaces that schedule with its own.
    trainer = build_trainer(
        cfg, precision=precision, logger=False, max_epochs=-1, max_steps=cfg.num_training
    )
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=datamodule,
        min_lr=cfg.min_lr,
        max_lr=cfg.max_lr,
        num_training=cfg.num_training,
        mode=cfg.mode,
        early_stop_threshold=cfg.early_stop_threshold,
        update_attr=False,  # the rate is optim.lr, set by the user; the suggestion is reported
    )
    lrs, losses = finder.results["lr"], finder.results["loss"]
    suggestion = finder.suggestion() if len(lrs) >= SUGGESTION_NEEDS else None
    write_csv(
        run_dir / "lr_find.csv",
        [{"lr": lr, "loss": loss} for lr, loss in zip(lrs, losses)],
        ["lr", "loss"],
    )
    save_figure(finder.plot(suggest=suggestion is not None), run_dir / "lr_find.png")
    result = {
        "suggestion": suggestion,
        "optim": str(cfg.optim._target_),
        "optim_lr": cfg.optim.get("lr"),
        "min_lr": cfg.min_lr,
        "max_lr": cfg.max_lr,
        "mode": cfg.mode,
        "num_training": cfg.num_training,
        "steps": len(lrs),
        "lr_reached": lrs[-1] if lrs else None,
        "finite_losses": sum(math.isfinite(x) for x in losses),
    }
    write_json(run_dir / "lr_find.json", result)
    if len(lrs) < cfg.num_training:
        log.info(
            f"the loss diverged after {len(lrs)} of {cfg.num_training} steps, at "
            f"lr {lrs[-1]:.3g} (early_stop_threshold={cfg.early_stop_threshold})"
        )
    if suggestion is None:
        log.warning(
            f"no suggested learning rate: {len(lrs)} steps recorded, the suggestion needs at "
            f"least {SUGGESTION_NEEDS} with finite losses (raise num_training or max_lr)"
        )
    else:
        log.info(
            f"suggested learning rate {suggestion:.3g} (steepest loss descent; optim.lr is "
            f"{cfg.optim.get('lr')}): try optim.lr={suggestion:.2g}"
        )
    log.info(f"artefacts in {run_dir}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="lr_find")
def _main(cfg: DictConfig) -> None:
    lr_find(cfg)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
