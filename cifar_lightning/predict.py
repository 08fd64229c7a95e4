"""Classify your own images (any size or mode: converted to RGB and resized as in training).

    python -m cifar_lightning.predict ckpt_path=PATH/best.ckpt inputs=my_photos/
    python -m cifar_lightning.predict ckpt_path=PATH/best.ckpt "inputs='pics/*.jpg'"

Prints a table and writes predictions.csv (path, prediction, top-k classes with probabilities) to
outputs/predict/<date>/<time>/. Unreadable files are reported by path and skipped."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.config import INFERENCE_RULES, check_values
from cifar_lightning.data.folder import EXTENSIONS, decode
from cifar_lightning.errors import UserError
from cifar_lightning.inference import pick_device, predict_logits
from cifar_lightning.model.checkpoint import image_rule, load_net
from cifar_lightning.report import short_name, write_csv

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


def predict(cfg: DictConfig) -> list[dict]:
    check_values(cfg, INFERENCE_RULES)
    device = pick_device(cfg.device)
    net, class_names, hp = load_net(cfg.ckpt_path)
    size, resize = image_rule(hp, cfg.resize)
    paths, images = [], []
    for f in find_inputs(str(cfg.inputs)):
        try:
            images.append(decode(f, size, resize))
            paths.append(str(f))
        except UserError as exc:
            log.warning(f"skipped {exc}")
    if not images:
        raise UserError(f"inputs={cfg.inputs}: none of the files is a readable image")
    probs = predict_logits(net, torch.stack(images), cfg.batch_size, device).softmax(-1)
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


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def _main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
