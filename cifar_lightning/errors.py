"""The one user-facing error type, and what counts as the user's to fix.

User mistakes (a bad folder, image, override or checkpoint) raise `UserError` where they are
found; `cifar_lightning.cli` prints them once, as one `error:` line. So too Hydra's and
OmegaConf's errors, and an OSError from the machine's state (MACHINE_ERRNOS: a read-only mount, a
full disk, a folder the user may not write)."""

from __future__ import annotations

import errno
import logging


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
    text = " ".join(str(describe_config_error(exc) or exc).split())
    return f"error: {text}" if text else f"error: {type(exc).__name__}"


def describe_config_error(exc: BaseException) -> str | None:
    """A schema's refusal as `key: what is wrong`, led by the config file that held it: OmegaConf
    names the key (full_key), and Hydra wraps it in a composition error that names the file or
    the override. None for any other error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    where = ""
    # Hydra raises an override's error `from` OmegaConf's, but a config file's inside the
    # `except` that caught it, without `from`: the OmegaConf error is then only the context
    inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if isinstance(exc, HydraException) and isinstance(inner, OmegaConfBaseException):
        first = str(exc).split(":")[0]
        where = f"in {first[3:]}: " if first.startswith("In '") else ""
        exc = inner
    if not isinstance(exc, OmegaConfBaseException):
        return None
    message = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"{where}{key}: {message}" if key else f"{where}{message}"


def user_facing_cause(exc: BaseException) -> BaseException | None:
    """The user's mistake behind exc (itself, or what it was raised from), or None for a bug."""
    while not _is_user_facing(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc if _is_user_facing(exc) else None


def to_log_files(line: str) -> None:
    """Also put the error line in the run directory's <job>.log (Hydra's file handler), if any."""
    record = logging.makeLogRecord(
        {"name": "cifar_lightning", "levelno": logging.ERROR, "levelname": "ERROR", "msg": line}
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
