"""The one user-facing error type, and the one place that turns errors into an `error:` line.

User mistakes (a bad folder, image, override or checkpoint) raise `UserError` where they are
found. Entry points wrap their Hydra main in `cli()`, which prints them once, as one line,
and exits non-zero; so too Hydra's and OmegaConf's errors, and an OSError from the machine's state
(MACHINE_ERRNOS: a read-only mount, a full disk, a folder the user may not write).
`HYDRA_FULL_ERROR=1` shows the full traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix; its message names the file, folder, class or config key."""


# The machine's state, not a bug: a read-only mount, a full disk or quota, a folder the user may not
# write, a path through a file. The OSError names the file, so its one line says what to fix.
MACHINE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def _is_user_facing(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (UserError, HydraException, OmegaConfBaseException)) or (
        isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS
    )


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"error: {text}" if text else f"error: {type(exc).__name__}"


def cli(hydra_main: Callable[[], object], after_sigterm: str = "") -> None:
    """Run a @hydra.main function; print user errors as one `error:` line and exit 2. A SIGTERM
    during fit exits 143 with one line, plus `after_sigterm` (what the user can do next)."""
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra also writes "Error executing job with overrides: [...]" before re-raising; we say it once.
    logging.getLogger("hydra.core.utils").addFilter(
        lambda r: not r.getMessage().startswith("Error executing job")
    )
    sys.stderr = _DropLines(sys.stderr, "Error executing job with overrides")
    # Make Hydra re-raise instead of printing its own multi-line report, so we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        # Hydra's --experimental-rerun unpickles the file it is given: code, if the file is hostile. Asked
        # of Hydra's own parser, which also takes any abbreviation (--exp FILE).
        from hydra._internal.utils import get_args_parser

        from cifar_lightning.config import check_override_targets

        if get_args_parser().parse_known_args(sys.argv[1:])[0].experimental_rerun is not None:
            raise UserError(
                "--experimental-rerun is refused: it unpickles its file, which could run code; "
                "rerun with the overrides in RUN/.hydra/overrides.yaml instead"
            )
        check_override_targets(sys.argv[1:])
        hydra_main()
    except SystemExit as exc:
        # Lightning turns SIGTERM into SIGTERMException, a SystemExit whose code is None (= status 0).
        # Ctrl-C and SIGTERM end the whole process, sweeps included, after OnExceptionCheckpoint
        # saved checkpoints/interrupted.ckpt; the exit status says it did not finish.
        if type(exc).__name__ == "SIGTERMException":
            print(
                "error: stopped by SIGTERM" + (f"; {after_sigterm}" if after_sigterm else ""),
                file=sys.stderr,
            )
            sys.exit(143)
        raise
    except Exception as exc:  # noqa: BLE001 - we decide below what is the user's to fix
        cause = user_facing_cause(exc)
        if wants_traceback or cause is None:
            raise
        line = one_line(cause)
        print(line, file=sys.stderr)
        if (
            not _multirun()
        ):  # a sweep's jobs logged their own (report.SweepSummary); this is the last job's log
            to_log_files(line)
        sys.exit(2)


def user_facing_cause(exc: BaseException) -> BaseException | None:
    """The user's mistake behind exc (itself, or what it was raised from), or None for a bug."""
    while not _is_user_facing(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc if _is_user_facing(exc) else None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def to_log_files(line: str) -> None:
    """Also put the error line in the run directory's <job>.log (Hydra's file handler), if there is one."""
    record = logging.makeLogRecord(
        {"name": "cifar_lightning", "levelno": logging.ERROR, "levelname": "ERROR", "msg": line}
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _DropLines:
    """A stderr that drops writes starting with `prefix` and passes everything else through."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix = stream, prefix

    def write(self, text: str) -> int:
        return len(text) if text.startswith(self._prefix) else self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)
