"""The contract of an exported model, and running an ONNX one: what `cifar-export` writes and what
`cifar-predict backend=onnxruntime` reads.

Contract: input `images`, uint8 N x 3 x S x S (RGB, 0-255, decoded as data.folder.decode does
with the stated resize rule; the 1/255 scaling happens inside); output `probabilities`, float32
N x classes, the softmax (the mean softmax over the views, for a checkpoint trained with
test-time augmentation). The batch axis is dynamic. An ONNX file carries the contract in its
metadata_props; a .pt2 in its extra file metadata.json."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifar_lightning import __version__
from cifar_lightning.errors import UserError
from cifar_lightning.model.net import TestTimeAugment, tta_views

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}  # format -> file suffix
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
METADATA_FILE = "metadata.json"  # format=torch_export: the contract, inside the .pt2
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
# metadata values that are plain text; the others are JSON (ONNX metadata values are strings)
TEXT_KEYS = {"input", "output", "resize", "producer"}
REQUIRED_KEYS = ("class_names", "image_size", "resize")


def require_onnx(option: str, modules: tuple[str, ...] = ONNX_MODULES) -> list:
    """The modules of the onnx extra, or one error line naming the option that needs them."""
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise UserError(
            f'{option} needs the onnx extra: pip install "cifar_lightning[onnx]"'
        ) from exc


class Probabilities(nn.Module):
    """What an export computes: uint8 images -> softmax probabilities. The network rescales by
    1/255 itself, and a TestTimeAugment network averages over its views."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).softmax(-1)


def contract(net: nn.Module, class_names: list[str], image_size: int, resize: str) -> dict:
    """The metadata an export carries: class names, the input it expects and what it returns."""
    tta = isinstance(net, TestTimeAugment)
    flip, pixels, along = (net.flip, net.pixels, net.along) if tta else (False, 0, "diagonal")
    views = len(tta_views(torch.zeros(1, 3, image_size, image_size), flip, pixels, along))
    s, n = image_size, len(class_names)
    mean = f", the mean over {views} test-time views" if views > 1 else ""
    return {
        "class_names": list(class_names),
        "image_size": s,
        "resize": resize,
        "input": (
            f"{INPUT_NAME}: uint8 N x 3 x {s} x {s}, RGB, values 0-255 (scaled by 1/255 inside); "
            f"images decoded as cifar_lightning.data.folder.decode does, resized with {resize}"
        ),
        "output": f"{OUTPUT_NAME}: float32 N x {n}, softmax probabilities over class_names{mean}",
        "tta_views": views,
        "tta_flip": flip,
        "tta_shift": pixels,
        "tta_shift_along": along,
        "producer": f"cifar_lightning {__version__}",
    }


def to_onnx_props(meta: dict) -> dict[str, str]:
    return {k: v if k in TEXT_KEYS else json.dumps(v) for k, v in meta.items()}


def from_onnx_props(props: dict[str, str]) -> dict:
    return {k: v if k in TEXT_KEYS else json.loads(v) for k, v in props.items()}


def ort_providers(ort, device: str) -> list[str]:
    """onnxruntime's execution providers for device auto | cpu | cuda."""
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise UserError(
            "device=cuda: this onnxruntime has no CUDAExecutionProvider "
            "(pip install onnxruntime-gpu); use device=cpu or device=auto"
        )
    return (["CUDAExecutionProvider"] if cuda and device != "cpu" else []) + [
        "CPUExecutionProvider"
    ]


class OnnxClassifier:
    """A `cifar-export format=onnx` model run by onnxruntime. class_names, image_size and resize
    come from its metadata; calling it maps uint8 images N x 3 x S x S to probabilities."""

    def __init__(self, path: str | Path, device: str = "cpu", key: str = "onnx_path"):
        (ort,) = require_onnx("backend=onnxruntime", ("onnxruntime",))
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{key}={path}: no such file")
        try:
            self.session = ort.InferenceSession(str(path), providers=ort_providers(ort, device))
        except UserError:
            raise
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            raise UserError(f"{key}={path}: onnxruntime cannot load it ({text})") from exc
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_KEYS if k not in props]
        inputs = self.session.get_inputs()
        if missing or len(inputs) != 1 or inputs[0].type != "tensor(uint8)":
            raise UserError(
                f"{key}={path}: not a cifar-export model (it needs one uint8 input and "
                f"{', '.join(REQUIRED_KEYS)} in its metadata); write one with "
                "cifar-export ckpt_path=PATH format=onnx"
            )
        try:
            self.meta = from_onnx_props(dict(props))
            self.class_names = [str(c) for c in self.meta["class_names"]]
            self.image_size = int(self.meta["image_size"])
            self.resize = str(self.meta["resize"])
        except (ValueError, TypeError) as exc:
            raise UserError(f"{key}={path}: unreadable cifar-export metadata ({exc})") from exc
        self.input_name = inputs[0].name

    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        x = images.numpy()
        out = [
            self.session.run(None, {self.input_name: x[i : i + batch_size]})[0]
            for i in range(0, len(x), batch_size)
        ]
        return torch.from_numpy(np.concatenate(out)).float()
