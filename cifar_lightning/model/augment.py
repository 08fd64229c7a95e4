"""Batched, on-device augmentation in the spirit of Keras's preprocessing layers (RandomFlip,
RandomRotation, RandomZoom, RandomTranslation): one affine grid per image, one grid_sample per
batch. Two more, for long runs: whole-pixel shifts (random crops of the reflect-padded image, which
keep the pixels sharp where a fractional shift blurs them) and cutout (a zeroed square)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Augment(nn.Module):
    def __init__(
        self,
        flip: bool = True,
        rotation_deg: float = 0.0,
        zoom: float = 0.0,
        translate: float = 0.0,
        crop_pad: int = 0,
        cutout: int = 0,
    ):
        super().__init__()
        self.flip, self.rotation_deg, self.zoom, self.translate = (
            flip,
            rotation_deg,
            zoom,
            translate,
        )
        self.crop_pad, self.cutout = int(crop_pad), int(cutout)  # pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x C x H x W, any dtype; returns float 0-255 (the network rescales)."""
        n, dev = x.shape[0], x.device
        x = x.float()
        if self.flip:
            flip = torch.rand(n, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.crop_pad:
            x = random_crop(x, self.crop_pad)
        if self.cutout:
            x = cutout(x, self.cutout)
        if not (self.rotation_deg or self.zoom or self.translate):
            return x
        u = lambda: torch.rand(n, device=dev) * 2 - 1  # noqa: E731 - uniform in [-1, 1)
        angle = u() * math.radians(self.rotation_deg)
        scale = 1 + u() * self.zoom  # > 1 zooms out, < 1 zooms in
        tx, ty = u() * 2 * self.translate, u() * 2 * self.translate  # grid units: 2 = full width
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        # fp32 even under bf16-mixed: autocast would build the grid with a bf16 matmul (coordinates
        # good to about 1/256 of the image), then grid_sample would sample at the rounded positions
        with torch.autocast(dev.type, enabled=False):
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            return F.grid_sample(
                x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
            )


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image shifted by whole pixels, up to `pad` each way: a crop of the reflect-padded
    batch at a random offset per image, gathered with one index."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1), device=x.device) for _ in range(2))
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # n x 1 x h x 1
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # n x 1 x 1 x w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """A size x size square zeroed at a random centre per image (clipped at the borders)."""
    n, _, h, w = x.shape
    cy, cx = (torch.randint(0, side, (n, 1, 1), device=x.device) for side in (h, w))
    ys = torch.arange(h, device=x.device)[None, :, None] - cy
    xs = torch.arange(w, device=x.device)[None, None, :] - cx
    half = size // 2  # offsets from the centre: -half ... size - half - 1
    inside = (ys >= -half) & (ys < size - half) & (xs >= -half) & (xs < size - half)  # n x h x w
    return x.masked_fill(inside[:, None], 0.0)
