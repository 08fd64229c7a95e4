"""Model S as a plain nn.Module: it knows nothing of Lightning, so tests, the benchmark's plain
loop and `predict` use it directly. Input: uint8 or float images 0-255, N x 3 x 32 x 32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ModelS(nn.Module):
    def __init__(
        self,
        widths=(32, 64, 128),
        hidden=256,
        dropout=0.5,
        num_classes=10,
        image_size=32,
        init="glorot",
        bn_momentum=0.01,
        bn_eps=1e-3,
    ):
        super().__init__()
        layers, c_in = [], 3
        for width in widths:
            for _ in range(2):  # Keras order: Conv -> ReLU -> BatchNorm
                layers += [
                    nn.Conv2d(c_in, width, 3, padding=1),
                    nn.ReLU(inplace=True),
                    nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum),
                ]
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        if INITS[init] is not None:
            self.apply(INITS[init])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Rescaling by 1/255 happens here, as Keras's Rescaling layer does."""
        x = x.float() * (1.0 / 255.0)
        # Keras flattens NHWC; we flatten NCHW. The layer is the same up to a fixed permutation
        # of the 2048 inputs, so parameter count and function class are identical.
        return self.classifier(self.features(x))


class TeacherNet(nn.Module):
    """The distillation teacher (`model=teacher`): an airbench-style net (Keller Jordan,
    arXiv:2404.00498) of about 2.2x Model S's multiply-adds, trained by `experiment=teacher`. A
    3x3 stem conv of widths[0] filters (whitened like Model S's first conv), then for each later
    width a group [Conv3x3 -> MaxPool2 -> BatchNorm -> GELU -> Conv3x3 -> BatchNorm -> GELU]:
    the second conv of each group runs at the pooled resolution, which halves its cost. A global
    max-pool and one dense layer give the logits. `hidden` is Model S's and unused here."""

    def __init__(
        self,
        widths=(32, 64, 128, 256),
        hidden=0,
        dropout=0.0,
        num_classes=10,
        image_size=32,
        init="torch",
        bn_momentum=0.1,
        bn_eps=1e-5,
    ):
        super().__init__()

        def bn_gelu(width: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum), nn.GELU()]

        layers = [nn.Conv2d(3, widths[0], 3, padding=1), *bn_gelu(widths[0])]
        for c_in, width in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.MaxPool2d(2)]
            layers += [*bn_gelu(width), nn.Conv2d(width, width, 3, padding=1, bias=False)]
            layers += bn_gelu(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(widths[-1], num_classes),
        )
        if INITS[init] is not None:
            self.apply(INITS[init])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * (1.0 / 255.0)
        return self.classifier(self.features(x))


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by whole pixels (down dy, right dx), the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (p, p, p, p), mode="reflect")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


# tta.shift_along: the whole-pixel moves (down, right) of each view, per `pixels`
SHIFT_MOVES = {
    "diagonal": lambda p: [(p, p), (-p, -p)],
    "axes": lambda p: [(0, p), (0, -p), (p, 0), (-p, 0)],
}


def tta_views(
    x: torch.Tensor, flip: bool, pixels: int, along: str = "diagonal"
) -> list[torch.Tensor]:
    """The images test-time augmentation averages over: x, its mirror (flip), and each of those
    moved by `pixels` (pixels > 0) diagonally both ways, or left, right, up and down (along="axes"):
    1, 2, 3, 5, 6 or 10 views."""
    views = [x, x.flip(-1)] if flip else [x]
    if pixels:
        views += [shift(v, dy, dx) for v in views[:] for dy, dx in SHIFT_MOVES[along](pixels)]
    return views


def tta_average(
    forward, x: torch.Tensor, flip: bool, pixels: int = 0, along: str = "diagonal"
) -> torch.Tensor:
    """Test-time augmentation: the log of the mean softmax over tta_views, used as logits
    (log-space, so finite where a softmax underflows)."""
    views = tta_views(x, flip, pixels, along)
    logp = torch.stack([forward(v).log_softmax(-1) for v in views])
    return logp.logsumexp(0) - math.log(len(views))


class TestTimeAugment(nn.Module):
    """A network that predicts as tta_average: evaluate and predict wrap a checkpoint trained
    with tta.flip or tta.shift in it, so they score it as its test phase did."""

    def __init__(self, net: nn.Module, flip: bool, pixels: int = 0, along: str = "diagonal"):
        super().__init__()
        self.net, self.flip, self.pixels, self.along = net, bool(flip), int(pixels), along

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_average(self.net, x, self.flip, self.pixels, self.along)


def _glorot_uniform(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)  # same fans as Keras's glorot_uniform for these layers
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# model.init: Keras's glorot_uniform, or PyTorch's default (nothing to do)
INITS = {"glorot": _glorot_uniform, "torch": None}


def build_net(cfg: dict, image_size: int = 32, channels_last: bool = False) -> nn.Module:
    """Model S (or the teacher) from a model config's plain keys (schema.ModelConfig), in the NHWC
    memory layout if `channels_last`. Never reads a `_target_`: checkpoints are data."""
    net = MODELS[cfg["name"]](
        widths=tuple(cfg["widths"]),
        hidden=int(cfg["hidden"]),
        dropout=float(cfg["dropout"]),
        num_classes=int(cfg["num_classes"]),
        image_size=image_size,
        init=cfg["init"],
        bn_momentum=float(cfg["bn_momentum"]),
        bn_eps=float(cfg["bn_eps"]),
    )
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


MODELS = {"s": ModelS, "teacher": TeacherNet}  # model.name


def count_params(net: nn.Module) -> tuple[int, int]:
    """(trainable parameters, BatchNorm running mean + var elements), as Keras counts them.
    PyTorch's num_batches_tracked counters (one per BatchNorm) are not counted, as Keras has none.
    """
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    stats = sum(
        b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))
    )
    return trainable, stats


def summary(net: nn.Module) -> str:
    rows = [f"{'layer':<28}{'output':>10}{'params':>10}"]
    for name, m in net.named_modules():
        if len(list(m.children())) == 0:
            n = sum(p.numel() for p in m.parameters())
            out = getattr(
                m, "out_channels", getattr(m, "out_features", getattr(m, "num_features", ""))
            )
            rows.append(f"{name + ' ' + type(m).__name__:<28}{str(out):>10}{n:>10,}")
    trainable, stats = count_params(net)
    rows.append(f"Trainable params: {trainable:,}")
    rows.append(
        f"Non-trainable params: {stats:,} (BatchNorm running mean+var; Lightning's summary says 0)"
    )
    return "\n".join(rows)
