"""Data-dependent initialisation of the first convolution: whitening (model.whiten).

Its filters start as the ZCA-like whitening of 3x3 image patches, as in airbench (Keller Jordan,
arXiv:2404.00498), but stay trainable here. Half the filters are the top principal directions of
the patches scaled by 1/sqrt(variance), half their negatives, so the ReLU after the convolution
keeps both signs. The bias centres each filter's response on the mean patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def whiten_first_conv(conv: nn.Conv2d, images: torch.Tensor, eps_fraction: float = 1e-3) -> None:
    """Set conv's weight and bias from `images` (N x C x H x W, 0-255, as the network receives
    them: it rescales by 1/255 first). eps_fraction: added variance, as a fraction of the mean
    variance, so the weakest directions are not blown up."""
    if conv.out_channels % 2 or conv.out_channels // 2 > conv.weight[0].numel():
        raise ValueError(f"cannot whiten a conv with {conv.out_channels} filters")
    x = images.double() / 255.0
    patches = F.unfold(x, conv.kernel_size).transpose(1, 2).reshape(-1, conv.weight[0].numel())
    mean = patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending
    half = conv.out_channels // 2
    scale = (eigenvalues[-half:] + eps_fraction * eigenvalues.mean()).rsqrt()
    top = eigenvectors[:, -half:].T * scale[:, None]  # half x patch size
    weight = torch.cat([top, -top])
    conv.weight.copy_(weight.reshape_as(conv.weight).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_((-weight @ mean).to(conv.bias.dtype))
