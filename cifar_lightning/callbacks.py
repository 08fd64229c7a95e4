"""Lightning callbacks of our own: the per-epoch history file and Keras-style console lines."""
from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L

from cifar_lightning.report import write_csv

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
        if self._lr is not None and lr < self._lr:
            print(f"\nEpoch {epoch}: ReduceLROnPlateau reducing learning rate to {lr:.4g}.")
        self._lr = lr

    def on_train_epoch_start(self, trainer, pl_module):
        self._report_cut(trainer, trainer.current_epoch)  # the cut was made after the previous epoch
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        get = lambda k: float(m[k]) if k in m else math.nan  # noqa: E731
        row = {"epoch": trainer.current_epoch + 1, "train_loss": get("train/loss"), "train_acc": get("train/acc"),
               "val_loss": get("val/loss"), "val_acc": get("val/acc"), "lr": self._lr,
               "epoch_seconds": round(time.perf_counter() - self._t0, 3)}
        if trainer.is_global_zero:
            self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
            write_csv(self.path, self.rows, HISTORY_COLUMNS)

    def on_train_end(self, trainer, pl_module):
        self._report_cut(trainer, trainer.current_epoch)

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state.get("rows", []))
