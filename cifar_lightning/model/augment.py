"""Batched, on-device augmentation in the spirit of Keras's preprocessing layers (RandomFlip,
RandomRotation, RandomZoom, RandomTranslation): one affine grid per image, one grid_sample per
batch."""

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
    ):
        super().__init__()
        self.flip, self.rotation_deg, self.zoom, self.translate = (
            flip,
            rotation_deg,
            zoom,
            translate,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x C x H x W, any dtype; returns float 0-255 (the network rescales)."""
        n, dev = x.shape[0], x.device
        x = x.float()
        if self.flip:
            flip = torch.rand(n, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
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
