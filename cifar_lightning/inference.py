"""What evaluate and predict share: the device and batched inference of a loaded network."""

from __future__ import annotations

import torch

from cifar_lightning.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA GPU is usable here; use device=cpu or device=auto")
    return torch.device(name)


@torch.no_grad()
def predict_logits(
    net, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    net = net.to(device)
    batches = (images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size))
    return torch.cat([net(batch).float().cpu() for batch in batches])
