from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_lightning.config import CONF_DIR
from cifar_lightning.model.net import build_net, count_params
from tests.conftest import cfg_for
from omegaconf import OmegaConf

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_parameter_count_matches_keras(model, tmp_path):
    cfg = cfg_for(tmp_path, tmp_path, f"model={model}")
    net = build_net(OmegaConf.to_container(cfg.model, resolve=True))
    assert count_params(net) == (815_018, 896)
    # Lightning would also count num_batches_tracked (6 more); Keras has no such counter.
    assert sum(b.numel() for b in net.buffers()) == 896 + 6
    assert net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


def test_keras_init_and_batchnorm(tmp_path):
    net = build_net(OmegaConf.to_container(cfg_for(tmp_path, tmp_path).model, resolve=True))
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)  # Keras zero biases
    first = convs[0].weight  # glorot bound sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (27 + 288))
    assert first.abs().max() <= (6 / (27 + 288)) ** 0.5 and first.abs().max() > 0.9 * (6 / 315) ** 0.5
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.01, 1e-3)  # Keras momentum 0.99, epsilon 1e-3


def test_torch_fidelity_gives_pytorch_defaults(tmp_path):
    net = build_net(OmegaConf.to_container(cfg_for(tmp_path, tmp_path, "fidelity=torch").model, resolve=True))
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert torch.count_nonzero(conv.bias) > 0  # PyTorch's default init has non-zero biases
