"""What evaluate and predict share: the device and batched inference of a loaded network, at
the precision its checkpoint trained at."""

from __future__ import annotations

import contextlib

import torch

from cifar_lightning.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA GPU is usable here; use device=cpu or device=auto")
    return torch.device(name)


# trainer.precision (with Lightning's short names) -> the autocast dtype its test phase ran under
AUTOCAST = {
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16": torch.float16,
}


def autocast_dtype(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype to run a network trained at trainer.precision=`precision` under autocast on
    `device`: bfloat16 for bf16-mixed, float16 for 16-mixed on a GPU; None (fp32) for anything
    else, and for checkpoints from before the precision was stored."""
    dtype = AUTOCAST.get(str(precision))
    if dtype is torch.float16 and device.type != "cuda":
        return None
    return dtype


def describe_precision(precision: str | None, device: torch.device) -> str:
    """One line for the log: the precision inference runs at, and why."""
    dtype = autocast_dtype(precision, device)
    if dtype is not None:
        kind = "bf16" if dtype is torch.bfloat16 else "fp16"
        return f"precision {precision} ({kind} autocast on {device.type}): the run's own"
    if precision is None:
        return "precision 32-true: the checkpoint does not record the precision it trained at"
    if str(precision) in ("32-true", "32"):
        return "precision 32-true: the run's own"
    return f"precision 32-true on {device.type} (the run trained at {precision})"


@torch.no_grad()
def predict_logits(
    net,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str | None = None,
) -> torch.Tensor:
    """float32 logits of `images`, `batch_size` at a time on `device`, under the autocast of
    trainer.precision=`precision` (autocast_dtype), as the run's own test phase computed them."""
    net = net.to(device)
    dtype = autocast_dtype(precision, device)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    batches = (images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size))
    with autocast:
        return torch.cat([net(batch).float().cpu() for batch in batches])
