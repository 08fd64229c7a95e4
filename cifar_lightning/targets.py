"""What a config may build: its `_target_`s are code, so only an allowlist is followed.

`instantiate` is hydra.utils.instantiate after that check, with a bad key or value reported as one
UserError naming the config key. model/ uses it for the optimizer and the schedule."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import hydra
from omegaconf import OmegaConf

from cifar_lightning.errors import UserError
from cifar_lightning.private_api import hydra_args_parser

# A `_target_` is code. Configs may name only these modules, so an override such as
# `optim._target_=os.system` is refused instead of run.
ALLOWED_TARGET_PREFIXES = (
    "cifar_lightning.",
    "torch.optim.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
)
# ...and what the name resolves to must be a class or function defined there: a dotted path can
# reach through an allowed module to anything it imported (`cifar_lightning.data.cache.os.system`).
ALLOWED_TARGET_MODULES = (
    "torch.optim",
    "lightning.pytorch.trainer",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
)


# ...and of the project's own code, only what configs build: its helpers (report.files.write_csv)
# would write any text to any path. A new optimizer, scheduler or callback of ours is added here.
PROJECT_TARGETS = (
    "cifar_lightning.model.optim.RMSprop",
    "cifar_lightning.model.schedule.reduce_on_plateau",
    "cifar_lightning.model.schedule.one_cycle",
    "cifar_lightning.callbacks.InterruptCheckpoint",
    "cifar_lightning.report.sweep.SweepSummary",
    "cifar_lightning.search.StorageFolder",
)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _lookup(target: str) -> Any:
    """hydra.utils.get_object, without the log line it writes for a name that does not exist
    (instantiate then reports it, naming the key)."""
    hydra_log = logging.getLogger("hydra.utils")
    quiet = _Quiet()
    hydra_log.addFilter(quiet)
    try:
        return hydra.utils.get_object(target)
    finally:
        hydra_log.removeFilter(quiet)


def _is_allowed(target: str) -> bool:
    if not target.startswith(ALLOWED_TARGET_PREFIXES):
        return False
    try:
        obj = _lookup(target)  # imports only a module under an allowed prefix
    except (ImportError, ValueError, AttributeError):  # no such name: instantiate names the key
        return True
    module = getattr(obj, "__module__", None) or ""
    if module == "cifar_lightning" or module.startswith("cifar_lightning."):
        # by identity: re-exports resolve alike
        return any(obj is _lookup(t) for t in PROJECT_TARGETS)
    return (inspect.isclass(obj) or inspect.isfunction(obj)) and any(
        module == m or module.startswith(m + ".") for m in ALLOWED_TARGET_MODULES
    )


def check_targets(node: Any, key: str = "") -> None:
    """Raise UserError naming the key of any `_target_` that is not allowed (see _is_allowed)."""
    if OmegaConf.is_config(node):  # unresolved: an interpolated `_target_` is checked as typed
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return
    for k, v in items:
        path = f"{key}.{k}" if key else str(k)
        if k == "_target_" and v is not None and not _is_allowed(str(v)):
            raise UserError(
                f"{path}={v} is not an allowed target (allowed: classes and functions of "
                f"{', '.join(ALLOWED_TARGET_MODULES)}; of cifar_lightning: "
                f"{', '.join(t.rpartition('.')[2] for t in PROJECT_TARGETS)})"
            )
        if k != "_target_":
            check_targets(v, path)


def command_line_overrides(argv: list[str]) -> list:
    """The command line's overrides as Hydra parses them (hydra's Override objects), or none
    where Hydra can't parse them: Hydra's own parse error is then clearer than ours."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = hydra_args_parser().parse_known_args(argv)
    try:
        return OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 - left for Hydra to report
        return []


def check_override_targets(argv: list[str]) -> None:
    """check_targets on the command line's overrides. Hydra builds `hydra.callbacks` (and launchers)
    before any of our code sees the config, so `+hydra.callbacks.x._target_=os.system` must be
    refused here, before Hydra starts."""
    for o in command_line_overrides(argv):
        if o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        *parent, leaf = o.key_or_group.split(".")
        for value in values:
            check_targets({leaf: value}, ".".join(parent))


def instantiate(cfg: Any, key: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate after check_targets; `key` names the config node in errors."""
    check_targets(cfg, key)
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except Exception as exc:  # InstantiationException wraps bad keys or values
        raise UserError(f"{key}: {exc}") from exc


def complete(partial, key: str, *args: Any, **kwargs: Any) -> Any:
    """Call a `_partial_` config; a bad value (lr=-1, say) is the user's error, named by its key."""
    try:
        return partial(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{key}: {exc}") from exc
