"""Evaluate any checkpoint on any image folder whose classes match the checkpoint's by name.

    cifar-evaluate ckpt_path=outputs/DATE/TIME/checkpoints/best.ckpt eval_dir=data/cifar10/test

Writes metrics.json, predictions.csv, confusion_matrix.png, roc_curves.png and report.html to its
own run directory (outputs/evaluate/<date>/<time>/)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from cifar_lightning import cli
from cifar_lightning.data.folder import KerasImageFolder
from cifar_lightning.errors import UserError
from cifar_lightning.inference import describe_precision, pick_device, predict_logits
from cifar_lightning.model.checkpoint import image_rule, load_net
from cifar_lightning.report.calibration import expected_calibration_error, hardware_name
from cifar_lightning.report.metrics import write_evaluation
from cifar_lightning.report.page import write_page_safely
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)


def _strip_index(name: str) -> str:
    return re.sub(r"^\d{3}_", "", name)


def match_classes(folder: list[str], ckpt: list[str]) -> tuple[list[int], str]:
    """Index in the checkpoint's classes of each folder class, and the rule that matched."""
    if folder == ckpt:
        return list(range(len(ckpt))), "names equal"
    stripped = [_strip_index(c) for c in ckpt]
    if sorted(_strip_index(c) for c in folder) == sorted(stripped):
        return [
            stripped.index(_strip_index(c)) for c in folder
        ], "names equal after removing the NNN_ index"
    a, b = {_strip_index(c) for c in folder}, set(stripped)
    raise UserError(
        f"eval_dir classes differ from the checkpoint's: only in eval_dir {sorted(a - b)}, "
        f"only in checkpoint {sorted(b - a)}"
    )


def evaluate(cfg: DictConfig) -> dict:
    check_config(cfg)
    device = pick_device(cfg.device)
    net, class_names, hp = load_net(cfg.ckpt_path)
    size, resize = image_rule(hp, cfg.resize)
    folder = KerasImageFolder(cfg.eval_dir, size, resize)
    index, rule = match_classes(folder.classes, class_names)
    log.info(f"classes matched: {rule}")
    # closed before an error line
    with tqdm(folder.samples, desc="decoding", unit="img") as samples:
        images = torch.stack([folder.loader(p) for p, _ in samples])
    labels = torch.tensor([index[t] for t in folder.targets])
    log.info(describe_precision(hp.get("precision"), device))
    logits = predict_logits(net, images, cfg.batch_size, device, hp.get("precision"))
    run_dir = Path(cfg.run_dir)
    metrics = write_evaluation(
        run_dir,
        logits,
        labels,
        [p for p, _ in folder.samples],
        class_names,
        extra={
            "ckpt_path": str(cfg.ckpt_path),
            "eval_dir": str(cfg.eval_dir),
            "precision": hp.get("precision"),
            "hardware": hardware_name(device),
            "ece": expected_calibration_error(logits.float().softmax(-1), labels),
        },
    )
    write_page_safely(run_dir)  # last: a failure there leaves the files above as they are
    log.info(
        f"accuracy {metrics['test_accuracy']:.4f}  macro F1 {metrics['f1_macro']:.4f}  "
        f"AUROC {metrics['auroc_macro']:.4f}  on {len(labels)} images; artefacts in {run_dir}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="evaluate")
def _main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test_accuracy"]


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
