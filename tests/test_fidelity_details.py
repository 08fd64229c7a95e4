"""Keras details the other tests leave open (shared docs keras-fidelity.md): glorot on every kernel,
the built-in Rescaling, the exact layer order, what the plateau schedule is stepped on, its absolute
min_delta, and which epoch counts as best."""

from types import SimpleNamespace

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig
from omegaconf import OmegaConf
from torch import nn

from cifar_lightning.model.net import build_net
from cifar_lightning.model.schedule import build_scheduler
from cifar_lightning.notebook import BEST_EPOCH
from cifar_lightning.notebook import VAL_LOSS as NOTEBOOK_VAL_LOSS
from cifar_lightning.report import best_epoch
from tests.conftest import cfg_for


def _container(node):
    return OmegaConf.to_container(node, resolve=True)


def _net(tmp_path, *overrides):
    return build_net(_container(cfg_for(tmp_path, tmp_path, *overrides).model))


def _glorot_bounds(net):
    """{layer: (max |w|, glorot bound sqrt(6 / (fan_in + fan_out)))} for every Conv2d and Linear kernel.

    The bound is rounded to the weights' dtype: a float32 draw at the edge can round up past the float64
    bound (seen in about 1 run in 30 for the 2048 -> 256 layer)."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = torch.tensor((6 / (fan_in + fan_out)) ** 0.5, dtype=m.weight.dtype).item()
            out[name] = (m.weight.abs().max().item(), bound)
    return out


def test_glorot_uniform_covers_dense_layers_as_well_as_convs(tmp_path):
    # Keras's Dense default is glorot_uniform too; torch's Linear default (bound 1/sqrt(fan_in), 0.022 for
    # the 2048 -> 256 layer) is less than half its glorot bound (0.051), so the two are easy to tell apart.
    net = _net(tmp_path)
    bounds = _glorot_bounds(net)
    assert len(bounds) == 8  # 6 convs + 2 dense
    outside = {name: wb for name, wb in bounds.items() if not 0.9 * wb[1] < wb[0] <= wb[1]}
    assert outside == {}
    assert all(
        torch.count_nonzero(m.bias) == 0
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    torch_bounds = _glorot_bounds(_net(tmp_path, "fidelity=torch"))
    assert not all(
        0.9 * bound < w <= bound for w, bound in torch_bounds.values()
    )  # the check can fail


def test_network_rescales_uint8_input_by_1_over_255_itself(tmp_path):
    # Keras's Rescaling(1/255) is the model's first layer, so loaders hand over raw 0-255 pixels.
    torch.manual_seed(0)
    net = _net(
        tmp_path
    ).eval()  # eval: no dropout; BatchNorm with its initial statistics is near-identity
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        by_hand = net.classifier(net.features(x.float() / 255))
        assert torch.allclose(net(x), by_hand, rtol=1e-5, atol=1e-6)
        assert torch.allclose(
            net(x.float()), by_hand, rtol=1e-5, atol=1e-6
        )  # float 0-255 input as well


def test_layer_order_is_keras_model_s(tmp_path):
    # Keras's Sequential: per block (Conv2D same -> ReLU activation -> BatchNormalization) x 2 -> MaxPool2D,
    # then Flatten -> Dropout(0.5) -> Dense 256 relu -> Dropout(0.5) -> Dense 10. The order of ReLU and
    # BatchNorm, and both dropouts, change the function but not the parameter count.
    net = _net(tmp_path)
    leaves = [m for m in net.modules() if not list(m.children())]
    block = [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d]
    head = [nn.Flatten, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [type(m) for m in leaves] == block * 3 + head
    convs = [m for m in leaves if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 32, 64, 64, 128, 128]
    assert all(
        m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding in ((1, 1), "same")
        for m in convs
    )
    assert all(m.kernel_size == 2 for m in leaves if isinstance(m, nn.MaxPool2d))
    assert [m.p for m in leaves if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert [(m.in_features, m.out_features) for m in leaves if isinstance(m, nn.Linear)] == [
        (2048, 256),
        (256, 10),
    ]
    seen = []
    next(m for m in leaves if isinstance(m, nn.Flatten)).register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape)
    )
    net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert seen == [torch.Size([1, 128, 4, 4])]  # 4x4x128 feature map flattened to 2048


def test_module_steps_plateau_schedule_on_val_loss_not_val_acc(tmp_path, monkeypatch):
    # The module steps the plateau schedule itself (on_validation_epoch_end) from callback_metrics.
    # Here val/loss is flat (a cut after epoch 4 with Keras patience 3) while val/acc falls, which in
    # "min" mode is an improvement every epoch (never a cut): the cuts say which metric was read.
    from cifar_lightning.model.module import Classifier

    cfg = cfg_for(tmp_path, tmp_path)
    module = Classifier(
        model=_container(cfg.model),
        optim=_container(cfg.optim),
        scheduler=_container(cfg.scheduler),
        class_names=[str(i) for i in range(10)],
        monitor=cfg.monitor,
    )
    configured = module.configure_optimizers()
    optimizer, sched = configured["optimizer"], configured["lr_scheduler"]
    trainer = SimpleNamespace(
        sanity_checking=False,
        callback_metrics={},
        lr_scheduler_configs=[LRSchedulerConfig(**sched)],
    )
    module.trainer = trainer
    monkeypatch.setattr(module, "_log_epoch", lambda stage: None)  # self.log needs a real Trainer
    cuts = []
    for epoch in range(1, 7):
        trainer.callback_metrics = {
            "val/loss": torch.tensor(1.0),
            "val/acc": torch.tensor(1.0 - 0.1 * epoch),
        }
        before = optimizer.param_groups[0]["lr"]
        module.on_validation_epoch_end()
        if optimizer.param_groups[0]["lr"] < before:
            cuts.append(epoch)
    assert cuts == [4]


def _plateau_cuts(cfg, losses):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, _ = build_scheduler(_container(cfg.scheduler), opt, None)
    cuts = []
    for epoch, loss in enumerate(losses, start=1):
        before = opt.param_groups[0]["lr"]
        sched.step(loss)
        if opt.param_groups[0]["lr"] < before:
            cuts.append(epoch)
    return cuts


def test_plateau_min_delta_is_absolute_1e4(tmp_path):
    # Keras: improvement means val_loss < best - 1e-4 (absolute). A loss near 0.1 falling 3e-5 an epoch
    # never gets 1e-4 below its best within 3 epochs, so Keras cuts after epoch 4. A relative threshold
    # (1e-4 x 0.1 = 1e-5) or none at all would count every epoch as an improvement. (Near a loss of 1.0
    # relative and absolute thresholds coincide, hence 0.1.)
    losses = [0.1 - 3e-5 * i for i in range(5)]
    assert _plateau_cuts(cfg_for(tmp_path, tmp_path), losses) == [4]
    assert _plateau_cuts(cfg_for(tmp_path, tmp_path, "scheduler.min_delta=0"), losses) == []


def test_best_epoch_keeps_the_first_of_tied_val_losses():
    # Keras's checkpoint and restore-best count only strict improvements, so a tie keeps the earlier epoch.
    rows = [
        {"epoch": "1", "val_loss": "1.0"},
        {"epoch": "2", "val_loss": "1.0"},
    ]  # as read from history.csv
    assert best_epoch(rows) == 1
    assert (
        best_epoch([{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 1.0}]) == 1
    )  # as History keeps them


def test_best_epoch_follows_the_monitor_and_its_mode():
    rows = [
        {"epoch": 1, "val_loss": 1.0, "val_acc": 0.5},
        {"epoch": 2, "val_loss": 0.9, "val_acc": 0.4},
        {"epoch": 3, "val_loss": 1.1, "val_acc": 0.6},
        {"epoch": 4, "val_loss": 1.2, "val_acc": 0.6},
    ]
    assert best_epoch(rows) == 2
    assert best_epoch(rows, "val/acc", "max") == 3  # the first of the tied best
    assert best_epoch(rows, "val/acc", "min") == 2


def test_best_epoch_of_the_notebook_log_is_13():
    # report.best_epoch itself, on the notebook's val_loss log (test_schedule checks the list by hand).
    rows = [{"epoch": e, "val_loss": v} for e, v in enumerate(NOTEBOOK_VAL_LOSS, start=1)]
    assert best_epoch(rows) == BEST_EPOCH == 13
