"""The one place that turns an error into one `error:` line and an exit status.

Every entry point's `main()` is `run(hydra_main)`. A user error (UserError, Hydra's and
OmegaConf's errors, a read-only or full disk) prints once, as one line, and exits 2; anything
else is a bug and keeps its traceback. `HYDRA_FULL_ERROR=1` shows every traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from cifar_lightning.errors import UserError, one_line, to_log_files, user_facing_cause
from cifar_lightning.private_api import hydra_args_parser
from cifar_lightning.schema import refuse_loose_boolean, refuse_moved_key
from cifar_lightning.search import every_trial_failed
from cifar_lightning.targets import check_override_targets, command_line_overrides


def run(hydra_main: Callable[[], object], after_sigterm: str = "") -> None:
    """Run a @hydra.main function; print user errors as one `error:` line and exit 2. A SIGTERM
    during fit exits 143 with one line, plus `after_sigterm` (what the user can do next)."""
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra also writes "Error executing job with overrides: [...]" before re-raising; say it once.
    logging.getLogger("hydra.core.utils").addFilter(
        lambda r: not r.getMessage().startswith("Error executing job")
    )
    sys.stderr = _DropLines(sys.stderr, "Error executing job with overrides")
    # Make Hydra re-raise instead of printing its own multi-line report, so we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        refuse_rerun(sys.argv[1:])
        check_override_targets(sys.argv[1:])
        check_override_keys(sys.argv[1:])
        hydra_main()
    except SystemExit as exc:
        # Lightning turns SIGTERM into SIGTERMException, a SystemExit whose code is None (status
        # 0). Ctrl-C and SIGTERM end the whole process, sweeps included, after InterruptCheckpoint
        # saved checkpoints/interrupted.ckpt; the exit status says it did not finish.
        if type(exc).__name__ == "SIGTERMException":
            hint = f"; {after_sigterm}" if after_sigterm else ""
            print(f"error: stopped by SIGTERM{hint}", file=sys.stderr)
            sys.exit(143)
        raise
    except Exception as exc:  # noqa: BLE001 - we decide below what is the user's to fix
        cause = user_facing_cause(exc) or every_trial_failed(exc)
        if wants_traceback or cause is None:
            raise
        line = one_line(cause)
        print(line, file=sys.stderr)
        if not _multirun():  # a sweep's jobs logged their own (report.SweepSummary)
            to_log_files(line)
        sys.exit(2)


def refuse_rerun(argv: list[str]) -> None:
    """Hydra's --experimental-rerun unpickles the file it is given: code, if the file is hostile.
    Asked of Hydra's own parser, which also takes any abbreviation (--exp FILE)."""
    if hydra_args_parser().parse_known_args(argv)[0].experimental_rerun is not None:
        raise UserError(
            "--experimental-rerun is refused: it unpickles its file, which could run code; "
            "rerun with the overrides in RUN/.hydra/overrides.yaml instead"
        )


def check_override_keys(argv: list[str]) -> None:
    """The command line's overrides against what the schema can't say itself: a key that moved
    gets its new spelling, and a bool key takes only true or false, in each job of a sweep too."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    for o in command_line_overrides(argv):
        refuse_moved_key(o.key_or_group)
        if o.is_delete():
            continue
        if not o.is_sweep_override():
            refuse_loose_boolean(o.key_or_group, o.value())
        elif isinstance(o.value(), (ChoiceSweep, RangeSweep)):  # a value per job
            for value in o.sweep_iterator():
                refuse_loose_boolean(o.key_or_group, value)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class _DropLines:
    """A stderr that drops writes starting with `prefix` and passes everything else through."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix = stream, prefix

    def write(self, text: str) -> int:
        return len(text) if text.startswith(self._prefix) else self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)
