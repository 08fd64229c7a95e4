"""hparams_search's Hydra callback: the study's SQLite folder exists before the sweeper opens
the study (it does so before Hydra makes any directory), and a study file that is not a database
stops the search with one error line before the sweeper opens it."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from cifar_lightning.errors import UserError, one_line
from cifar_lightning.stores import check_sqlite


def sqlite_file(storage: str | None) -> Path | None:
    """The file of a `sqlite:///PATH` storage URL, or None for any other storage."""
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage and storage.startswith(prefix) else None


def check_study(db: Path, study_name: str | None) -> None:
    """UserError if the study's file is there but is not a database (see stores.check_sqlite)."""
    study = f"study {study_name}" if study_name else "the study"
    check_sqlite(
        db,
        f"{study} can't be continued",
        "move the file aside (or delete it) to start the study afresh, without its past trials, "
        "or leave it and start another study: hydra.sweeper.study_name=NEW_NAME",
    )


class StorageFolder(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        db = sqlite_file(config.hydra.sweeper.get("storage"))
        if db is None:
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        try:
            check_study(db, config.hydra.sweeper.get("study_name"))
        except UserError as exc:
            # Hydra turns a callback's exception into a warning and goes on to open the study
            # (SQLAlchemy's traceback), so this one can't reach cli.run: end as cli.run ends a
            # user error, with its one line and exit status 2
            print(one_line(exc), file=sys.stderr)
            raise SystemExit(2) from exc


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
