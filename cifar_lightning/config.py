"""What each config value must be, checked before anything starts, and compose() for tests and
notebooks. The option lists come from the modules that use them (config imports data/ and model/,
never the other way)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cifar_lightning.data.folder import RESIZES
from cifar_lightning.data.sampler import BATCHINGS
from cifar_lightning.errors import UserError
from cifar_lightning.model.net import INITS
from cifar_lightning.model.schedule import ANNEALS, COUNTINGS
from cifar_lightning.targets import check_targets

CONF_DIR = Path(__file__).resolve().parent / "conf"


# What each value must be, checked before anything starts, so `model.dropout=abc` or `test=no` is
# one error line naming the key instead of a traceback from deep in Lightning (or, for `test=no`, a
# truthy string that silently runs the test phase). A key a config lacks, or sets to null, is
# skipped.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whole(low: int) -> tuple:
    return (lambda v: _is_int(v) and v >= low), f"must be a whole number >= {low}"


def number(
    low: float, high: float = math.inf, *, above: bool = False, below: bool = False
) -> tuple:
    """A number in [low, high]; above/below make that end open."""

    def ok(v) -> bool:
        if not _is_number(v):
            return False
        return (v > low if above else v >= low) and (v < high if below else v <= high)

    span = (
        f"{'(' if above else '['}{low}, {high}{')' if below else ']'}"
        if high != math.inf
        else f"{'>' if above else '>='} {low}"
    )
    return ok, f"must be a number {'in ' if high != math.inf else ''}{span}"


def one_of(*options: str) -> tuple:
    return (lambda v: v in options), f"is not one of: {', '.join(options)}"


BOOLEAN = (lambda v: isinstance(v, bool)), "must be true or false"


def list_of(rule: tuple, example: str, empty_ok: bool = False) -> tuple:
    ok, must = rule
    return (
        (lambda v: OmegaConf.is_list(v) and (empty_ok or len(v) > 0) and all(ok(w) for w in v)),
        f"must be a list like {example}; "
        f"each item {must.replace('is not one of', 'must be one of')}",
    )


WHOLE_LIST = list_of(whole(1), "[32,64,128]")
# Lightning's rule for limit_*_batches and overfit_batches: a count (int) or a fraction (float)
BATCH_LIMIT = (
    (lambda v: _is_int(v) and v >= 0 or isinstance(v, float) and 0 <= v <= 1),
    "must be a whole number of batches >= 0 or a fraction in [0.0, 1.0]",
)
NAME = (lambda v: isinstance(v, str) and v != ""), "must be a folder name"
AUGMENT_NUMBERS = {"rotation_deg", "zoom", "translate"}  # >= 0
AUGMENT_PIXELS = {"crop_pad", "cutout"}  # whole pixels >= 0
AUGMENT = (
    lambda v: (
        v is None
        or (
            OmegaConf.is_dict(v)
            and set(v) <= {"flip"} | AUGMENT_NUMBERS | AUGMENT_PIXELS
            and all(
                isinstance(x, bool)
                if k == "flip"
                else (_is_int(x) if k in AUGMENT_PIXELS else _is_number(x)) and x >= 0
                for k, x in v.items()
            )
        )
    ),
    "must be null or {flip: true|false, rotation_deg: N, zoom: N, translate: N, crop_pad: PIXELS, "
    "cutout: PIXELS} with numbers >= 0",
)

# The one metric and the direction that makes it better: val/acc kept at its lowest would be a
# silent mistake.
MONITOR_MODES = {"val/loss": "min", "val/acc": "max"}
RULES = {
    "seed": whole(0),
    "test": BOOLEAN,
    "sweep_objective": one_of("best_val_acc", "best_val_loss"),
    "monitor": one_of(*MONITOR_MODES),
    "monitor_mode": one_of("min", "max"),
    "data.batch_size": whole(1),
    "data.image_size": whole(1),
    "data.num_workers": whole(0),
    "data.eval_batch_size": (
        (lambda v: v == "auto" or _is_int(v) and v >= 1),
        "must be auto or a whole number >= 1",
    ),
    "data.cache": BOOLEAN,
    "data.skip_bad_files": BOOLEAN,
    "data.train_dirs": list_of(NAME, "[train_1,train_2]"),
    "model.widths": WHOLE_LIST,
    "model.hidden": whole(1),
    "model.dropout": number(0, 1, below=True),
    "model.num_classes": whole(1),
    "model.bn_momentum": number(0, 1),
    "model.bn_eps": number(0, above=True),
    "model.channels_last": BOOLEAN,
    "model.compile": BOOLEAN,
    "model.cuda_graph": BOOLEAN,
    "model.compile_mode": one_of(
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ),
    "model.l2": number(0),
    "model.label_smoothing": number(0, 1, below=True),
    "model.tta_flip": BOOLEAN,
    "model.tta_shift": whole(0),
    "model.whiten": BOOLEAN,
    "model.whiten_images": whole(1),
    "optim.norm_bias_decay": BOOLEAN,
    "model.augment": AUGMENT,
    "optim.eps_inside_root": BOOLEAN,
    "trainer.max_epochs": (
        (lambda v: _is_int(v) and (v == -1 or v >= 1)),
        "must be -1 (no limit) or a whole number >= 1",
    ),
    "trainer.log_every_n_steps": whole(1),
    "trainer.check_val_every_n_epoch": whole(1),
    "scheduler.patience": whole(0),
    "trainer.profiler": one_of("simple", "advanced", "pytorch"),
    "trainer.deterministic": (
        (lambda v: isinstance(v, bool) or v == "warn"),
        "must be true, false or warn",
    ),
    "callbacks.early_stopping.patience": whole(0),
    "callbacks.early_stopping.min_delta": number(0),
    "callbacks.early_stopping.check_finite": BOOLEAN,
    "callbacks.progress_bar.refresh_rate": whole(0),
    # The Classifier runs its own optimizer step (Lightning's manual optimization), which these
    # Trainer options would reach into; Lightning would stop with a traceback
    "trainer.accumulate_grad_batches": (
        (lambda v: v == 1),
        "is not supported: the Classifier steps its optimizer "
        "itself (Lightning's manual optimization); use a larger data.batch_size",
    ),
    "trainer.gradient_clip_val": (
        (lambda v: v == 0),
        "is not supported: the Classifier steps its optimizer itself "
        "(Lightning's manual optimization); use model.grad_clip=MAX_NORM instead",
    ),
    "trainer.gradient_clip_algorithm": (
        (lambda v: False),
        "is not supported: the Classifier steps its optimizer itself "
        "(Lightning's manual optimization); use model.grad_clip_algorithm=norm|value instead",
    ),
    "model.grad_clip": number(0, above=True),
    "model.grad_clip_algorithm": one_of("norm", "value"),
    # debug=...: Lightning's own checks would stop with a traceback
    "trainer.fast_dev_run": (
        (lambda v: isinstance(v, bool) or _is_int(v) and v >= 0),
        "must be true, false or a whole number of batches >= 0",
    ),
    **{
        f"trainer.{key}": BATCH_LIMIT
        for key in (
            "overfit_batches",
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
        )
    },
}
# the only optim/scheduler keys that hold text
TEXT_KEYS = {
    "_target_",
    "mode",
    "counting",
    "interval",
    "anneal_strategy",
}


def _typed_key(cfg: DictConfig, key: str) -> str:
    """The key the user typed: `fidelity.init` for model.init: ${fidelity.init}."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not (OmegaConf.is_dict(node) and OmegaConf.is_interpolation(node, leaf)):
        return key
    value = OmegaConf.to_container(node, resolve=False)[leaf]
    return value[2:-1] if value.startswith("${") and value.endswith("}") else key


# Keys that name an option, and the options, from the modules that use them.
CHOICES = {
    "model.init": one_of(*INITS),
    "scheduler.anneal_strategy": one_of(*ANNEALS),
    "scheduler.counting": one_of(*COUNTINGS),
    "fidelity.batching": one_of(*BATCHINGS),
    "fidelity.resize": one_of(*RESIZES),
}
# evaluate's and predict's own values, checked before the checkpoint loads
INFERENCE_RULES = {
    "batch_size": whole(1),
    "top_k": whole(1),
    "device": one_of("auto", "cpu", "cuda"),
    "resize": one_of(*RESIZES),
    "backend": one_of("torch", "onnxruntime"),  # predict's: a checkpoint, or a cifar-export .onnx
}


def _shown(v: Any) -> str:
    return str(OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v)


def check_config(cfg: DictConfig) -> None:
    """What train, prepare and bench check first: every `_target_`, then every value."""
    check_targets(cfg)
    check_values(cfg)


def check_values(cfg: DictConfig, extra_rules: dict | None = None) -> None:
    """Raise UserError naming the key of a value of the wrong kind (RULES, CHOICES, plus the
    entry point's own)."""
    for key, (ok, must) in {**RULES, **CHOICES, **(extra_rules or {})}.items():
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None and not ok(v):  # null: absent, or left to the code's own default
            sep = " " if must.startswith("is ") else ": "
            raise UserError(f"{_typed_key(cfg, key)}={_shown(v)}{sep}{must}")
    check_model_fits_data(cfg)
    monitor, mode = cfg.get("monitor"), cfg.get("monitor_mode")
    if monitor in MONITOR_MODES and mode is not None and mode != MONITOR_MODES[monitor]:
        raise UserError(
            f"monitor_mode={mode} would keep the worst {monitor}; "
            f"use monitor_mode={MONITOR_MODES[monitor]}"
        )
    for group in ("optim", "scheduler"):
        for k, v in (OmegaConf.select(cfg, group, default=None) or {}).items():
            if isinstance(v, str) and k not in TEXT_KEYS:
                raise UserError(f"{_typed_key(cfg, f'{group}.{k}')}={v}: must be a number")


# values in a 3x3 RGB patch, what model.whiten decorrelates for ModelS's first conv (model/init.py)
WHITEN_PATCH = 3 * 3 * 3


def check_model_fits_data(cfg: DictConfig) -> None:
    """The values that must agree with another key, checked once each has the right kind."""
    size = OmegaConf.select(cfg, "data.image_size", default=None)
    for key in ("model.augment.crop_pad", "model.tta_shift"):
        pixels = OmegaConf.select(cfg, key, default=None)
        # F.pad(mode="reflect") needs a pad smaller than the side
        if size is not None and pixels is not None and pixels >= size:
            raise UserError(
                f"{_typed_key(cfg, key)}={pixels}: must be below "
                f"{_typed_key(cfg, 'data.image_size')}={size} (reflect padding)"
            )
    widths = OmegaConf.select(cfg, "model.widths", default=None)
    if OmegaConf.select(cfg, "model.whiten", default=None) and widths:
        if widths[0] % 2 or widths[0] > 2 * WHITEN_PATCH:
            raise UserError(
                f"{_typed_key(cfg, 'model.widths')}={_shown(widths)}: with "
                f"{_typed_key(cfg, 'model.whiten')}=true the first width must be even and at "
                f"most {2 * WHITEN_PATCH} (half its filters are the top directions of the "
                f"{WHITEN_PATCH} values of a 3x3 RGB patch, half their negatives)"
            )


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config that `python -m cifar_lightning.train OVERRIDES` would run, for tests and
    notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [])
