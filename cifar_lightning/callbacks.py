"""Lightning callbacks of our own: the per-epoch history file with Keras-style console lines, the
RNG state in checkpoints, the state at an interrupt, and the run's report (metrics.json,
predictions.csv, the figures)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cifar_lightning.errors import UserError
from cifar_lightning.loggers import log_figure, log_hparams
from cifar_lightning.model.net import count_params
from cifar_lightning.report.calibration import (
    expected_calibration_error,
    hardware_name,
    temperature_scaling,
)
from cifar_lightning.report.figures import plot_history
from cifar_lightning.report.files import save_figure, write_csv, write_json
from cifar_lightning.report.metrics import best_epoch, write_evaluation
from cifar_lightning.report.page import write_page_safely

log = logging.getLogger(__name__)
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds"]


class History(L.Callback):
    """Writes history.csv after every epoch (so an interrupted run keeps it) and prints each
    learning-rate cut as Keras's ReduceLROnPlateau did. Epochs are numbered from 1, as Keras's."""

    def __init__(self, path: str | Path):
        self.path, self.rows, self._t0, self._lr = Path(path), [], 0.0, None
        self._validated_epoch = None  # the last epoch whose validation ran

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

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
        # the cut was made after the previous epoch
        self._report_cut(trainer, trainer.current_epoch)
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        if "train/loss" in m and not torch.isfinite(m["train/loss"]):
            log.warning(
                f"Training diverged: train/loss is {float(m['train/loss'])} in epoch "
                f"{trainer.current_epoch + 1}; stopping (try a lower optim.lr). Non-finite epochs "
                "are never the best checkpoint."
            )
            trainer.should_stop = True
        if any(r["epoch"] == trainer.current_epoch + 1 for r in self.rows):
            return  # a resumed run replays the end of its last epoch: the row is already there
        # under trainer.check_val_every_n_epoch an epoch without validation still holds the last
        # validation's metrics: its row leaves them empty
        validated = self._validated_epoch == trainer.current_epoch

        def get(key: str) -> float:
            fresh = validated or not key.startswith("val/")
            return float(m[key]) if key in m and fresh else math.nan

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
        # trained: nothing new to keep, and an earlier interrupted.ckpt of a resumed run stays as it
        # was.
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


class RunReport(L.Callback):
    """The run's report, in one place: after fit, the best epoch (as best.ckpt has it), the fit's
    figures and metrics.json; after test, the test predictions gathered over ranks in file order,
    metrics.json with the test metrics, predictions.csv, the figures and the logger's hparams;
    last, report.html (`page`), after a temperature fitted on the validation split
    (`calibration`). `metrics` is metrics.json's content, what train() returns."""

    def __init__(
        self,
        run_dir: str | Path,
        monitor: str,
        mode: str,
        hparams: dict,
        test: bool,
        page: bool = True,
        calibration: bool = True,
    ):
        self.run_dir, self.monitor, self.mode = Path(run_dir), monitor, mode
        self.hparams, self.test = hparams, test
        self.page, self.calibration = page, calibration
        self.history: History | None = None  # the trainer's, found at fit start
        self.metrics: dict = {}
        self.best_ckpt, self.best = "", None
        self._t0, self._outputs = 0.0, []

    def start_clock(self) -> None:
        """Called right before trainer.fit: train_seconds then counts all of fit, the data's
        setup included, as it did when train() timed fit itself."""
        self._t0 = time.perf_counter()

    def on_fit_start(self, trainer, pl_module):
        self.history = next(c for c in trainer.callbacks if isinstance(c, History))
        self._t0 = self._t0 or time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        train_seconds = time.perf_counter() - self._t0
        rows = self.history.rows
        self.best = best_epoch(rows, self.monitor, self.mode)  # the epoch of best.ckpt
        # best.ckpt: the checkpoint callback that follows the monitor (last.ckpt's has none)
        self.best_ckpt = next(
            (c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor == self.monitor),
            "",
        )
        if self.best is None:  # Lightning keeps a non-finite first epoch as best.ckpt: drop it
            if self.best_ckpt:
                Path(self.best_ckpt).unlink(missing_ok=True)
            lr = pl_module.hparams.optim.get("lr")
            raise UserError(
                f"training diverged: no epoch had a finite {self.monitor}, no best "
                f"checkpoint kept (try a lower optim.lr than {lr})"
            )
        best_row = next(r for r in rows if r["epoch"] == self.best)
        trainable, stats = count_params(pl_module.net)
        self.metrics = {
            "precision": str(trainer.precision),
            "trainable_params": trainable,
            "non_trainable_params": stats,
            "best_epoch": self.best,
            "best_val_loss": best_row["val_loss"],
            "best_val_acc": best_row["val_acc"],
            "epochs_run": len(rows),
            "train_seconds": round(train_seconds, 2),
            "hardware": hardware_name(pl_module.device),
        }
        if not trainer.is_global_zero:
            return
        fig = plot_history(rows, best=self.best)
        log_figure(trainer.loggers, "training_curves", fig)
        save_figure(fig, self.run_dir / "training_curves.png")
        if not self.test:
            write_json(self.run_dir / "metrics.json", self.metrics)
            self._log_hparams(trainer)
            if self.page:
                write_page_safely(self.run_dir, self.hparams)

    def on_test_start(self, trainer, pl_module):
        if self.best_ckpt:
            log.info(f"Restoring best weights from the end of epoch {self.best}: {self.best_ckpt}")
        elif trainer.fast_dev_run:
            log.info("trainer.fast_dev_run saves no checkpoint: testing the final weights")
        else:
            log.info("no best checkpoint (callbacks.checkpoint=null): testing the final weights")

    def on_test_epoch_start(self, trainer, pl_module):
        self._outputs = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._outputs.append((outputs.float().cpu(), batch[1].cpu()))

    def on_test_end(self, trainer, pl_module):
        datamodule = trainer.datamodule
        paths = datamodule.paths[datamodule.test_dir]
        logits, labels = gather_test_outputs(self._outputs, trainer.world_size, len(paths))
        if not trainer.is_global_zero:
            return
        if len(labels) < len(paths):  # limit_test_batches, fast_dev_run: the first batches only
            log.info(f"testing the first {len(labels)} of {len(paths)} test images")
            paths = paths[: len(labels)]
        extra = {**self.metrics, "ece": expected_calibration_error(logits.softmax(-1), labels)}
        if self.page and self.calibration:
            extra.update(self._temperature(trainer, pl_module, logits, labels))
        self.metrics = write_evaluation(
            self.run_dir,
            logits,
            labels,
            paths,
            pl_module.hparams.class_names,
            extra=extra,
            on_figure=lambda name, fig: log_figure(trainer.loggers, name, fig),
        )
        m = self.metrics
        log.info(
            f"test accuracy {m['test_accuracy']:.4f}  macro F1 {m['f1_macro']:.4f}  "
            f"AUROC {m['auroc_macro']:.4f}"
        )
        self._log_hparams(trainer)
        if self.page:  # last: metrics.json and the figures are already written
            write_page_safely(self.run_dir, self.hparams)

    def _temperature(self, trainer, pl_module, logits, labels) -> dict:
        """metrics.json's temperature keys, from one pass over the validation split; a failure
        is one warning and leaves them out."""
        try:
            return temperature_scaling(trainer, pl_module, logits, labels)
        except Exception as exc:  # noqa: BLE001 - calibration is a reading aid, never the run
            log.warning(
                f"no temperature fitted ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}); the test metrics stand"
            )
            return {}

    def _log_hparams(self, trainer) -> None:
        log_hparams(trainer.loggers, self.hparams, self.metrics)


def gather_test_outputs(outputs: list, world_size: int, n_images: int):
    """(logits, labels) of the whole test split in file order. Under DDP each rank holds a chunk of
    every batch (DirectoryBatchSampler), so batches are re-interleaved rank by rank; a last batch
    smaller than world_size repeats its last image at the end, which n_images cuts off."""
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, outputs)
        outputs = [out for per_batch in zip(*everyone) for out in per_batch]
    logits, labels = zip(*outputs)
    return torch.cat(logits)[:n_images], torch.cat(labels)[:n_images]
