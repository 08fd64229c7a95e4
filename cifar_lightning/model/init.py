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
def whiten_first_conv(
    conv: nn.Conv2d, images: torch.Tensor, eps_fraction: float = 1e-3, chunk_patches: int = 2**18
) -> None:
    """Set conv's weight and bias from `images` (N x C x H x W, 0-255, as the network receives
    them: it rescales by 1/255 first). eps_fraction: added variance, as a fraction of the mean
    variance, so the weakest directions are not blown up.

    The patch covariance is summed on the images' device in float64, about `chunk_patches`
    patches at a time (about 120 MB for 3x3 RGB patches), instead of unfolding every patch of
    every image at once (GBs for 5000 images)."""
    size = conv.weight[0].numel()
    if conv.out_channels % 2 or conv.out_channels // 2 > size:
        raise ValueError(f"cannot whiten a conv with {conv.out_channels} filters")
    h, w = images.shape[-2:]
    kh, kw = conv.kernel_size
    per_image = max((h - kh + 1) * (w - kw + 1), 1)
    step = max(chunk_patches // per_image, 1)
    total = torch.zeros(size, dtype=torch.float64, device=images.device)
    products = torch.zeros(size, size, dtype=torch.float64, device=images.device)
    n = 0
    for start in range(0, len(images), step):
        x = images[start : start + step].double() / 255.0
        patches = F.unfold(x, conv.kernel_size).transpose(1, 2).reshape(-1, size)
        total += patches.sum(0)
        products += patches.T @ patches
        n += len(patches)
    # float64 sums: subtracting the mean's outer product loses nothing that matters here
    mean = (total / n).cpu()
    cov = (products.cpu() - n * torch.outer(mean, mean)) / (n - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    half = conv.out_channels // 2
    scale = (eigenvalues[-half:] + eps_fraction * eigenvalues.mean()).rsqrt()
    top = eigenvectors[:, -half:].T * scale[:, None]  # half x patch size
    weight = torch.cat([top, -top])
    conv.weight.copy_(weight.reshape_as(conv.weight).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_((-weight @ mean).to(conv.bias.dtype))
