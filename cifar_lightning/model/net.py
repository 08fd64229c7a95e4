"""Model S as a plain nn.Module: it knows nothing of Lightning, so tests, the benchmark's plain
loop and `predict` use it directly. Input: uint8 or float images 0-255, N x 3 x 32 x 32."""

from __future__ import annotations

import math

import torch
from torch import nn

from cifar_lightning.errors import UserError

MODELS = ("s",)
INITS = ("glorot", "torch")  # model.init: Keras's glorot_uniform, or PyTorch's default


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
        if init == "glorot":
            self.apply(_glorot_uniform)
        elif init != "torch":
            raise UserError(f"model.init={init} is not one of: {', '.join(INITS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Rescaling by 1/255 happens here, as Keras's Rescaling layer does."""
        x = x.float() * (1.0 / 255.0)
        # Keras flattens NHWC; we flatten NCHW. The layer is the same up to a fixed permutation
        # of the 2048 inputs, so parameter count and function class are identical.
        return self.classifier(self.features(x))


def flip_average(forward, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the log of the mean softmax of x and its mirror image, used as logits
    (log-space, so finite where a softmax underflows)."""
    pair = torch.stack([forward(x).log_softmax(-1), forward(x.flip(-1)).log_softmax(-1)])
    return pair.logsumexp(0) - math.log(2)


class FlipAverage(nn.Module):
    """A network that predicts as flip_average: evaluate and predict wrap a model.tta_flip
    checkpoint in it, so they score it as its own test phase did."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_average(self.net, x)


def _glorot_uniform(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)  # same fans as Keras's glorot_uniform for these layers
        nn.init.zeros_(m.bias)


def build_net(cfg: dict, image_size: int = 32) -> ModelS:
    """Model S from a model config's plain keys. Never reads a `_target_`: checkpoints are data."""
    if cfg.get("name") not in MODELS:
        raise UserError(f"model.name={cfg.get('name')} is not one of: {', '.join(MODELS)}")
    net = ModelS(
        widths=tuple(cfg["widths"]),
        hidden=int(cfg["hidden"]),
        dropout=float(cfg["dropout"]),
        num_classes=int(cfg["num_classes"]),
        image_size=image_size,
        init=cfg["init"],
        bn_momentum=float(cfg["bn_momentum"]),
        bn_eps=float(cfg["bn_eps"]),
    )
    if cfg.get("channels_last"):
        net = net.to(memory_format=torch.channels_last)
    return net


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
