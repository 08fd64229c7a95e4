"""Config helpers: instantiate only project-approved `_target_`s, and compose outside a CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cifar_lightning.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# A `_target_` is code. Configs may name only these modules, so an override such as
# `optim._target_=os.system` is refused instead of run.
ALLOWED_TARGET_PREFIXES = (
    "cifar_lightning.",
    "torch.optim.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
)


def check_targets(node: Any, key: str = "") -> None:
    """Raise UserError naming the key of any `_target_` outside ALLOWED_TARGET_PREFIXES."""
    if isinstance(node, DictConfig):
        items = node.items_ex(resolve=False)
    elif isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)) or OmegaConf.is_list(node):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return
    for k, v in items:
        path = f"{key}.{k}" if key else str(k)
        if k == "_target_" and v is not None and not str(v).startswith(ALLOWED_TARGET_PREFIXES):
            raise UserError(f"{path}={v} is not an allowed target (allowed: {', '.join(ALLOWED_TARGET_PREFIXES)})")
        if k != "_target_":
            check_targets(v, path)


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


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config that `python -m cifar_lightning.train OVERRIDES` would run, for tests and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [])
