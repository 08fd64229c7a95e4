"""Lightning callbacks of our own: the per-epoch history file and Keras-style console lines."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cifar_lightning.errors import UserError
from cifar_lightning.report import write_csv

log = logging.getLogger(__name__)
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds"]


class History(L.Callback):
    """Writes history.csv after every epoch (so an interrupted run keeps it) and prints each
    learning-rate cut as Keras's ReduceLROnPlateau did. Epochs are numbered from 1, as Keras's."""

    def __init__(self, path: str | Path):
        self.path, self.rows, self._t0, self._lr = Path(path), [], 0.0, None

    def _current_lr(self, trainer) -> float:
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    def _report_cut(self, trainer, epoch: int) -> None:
        lr = self._current_lr(trainer)
        plateau = any(
            isinstance(c.scheduler, ReduceLROnPlateau) for c in trainer.lr_scheduler_configs
        )
        if plateau and self._lr is not None and lr < self._lr:  # not one-cycle's every-step changes
            log.info(f"Epoch {epoch}: ReduceLROnPlateau reducing learning rate to {lr:.4g}.")
        self._lr = lr

    def on_train_epoch_start(self, trainer, pl_module):
        self._report_cut(
            trainer, trainer.current_epoch
        )  # the cut was made after the previous epoch
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        if "train/loss" in m and not torch.isfinite(m["train/loss"]):
            log.warning(
                f"Training diverged: train/loss is {float(m['train/loss'])} in epoch {trainer.current_epoch + 1}; "
                "stopping (try a lower optim.lr). Non-finite epochs are never the best checkpoint."
            )
            trainer.should_stop = True
        if "val/loss" not in m or any(r["epoch"] == trainer.current_epoch + 1 for r in self.rows):
            return  # a resumed run replays the end of its last epoch: the row is already there
        get = lambda k: float(m[k]) if k in m else math.nan  # noqa: E731
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": get("train/loss"),
            "train_acc": get("train/acc"),
            "val_loss": get("val/loss"),
            "val_acc": get("val/acc"),
            "lr": self._lr,
            "epoch_seconds": round(time.perf_counter() - self._t0, 3),
        }
        self.rows.append(row)  # every rank keeps the rows (they agree: metrics are synced)
        if trainer.is_global_zero:
            write_csv(self.path, self.rows, HISTORY_COLUMNS)

    def on_train_end(self, trainer, pl_module):
        self._report_cut(trainer, trainer.current_epoch)

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state.get("rows", []))


class RandomState(L.Callback):
    """Puts torch's global RNG (dropout masks) into every checkpoint and restores it on resume, so
    a resumed run draws the same masks as an uninterrupted one. Lightning does not save it."""

    def state_dict(self):
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class InterruptCheckpoint(L.Callback):
    """Saves the state at the moment of Ctrl-C, SIGTERM or a crash, for inspection. Resume from
    last.ckpt (the end of the last whole epoch) to continue exactly. Unlike Lightning's
    OnExceptionCheckpoint it does not make fit() resume from it implicitly."""

    def __init__(self, path: str | Path):
        self.path, self._trained = Path(path), False

    def on_train_batch_end(self, *args, **kwargs):
        self._trained = True

    def on_exception(self, trainer, pl_module, exception):
        # A config or data mistake (its error line says what to fix), or a failure before any step
        # trained: nothing new to keep, and an earlier interrupted.ckpt of a resumed run stays as it was.
        if isinstance(exception, UserError) or not self._trained:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state, for inspection
        last = self.path.parent / "last.ckpt"
        hint = (
            f"continue with resume={last}"
            if last.exists()
            else "no epoch had finished, so there is nothing to resume"
        )
        log.warning(f"{type(exception).__name__}: state saved to {self.path}; {hint}")
