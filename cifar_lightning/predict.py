"""Classify your own images (any size or mode: converted to RGB and resized as in training).

    python -m cifar_lightning.predict ckpt_path=PATH/best.ckpt inputs=my_photos/
    python -m cifar_lightning.predict ckpt_path=PATH/best.ckpt "inputs='pics/*.jpg'"
    python -m cifar_lightning.predict backend=onnxruntime onnx_path=PATH/model.onnx inputs=pics/

backend=onnxruntime runs a `cifar-export format=onnx` model instead of a checkpoint: the class
names, image size and resize rule come from its metadata, the images are decoded alike.

Prints a table and writes predictions.csv (path, prediction, top-k classes with probabilities) to
outputs/predict/<date>/<time>/. Unreadable files are reported by path and skipped."""

from __future__ import annotations

import glob
import logging
from functools import partial
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.data.folder import EXTENSIONS, decode
from cifar_lightning.errors import UserError
from cifar_lightning.exported import OnnxClassifier, require_onnx
from cifar_lightning.inference import pick_device, predict_logits
from cifar_lightning.model.checkpoint import image_rule, load_net
from cifar_lightning.report.figures import short_name
from cifar_lightning.report.files import write_csv
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)


def find_inputs(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [
            f
            for f in p.rglob("*")
            if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
        ]
    else:
        files = [Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file()]
    files = sorted(f for f in files if f.suffix.lower() in EXTENSIONS or p.is_file())
    if not files:
        raise UserError(f"inputs={spec}: no image files found ({', '.join(EXTENSIONS)})")
    return files


def load_classifier(cfg: DictConfig) -> tuple[Callable, list[str], int, str]:
    """(uint8 images -> probabilities, class names, image size, resize rule) for cfg.backend."""
    backend = cfg.get("backend", "torch")
    onnx = backend == "onnxruntime"
    needed, other = ("onnx_path", "ckpt_path") if onnx else ("ckpt_path", "onnx_path")
    if cfg.get(needed) is None:
        example = "PATH/model.onnx (from cifar-export format=onnx)" if onnx else "PATH/best.ckpt"
        raise UserError(f"backend={backend} needs {needed}={example}")
    if cfg.get(other) is not None:
        raise UserError(f"{other}={cfg.get(other)}: not read by backend={backend}; give {needed}")
    if onnx:
        require_onnx("backend=onnxruntime", ("onnxruntime",))
        model = OnnxClassifier(cfg.onnx_path, cfg.device)
        run = partial(model, batch_size=cfg.batch_size)
        return run, model.class_names, model.image_size, cfg.resize or model.resize
    device = pick_device(cfg.device)
    net, class_names, hp = load_net(cfg.ckpt_path)
    size, resize = image_rule(hp, cfg.resize)

    def run(images: torch.Tensor) -> torch.Tensor:
        # at the precision the checkpoint trained at (None in older ones: fp32)
        logits = predict_logits(net, images, cfg.batch_size, device, hp.get("precision"))
        return logits.softmax(-1)

    return run, class_names, size, resize


def probabilities(cfg: DictConfig) -> tuple[list[str], torch.Tensor, list[str]]:
    """(paths of the readable images, their probabilities N x classes, class names)."""
    check_config(cfg)
    run, class_names, size, resize = load_classifier(cfg)
    paths, images = [], []
    for f in find_inputs(str(cfg.inputs)):
        try:
            images.append(decode(f, size, resize))
            paths.append(str(f))
        except UserError as exc:
            log.warning(f"skipped {exc}")
    if not images:
        raise UserError(f"inputs={cfg.inputs}: none of the files is a readable image")
    return paths, run(torch.stack(images)), class_names


def predict(cfg: DictConfig) -> list[dict]:
    paths, probs, class_names = probabilities(cfg)
    k = min(cfg.top_k, len(class_names))
    top_p, top_i = probs.topk(k, dim=-1)
    rows = []
    for path, ps, ix in zip(paths, top_p.tolist(), top_i.tolist()):
        row = {"path": path, "prediction": class_names[ix[0]]}
        for j in range(k):
            row[f"top{j + 1}"], row[f"p{j + 1}"] = class_names[ix[j]], f"{ps[j]:.4f}"
        rows.append(row)
    cols = ["path", "prediction"] + [c for j in range(k) for c in (f"top{j + 1}", f"p{j + 1}")]
    out = Path(cfg.run_dir) / "predictions.csv"
    write_csv(out, rows, cols)
    width = min(60, max(len(r["path"]) for r in rows))
    log.info(f"{'image':<{width}}  top {k}")
    for r in rows:
        tops = "  ".join(
            f"{short_name(r[f'top{j + 1}'])} {float(r[f'p{j + 1}']):.2f}" for j in range(k)
        )
        log.info(f"{r['path'][-width:]:<{width}}  {tops}")
    log.info(f"{len(rows)} images; predictions.csv in {out.parent}")
    return rows


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="predict")
def _main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
