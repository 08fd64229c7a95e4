"""Load a checkpoint for evaluate/predict as data: weights_only=True, and the network rebuilt from
the project's own Model code with plain numbers read from it. No `_target_` in it is followed."""

from __future__ import annotations

import pickle
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from cifar_lightning.errors import UserError
from cifar_lightning.model.net import ModelS, TestTimeAugment, build_net
from cifar_lightning.schema import (
    AugmentConfig,
    ModelConfig,
    SpeedConfig,
    TestTimeConfig,
    WhitenConfig,
)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={path}: no such file")
    try:
        # Never retried with weights_only=False: a checkpoint that needs it could run code.
        # torch's note on a foreign pickle protocol: the error line says it all
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(str(exc))
        if "global" in reason.lower():  # it names a class or function to import: code, not data
            raise UserError(
                f"{path}: refused: it holds objects other than tensors and plain data, which "
                f"could run code when loaded ({reason})"
            ) from exc
        raise UserError(f"{path}: not a checkpoint ({reason or 'unreadable pickle'})") from exc
    except Exception as exc:
        text = " ".join(str(exc).split())[:200]
        raise UserError(
            f"{path}: not a checkpoint ({type(exc).__name__}{': ' + text if text else ''})"
        ) from exc


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """The weights a checkpoint holds (its state_dict; with a weight-averaging callback, the
    average) into `module`, a module of the run that wrote it."""
    module.load_state_dict(load_checkpoint(path)["state_dict"])


def _unpickler_reason(message: str) -> str:
    """torch's own reason, without its advice to retry with weights_only=False or to allowlist
    globals."""
    # the reason follows this, if present
    text = " ".join(message.split()).split("WeightsUnpickler error:")[-1]
    for advice in ("Please use", "Please file an issue", "Check the documentation"):
        text = text.split(advice)[0]
    # after "Weights only load failed ... trusted source."
    return text.split("trusted source.")[-1].strip()[:200]


def image_rule(hp: dict, resize: str | None = None) -> tuple[int, str]:
    """(image size, resize rule) to decode images for a checkpoint's network: as its training did,
    unless `resize` is given. The rule is the datamodule's (its hyperparameters, merged into `hp`
    by load_net); checkpoints from before the rule was stored were trained with TF's."""
    return int(hp.get("image_size", 32)), resize or hp.get("resize", "tf_bilinear")


def hparams_of(ckpt: dict) -> dict:
    """A checkpoint's hyperparameters in this release's layout (Classifier's arguments).
    Checkpoints written before the config was typed kept the loss, augmentation, test-time,
    whitening and speed keys inside `model`, and the precision only in a callback's state: this
    is the one place that maps them."""
    hp = dict(ckpt["hyper_parameters"])
    if "loss" not in hp:
        model = dict(hp["model"])
        moved = {key: model.pop(key, None) for key in LEGACY_MODEL_KEYS}
        hp["model"] = model
        hp["loss"] = {
            "label_smoothing": moved["label_smoothing"] or 0.0,
            "l2": moved["l2"] or 0.0,
        }
        hp["augment"] = {**asdict(AugmentConfig()), **(moved["augment"] or {})}
        hp["tta"] = {
            "flip": bool(moved["tta_flip"]),
            "shift": int(moved["tta_shift"] or 0),
            "shift_along": "diagonal",
        }
        hp["whiten"] = {
            "enabled": bool(moved["whiten"]),
            "images": moved["whiten_images"] or WhitenConfig().images,
        }
        hp["speed"] = {
            "channels_last": bool(moved["channels_last"]),
            "compile": bool(moved["compile"]),
            "compile_mode": moved["compile_mode"] or SpeedConfig().compile_mode,
        }
        # a schedule's interval follows from its function now (model/schedule.py)
        scheduler = hp.get("scheduler") or {"_target_": None}
        dropped = ("interval", "needs_total_steps")
        hp["scheduler"] = {k: v for k, v in scheduler.items() if k not in dropped}
    if hp.get("precision") is None:  # kept by a callback, RunSettings, if at all
        settings = (ckpt.get("callbacks") or {}).get("RunSettings") or {}
        hp["precision"] = settings.get("precision")
    return hp


# what earlier checkpoints kept in `model` (cuda_graph and grad_clip* are dropped)
LEGACY_MODEL_KEYS = (
    "label_smoothing",
    "l2",
    "augment",
    "tta_flip",
    "tta_shift",
    "whiten",
    "whiten_images",
    "channels_last",
    "compile",
    "compile_mode",
    "cuda_graph",
    "grad_clip",
    "grad_clip_algorithm",
)


def load_net(path: str | Path) -> tuple[ModelS | TestTimeAugment, list[str], dict]:
    """(network in eval mode, class names, hyperparameters) from a cifar_lightning checkpoint; a
    network whose run tested on several views (tta) averages over the same views."""
    ckpt = load_checkpoint(path)
    try:
        # the datamodule's hyperparameters hold how images were decoded (image_size, resize)
        hp = {**ckpt.get("datamodule_hyper_parameters", {}), **hparams_of(ckpt)}
        class_names = [str(c) for c in hp["class_names"]]
        model_cfg = {k: hp["model"][k] for k in ModelConfig.__dataclass_fields__}
        model_cfg["init"] = "torch"  # weights come from the checkpoint; skip the init work
        # the memory layout the run computed in: under bf16 autocast another layout's kernels
        # round differently (by up to a bf16 step in the logits)
        channels_last = bool(hp["speed"]["channels_last"])
        net = build_net(model_cfg, int(hp.get("image_size", 32)), channels_last)
        prefix = "net."
        state = {
            k[len(prefix) :].replace("_orig_mod.", ""): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith(prefix)
        }
        net.load_state_dict(state)
        tta = TestTimeConfig(**hp["tta"])
        if tta.flip or tta.shift:
            net = TestTimeAugment(net, tta.flip, tta.shift, tta.shift_along)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{path}: not a cifar_lightning checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    return net.eval(), class_names, hp


def load_teacher(path: str | Path, class_names: list[str]) -> torch.nn.Module:
    """The distillation teacher (distill.teacher): the network of a cifar_lightning checkpoint,
    loaded with weights_only=True, frozen, in eval mode, giving plain logits (no test-time
    views: it scores the student's own augmented view). Its classes must be the data's."""
    if not Path(path).is_file():
        raise UserError(f"distill.teacher={path}: no such file")
    net, teacher_classes, _ = load_net(path)
    if teacher_classes != list(class_names):
        raise UserError(
            f"distill.teacher={path}: its classes {teacher_classes} are not the data's "
            f"{list(class_names)}"
        )
    if isinstance(net, TestTimeAugment):
        net = net.net
    return net.requires_grad_(False).eval()


# what evaluate, predict and load_net read; the optimizer's state and the callbacks' are left out
INFERENCE_KEYS = (
    "hyper_parameters",
    "datamodule_hyper_parameters",
    "state_dict",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
)


def inference_copy(src: str | Path, dst: str | Path) -> dict:
    """Write to `dst` the part of checkpoint `src` that inference needs (about half its size for
    SGD with momentum, whose buffers match the weights in size); returns what was written. It
    can be evaluated and predicted with, not resumed."""
    ckpt = load_checkpoint(src)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{src}: not a cifar_lightning checkpoint (no state_dict/hyper_parameters)")
    slim = {k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt}
    torch.save(slim, dst)
    return slim
