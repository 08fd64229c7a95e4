"""hparams_search's Hydra callback: the study's SQLite folder exists before the sweeper opens
the study (it does so before Hydra makes any directory)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from cifar_lightning.errors import UserError


def sqlite_file(storage: str | None) -> Path | None:
    """The file of a `sqlite:///PATH` storage URL, or None for any other storage."""
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage and storage.startswith(prefix) else None


class StorageFolder(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        db = sqlite_file(config.hydra.sweeper.get("storage"))
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)


def every_trial_failed(exc: BaseException) -> UserError | None:
    """The Optuna sweeper asks the study for its best trial at the end, which raises a bare
    ValueError when every trial failed: that, as the user's error."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if not (isinstance(exc, ValueError) and any("optuna" in f for f in frames)):
        return None
    if str(exc) != "Record does not exist.":
        return None
    return UserError(
        "hparams_search: every trial failed, so the study has no best trial; each trial's "
        "error line is in its job's train.log and in the sweep's summary.md"
    )
