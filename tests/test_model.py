import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cifar_lightning.config import CONF_DIR
from cifar_lightning.model.net import build_net, count_params
from tests.conftest import cfg_for

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
    assert (
        first.abs().max() <= (6 / (27 + 288)) ** 0.5 and first.abs().max() > 0.9 * (6 / 315) ** 0.5
    )
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.01, 1e-3)  # Keras momentum 0.99, epsilon 1e-3


def test_torch_fidelity_gives_pytorch_defaults(tmp_path):
    net = build_net(
        OmegaConf.to_container(cfg_for(tmp_path, tmp_path, "fidelity=torch").model, resolve=True)
    )
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert torch.count_nonzero(conv.bias) > 0  # PyTorch's default init has non-zero biases


def test_augment_flips_and_warps_on_the_batch():
    from cifar_lightning.model.augment import Augment

    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) % 256
    x = x.repeat(32, 1, 1, 1)
    flipped = Augment(flip=True)(x)
    is_flip = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x)]
    is_same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 16 <= sum(is_flip) <= 48
    warped = Augment(flip=False, rotation_deg=10, zoom=0.1, translate=0.1)(x)
    assert warped.shape == x.shape and not torch.equal(warped, x)
    assert warped.min() >= 0 and warped.max() <= 255  # reflection padding, bilinear: stays in range


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
)
def test_experiments_train_one_epoch(experiment, tiny_layout, tmp_path):
    from cifar_lightning.train import train

    # 8 steps of 16 tiny images: peak lr 0.1 would outrun BatchNorm's running statistics (momentum 0.01)
    # and validation would be NaN; the full recipe runs on real data (RESULTS.md).
    m = train(
        cfg_for(
            tmp_path,
            tiny_layout,
            f"experiment={experiment}",
            "trainer.max_epochs=1",
            "logger=none",
            "data.batch_size=16",
            "scheduler.max_lr=0.01" if experiment == "best" else "seed=0",
        )
    )
    assert (
        m["trainable_params"] == 815_018 and m["epochs_run"] == 1 and 0 <= m["test_accuracy"] <= 1
    )
    # the recipe reached the module and the optimizer that trained, not only the config
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    hp, group = ckpt["hyper_parameters"], ckpt["optimizer_states"][0]["param_groups"][0]
    assert hp["model"]["augment"]["flip"] is True
    if experiment == "next":
        assert hp["model"]["l2"] == 1e-4 and group["betas"] == (0.9, 0.999)  # Adam
    else:
        assert hp["model"]["tta_flip"] and hp["model"]["label_smoothing"] == 0.1
        assert group["nesterov"] is True and group["weight_decay"] == 5e-4  # SGD
        assert (
            ckpt["lr_schedulers"][0]["total_steps"] == 8
        )  # one-cycle over the whole fit: 8 steps of 16


def test_accuracy_is_keras_fraction_correct_without_per_step_sync(tmp_path, monkeypatch):
    from cifar_lightning.model.module import Classifier

    cfg = cfg_for(tmp_path, tmp_path)
    module = Classifier(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim={},
        scheduler=None,
        class_names=[str(i) for i in range(10)],
    )
    y = torch.tensor([0, 0, 0, 0, 1, 2])  # uneven classes: micro and macro averages differ
    pred = torch.tensor(
        [0, 0, 0, 1, 1, 1]
    )  # 4 of 6 right; macro over present classes would be 0.58
    # torch.unique would be a host-device sync per step on a GPU; torchmetrics skips it for float logits.
    monkeypatch.setattr(torch, "unique", lambda *a, **k: pytest.fail("per-step torch.unique"))
    module.val_acc.update(torch.nn.functional.one_hot(pred, 10).float(), y)
    assert module.val_acc.compute().item() == pytest.approx(4 / 6)


def test_epoch_metrics_are_per_image_means_logged_once_per_epoch(tmp_path, monkeypatch):
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from cifar_lightning.model.module import Classifier

    cfg = cfg_for(tmp_path, tmp_path)
    container = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    torch.manual_seed(0)
    module = Classifier(
        model=container(cfg.model),
        optim=container(cfg.optim),
        scheduler=None,
        class_names=[str(i) for i in range(10)],
    )
    x, y = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.arange(10)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=4
    )  # batches of 4, 4 and 2: a batch mean would differ
    calls, log = [], Classifier.log
    monkeypatch.setattr(
        Classifier,
        "log",
        lambda self, name, *a, **k: calls.append(name) or log(self, name, *a, **k),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader)
    assert sorted(calls) == [
        "train/acc",
        "train/loss",
        "val/acc",
        "val/loss",
    ]  # once per epoch, not per step
    module.eval()
    with torch.no_grad():
        logits = module(x)
    metrics = trainer.callback_metrics
    assert metrics["val/loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert metrics["val/acc"].item() == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["train/acc"].item() <= 1
