"""Calibration: the expected calibration error (torchmetrics), a temperature fitted on the
validation split's logits, the reliability diagram, and the name of the hardware a run used."""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchmetrics.functional.classification import multiclass_calibration_error  # noqa: E402

log = logging.getLogger(__name__)
ECE_BINS = 15  # torchmetrics' default, and the usual choice since Guo et al. (2017)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """ECE (l1, ECE_BINS equal-width bins of the top-class confidence) of class probabilities."""
    probs = probs.double()  # the CPU's float64 sums: the same value in every test and on the page
    return multiclass_calibration_error(
        probs, labels, num_classes=probs.shape[1], n_bins=ECE_BINS, norm="l1"
    ).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the cross-entropy of softmax(logits / T): LBFGS on log T, so T
    stays positive without a constraint."""
    # a test phase's hooks run under inference mode, where nothing has a gradient; copies made
    # outside it are ordinary tensors
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.detach().double().cpu().clone(), labels.cpu().clone()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        opt.step(closure)
        return float(log_t.detach().exp())


def validation_logits(trainer, module) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits and labels of the validation split, on the test phase's views (tta) and under
    the run's precision, as test_step computes them. Under DDP a rank sees its share of the
    batches only: the temperature is then fitted on rank zero's share."""
    loader = trainer.datamodule.val_dataloader()
    plugin = getattr(trainer, "precision_plugin", None)  # autocast under bf16-mixed, say
    forward_context = plugin.forward_context if plugin is not None else contextlib.nullcontext
    outputs = []
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), forward_context():
            for batch in loader:
                x, y = module.transfer_batch_to_device(batch, module.device, 0)
                logits = module.evaluation_logits(x)
                outputs.append((logits.float().cpu(), y.cpu()))
    finally:
        module.train(was_training)
    logits, labels = zip(*outputs)
    return torch.cat(logits), torch.cat(labels)


def temperature_scaling(trainer, module, test_logits, test_labels) -> dict:
    """metrics.json's calibration keys after one pass over the validation split: the fitted
    temperature, the test ECE it gives, and the pass's seconds (the fit included)."""
    t0 = time.perf_counter()
    val_logits, val_labels = validation_logits(trainer, module)
    temperature = fit_temperature(val_logits, val_labels)
    seconds = time.perf_counter() - t0
    scaled = (test_logits.double() / temperature).softmax(-1)
    out = {
        "temperature": temperature,
        "ece_temperature_scaled": expected_calibration_error(scaled, test_labels),
        "calibration_seconds": round(seconds, 2),
        "calibration_images": len(val_labels),
    }
    log.info(
        f"temperature {temperature:.3f} fitted on {len(val_labels)} validation images in "
        f"{seconds:.1f} s: test ECE {out['ece_temperature_scaled']:.4f} after scaling"
    )
    return out


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per confidence bin (ECE_BINS equal-width bins [low, high), as the ECE's; a confidence of
    exactly 1 joins the last): its range, image count, mean confidence and accuracy."""
    confidence, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, ECE_BINS - 1)
    out = []
    for i in range(ECE_BINS):
        low, high = edges[i].item(), edges[i + 1].item()
        inside = index == i
        n = int(inside.sum())
        out.append(
            {
                "low": low,
                "high": high,
                "count": n,
                "confidence": confidence[inside].mean().item() if n else math.nan,
                "accuracy": correct[inside].mean().item() if n else math.nan,
            }
        )
    return out


def plot_reliability(curves: dict[str, list[dict]]):
    """The reliability diagram: accuracy against confidence per bin, one line per curve (before
    and after temperature scaling), the diagonal a perfectly calibrated model follows, and how many
    images each bin holds."""
    fig, (ax, counts) = plt.subplots(
        2, 1, figsize=(6.5, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for (name, bins), style in zip(curves.items(), ("o-", "s--")):
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], style, label=name)
    first = next(iter(curves.values()))
    width = first[0]["high"] - first[0]["low"]
    counts.bar(
        [b["low"] + width / 2 for b in first], [b["count"] for b in first], width=width * 0.9
    )
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Reliability diagram ({ECE_BINS} confidence bins)")
    counts.set_xlabel("confidence (top-class probability)")
    counts.set_ylabel("images")
    counts.set_xlim(0, 1)
    return fig


def hardware_name(device: torch.device | str | None = None) -> str:
    """The GPU's name on a CUDA device, else the CPU's model name."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
