"""Export a checkpoint's network for serving, with every test-time augmentation its recipe uses.

    cifar-export ckpt_path=outputs/DATE/TIME/checkpoints/best.ckpt format=onnx
    cifar-export ckpt_path=PATH/best.ckpt format=torch_export out=serving/model.pt2

Input `images`: uint8 N x 3 x S x S, S the checkpoint's image size, RGB 0-255 (the 1/255 scaling
is inside), any batch size. Output `probabilities`: the softmax over the checkpoint's classes.
The class names and this contract travel in the file (ONNX metadata_props; a .pt2's extra file
metadata.json). Before the file is written, the export is run at batch sizes 1 and 7 on seeded
random images and must match the checkpoint's own network within 1e-5 in probability.

Writes model.onnx or model.pt2 (unless `out` says where) and export.json to its run directory
(outputs/export/<date>/<time>/)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.errors import UserError
from cifar_lightning.exported import (
    FORMATS,
    INPUT_NAME,
    METADATA_FILE,
    OUTPUT_NAME,
    OnnxClassifier,
    Probabilities,
    contract,
    require_onnx,
    to_onnx_props,
)
from cifar_lightning.model.checkpoint import image_rule, load_net
from cifar_lightning.report.files import write_json
from cifar_lightning.schema import check_config

log = logging.getLogger(__name__)

TOLERANCE = 1e-5  # largest |p_export - p_eager| accepted
PARITY_BATCHES = (1, 7)
MIN_OPSET = 18  # the lowest the torch.onnx exporter writes


def output_path(cfg: DictConfig) -> Path:
    """Where the model goes: `out`, or model.onnx / model.pt2 in the run directory."""
    suffix = FORMATS[cfg.format]
    if cfg.out is None:
        return Path(cfg.run_dir) / f"model{suffix}"
    out = Path(str(cfg.out))
    if not isinstance(cfg.out, str) or out.suffix != suffix or out.is_dir():
        raise UserError(
            f"out={cfg.out}: must be a file path ending in {suffix} (format={cfg.format})"
        )
    return out


def parity(eager, exported, image_size: int, batches=PARITY_BATCHES) -> dict[int, float]:
    """Largest |difference| of probabilities at each batch size, on seeded random uint8 images."""
    g = torch.Generator().manual_seed(0)
    diffs = {}
    for n in batches:
        x = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            diffs[n] = (exported(x).float() - eager(x)).abs().max().item()
    return diffs


def _example(image_size: int) -> tuple[torch.Tensor]:
    # batch 2: a batch of 1 while tracing could be taken for a constant
    return (torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8),)


def _batch_dim() -> dict:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}


def export_onnx(module: Probabilities, image_size: int, meta: dict, path: Path, opset: int):
    """Write `module` as ONNX to `path` with `meta` in its metadata_props; returns the opset."""
    import onnx

    # the graph optimizer's INFO lines, one per merged constant, say nothing to act on
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(max(q.getEffectiveLevel(), logging.WARNING))
    try:
        program = torch.onnx.export(
            module,
            _example(image_size),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=_batch_dim(),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, to_onnx_props(meta))
    proto.doc_string = f"{meta['input']} -> {meta['output']}"
    onnx.save(proto, str(path))
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_torch(module: Probabilities, image_size: int, meta: dict, path: Path) -> None:
    """Write `module` as a torch.export program (.pt2), `meta` as its extra file metadata.json."""
    import json

    program = torch.export.export(module, _example(image_size), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(meta)})


def export(cfg: DictConfig) -> dict:
    check_config(cfg)
    fmt = cfg.format
    out = output_path(cfg)
    if fmt == "onnx":
        onnx, ort, _ = require_onnx("format=onnx")
        top = onnx.defs.onnx_opset_version()
        if cfg.opset > top:
            raise UserError(
                f"opset={cfg.opset}: must be a whole number in [{MIN_OPSET}, {top}] "
                f"(onnx {onnx.__version__})"
            )
    net, class_names, hp = load_net(cfg.ckpt_path)
    size, resize = image_rule(hp)
    meta = contract(net, class_names, size, resize)
    # plain layout: a checkpoint trained channels_last loads its conv weights so, and
    # torch.export.save stores tensors whole
    module = Probabilities(net).eval().to(memory_format=torch.contiguous_format)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside `out`, then renamed: a failed export or parity check leaves no model file
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    record = {"format": fmt}
    try:
        if fmt == "onnx":
            record["opset"] = export_onnx(module, size, meta, partial, cfg.opset)
            try:
                exported = OnnxClassifier(partial, "cpu", key="out")
            except UserError as exc:
                raise UserError(
                    f"format=onnx opset={cfg.opset}: onnxruntime {ort.__version__} cannot run "
                    f"the exported model; try a lower opset ({exc})"
                ) from exc
        else:
            export_torch(module, size, meta, partial)
            exported = torch.export.load(str(partial)).module()
        diffs = parity(module, exported, size)
        worst = max(diffs.values())
        figures = ", ".join(f"batch {n} {d:.2e}" for n, d in diffs.items())
        log.info(
            f"parity with the checkpoint's network, max |p - p_eager|: {figures} "
            f"(tolerance {TOLERANCE:.0e})"
        )
        if not worst <= TOLERANCE:  # NaN included
            raise UserError(
                f"format={fmt}: the export differs from the checkpoint's network by {worst:.2e} "
                f"in probability, over the {TOLERANCE:.0e} tolerance; {out} not written"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    record.update(
        file=str(out),
        checkpoint=str(cfg.ckpt_path),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        parity={
            "max_abs_diff": {str(n): d for n, d in diffs.items()},
            "tolerance": TOLERANCE,
            "images": "seeded random uint8",
        },
        **meta,
    )
    run_dir = Path(cfg.run_dir)
    write_json(run_dir / "export.json", record)
    views = f" ({meta['tta_views']} test-time views inside)" if meta["tta_views"] > 1 else ""
    opset = f", opset {record['opset']}" if fmt == "onnx" else ""
    log.info(
        f"exported {out} (format={fmt}{opset}): {INPUT_NAME} uint8 N x 3 x {size} x {size} -> "
        f"{OUTPUT_NAME} N x {len(class_names)}{views}; export.json in {run_dir}"
    )
    return record


@hydra.main(version_base="1.3", config_path="pkg://cifar_lightning.conf", config_name="export")
def _main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
