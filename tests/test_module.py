"""Classifier, the LightningModule (model/module.py): which stage each option (augmentation,
label smoothing, l2, TTA) applies to, the exact training loss and accuracy, per-image epoch
metrics, stepping the plateau schedule on the monitored metric, and its hyperparameters."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn

from tests.conftest import cfg_for, image_batch, make_classifier, save_ckpt


def _training_step(module, x, y):
    """training_step on one batch, not the epoch's last (nothing logged, no Trainer needed);
    returns (the loss it returned, the logits the network gave)."""
    module._trainer = SimpleNamespace(is_last_batch=False)
    seen = []
    hook = module.net.register_forward_hook(lambda net, args, out: seen.append(out))
    try:
        loss = module.training_step((x, y), 0)
    finally:
        hook.remove()
    (logits,) = seen
    return loss, logits


class _Spy(nn.Module):
    """Stands in for Augment: records each batch it is given, returns it unchanged."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x.float()


def test_augmentation_runs_in_training_only(tmp_path):
    # Keras's preprocessing layers are inactive at inference: validation and test see raw images.
    module = make_classifier(tmp_path, "augment.flip=true")
    assert module.augment is not None  # the premise: the option reached the module
    module.augment = spy = _Spy()
    x, y = image_batch()
    module.eval()
    module.validation_step((x, y), 0)
    module.test_step((x, y), 0)
    assert spy.seen == []
    module.train()
    _training_step(module, x, y)
    # the check can fail: training does augment
    assert len(spy.seen) == 1 and torch.equal(spy.seen[0], x)


def test_label_smoothing_applies_to_the_training_loss_only(tmp_path):
    # The reported val/test loss must stay the plain cross-entropy, comparable with the notebook's.
    module = make_classifier(tmp_path, "loss.label_smoothing=0.3")
    with torch.no_grad():  # larger logits, so that smoothed and plain cross-entropy differ clearly
        module.net.classifier[-1].weight.mul_(20)
    x, y = image_batch()
    module.train()
    loss, logits = _training_step(module, x, y)
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.3).item(), rel=1e-6
    )
    module.eval()
    with torch.no_grad():
        module.validation_step((x, y), 0)
        plain = F.cross_entropy(module(x), y).item()
    assert module.val_loss.compute().item() == pytest.approx(plain, rel=1e-6)
    # smoothing would show
    assert abs(plain - F.cross_entropy(module(x), y, label_smoothing=0.3).item()) > 0.01


def test_l2_sums_kernels_only_and_is_part_of_the_reported_train_loss(tmp_path):
    # Keras's kernel_regularizer: l2 * sum(w^2) over conv and dense kernels; biases and BatchNorm's
    # gamma/beta are not regularized. The penalty is in the loss Keras reports, so in train/loss
    # too.
    l2 = 0.01
    module = make_classifier(tmp_path, f"loss.l2={l2}")
    # non-zero biases (Keras init leaves them 0), so that counting them would show
    with torch.no_grad():
        for m in module.net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.fill_(0.1)
    kernels = [m.weight for m in module.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(kernels) == 8
    penalty = l2 * sum(w.pow(2).sum().item() for w in kernels)
    everything = l2 * sum(p.pow(2).sum().item() for p in module.net.parameters())
    assert everything - penalty > 0.1  # biases and BatchNorm's weights add a visible amount
    x, y = image_batch()
    module.eval()  # no dropout: the step's forward gives these logits again
    with torch.no_grad():
        logits = module(x)
    ce = F.cross_entropy(logits, y).item()
    loss, _ = _training_step(module, x, y)
    assert loss.item() == pytest.approx(ce + penalty, rel=1e-5)
    # the epoch's train/loss and train/acc: this loss, and the fraction of these logits right
    assert module.train_loss.compute().item() == pytest.approx(ce + penalty, rel=1e-5)
    right = (logits.argmax(1) == y).float().mean().item()
    assert module.train_acc.compute().item() == pytest.approx(right)


def test_tta_flip_averages_probabilities_not_logits(tmp_path):
    # The mean of the two softmaxes (Keras-style TTA on predicted probabilities), not the softmax
    # of the mean logits.
    module = make_classifier(tmp_path, "tta.flip=true")
    with torch.no_grad():  # larger logits, so that the two kinds of average differ clearly
        module.net.classifier[-1].weight.mul_(20)
    x, y = image_batch()
    module.eval()
    with torch.no_grad():
        module.validation_step((x, y), 0)
        logits = module.test_step((x, y), 0)
        a, b = module(x), module(x.flip(-1))
    expected = (a.softmax(-1) + b.softmax(-1)) / 2
    assert torch.allclose(logits.softmax(-1), expected, atol=1e-6)
    assert module.val_loss.compute().item() == pytest.approx(
        F.nll_loss(expected.log(), y).item(), rel=1e-5
    )
    # the logit average is distinguishable
    assert (((a + b) / 2).softmax(-1) - expected).abs().max() > 1e-3


def test_accuracy_is_keras_fraction_correct_without_per_step_sync(tmp_path, monkeypatch):
    module = make_classifier(tmp_path)
    y = torch.tensor([0, 0, 0, 0, 1, 2])  # uneven classes: micro and macro averages differ
    # 4 of 6 right; macro over present classes would be 0.58
    pred = torch.tensor([0, 0, 0, 1, 1, 1])
    # torch.unique would be a host-device sync per step on a GPU; torchmetrics skips it for
    # float logits.
    monkeypatch.setattr(torch, "unique", lambda *a, **k: pytest.fail("per-step torch.unique"))
    module.val_acc.update(torch.nn.functional.one_hot(pred, 10).float(), y)
    assert module.val_acc.compute().item() == pytest.approx(4 / 6)


def test_epoch_metrics_are_per_image_means_logged_once_per_epoch(tmp_path, monkeypatch):
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from cifar_lightning.model.module import Classifier

    module = make_classifier(tmp_path, "scheduler=none")
    x, y = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.arange(10)
    # batches of 4, 4 and 2: a batch mean would differ
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
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
    # once per epoch, not per step
    assert sorted(calls) == ["train/acc", "train/loss", "val/acc", "val/loss"]
    module.eval()
    with torch.no_grad():
        logits = module(x)
    metrics = trainer.callback_metrics
    assert metrics["val/loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert metrics["val/acc"].item() == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["train/acc"].item() <= 1


def test_module_steps_plateau_schedule_on_val_loss_not_val_acc(tmp_path, monkeypatch):
    # The module steps the plateau schedule itself (on_validation_epoch_end) from callback_metrics.
    # Here val/loss is flat (a cut after epoch 4 with Keras patience 3) while val/acc falls, which
    # in "min" mode is an improvement every epoch (never a cut): the cuts say which metric was read.
    module = make_classifier(tmp_path)  # the plateau schedule, monitor val/loss
    configured = module.configure_optimizers()
    optimizer, sched = configured["optimizer"], configured["lr_scheduler"]
    trainer = SimpleNamespace(
        sanity_checking=False,
        callback_metrics={},
        lr_scheduler_configs=[LRSchedulerConfig(**sched)],
    )
    module.trainer = trainer
    monkeypatch.setattr(module, "log_epoch", lambda stage: None)  # self.log needs a real Trainer
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


def test_tta_shift_averages_probabilities_over_the_six_views(tmp_path):
    from cifar_lightning.model.net import tta_views

    fast = cfg_for(tmp_path, tmp_path, "experiment=fast").tta  # validates and tests on 6 views
    assert (fast.flip, fast.shift) == (True, 1)
    module = make_classifier(tmp_path, "tta.flip=true", "tta.shift=1")
    with torch.no_grad():
        module.net.classifier[-1].weight.mul_(20)
    x, y = image_batch()
    module.eval()
    with torch.no_grad():
        logits = module.test_step((x, y), 0)
        module.validation_step((x, y), 0)
        probs = [module(v).softmax(-1) for v in tta_views(x, True, 1)]
    assert len(probs) == 6
    assert torch.allclose(logits.softmax(-1), torch.stack(probs).mean(0), atol=1e-6)
    assert module.val_loss.compute().item() == pytest.approx(
        F.nll_loss(torch.stack(probs).mean(0).log(), y).item(), rel=1e-5
    )
    # the check can fail: the flip pair alone gives other probabilities
    assert (logits.softmax(-1) - (probs[0] + probs[1]) / 2).abs().max() > 1e-4


def test_tta_shift_along_axes_validates_on_the_ten_views(tmp_path):
    from cifar_lightning.model.net import tta_views

    module = make_classifier(tmp_path, "tta.flip=true", "tta.shift=1", "tta.shift_along=axes")
    with torch.no_grad():
        module.net.classifier[-1].weight.mul_(20)
    x, _ = image_batch()
    module.eval()
    with torch.no_grad():
        logits = module.evaluation_logits(x)
        probs = torch.stack([module(v).softmax(-1) for v in tta_views(x, True, 1, "axes")])
        diagonal = torch.stack([module(v).softmax(-1) for v in tta_views(x, True, 1)])
    assert len(probs) == 10
    assert torch.allclose(logits.softmax(-1), probs.mean(0), atol=1e-6)
    assert (logits.softmax(-1) - diagonal.mean(0)).abs().max() > 1e-4  # the premise


def test_norm_bias_decay_false_exempts_batchnorm_and_biases(tmp_path):
    sgd = ["scheduler=none", "optim=sgd", "optim.weight_decay=5e-4"]
    module = make_classifier(tmp_path, *sgd, "optim.norm_bias_decay=false")
    groups = module.configure_optimizers().param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])  # the 6 conv + 2 dense kernels
    assert len(groups[0]["params"]) == 8 and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == 815_018
    module = make_classifier(tmp_path, *sgd, "optim.norm_bias_decay=true")
    (group,) = module.configure_optimizers().param_groups
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == 28


def test_whiten_initialises_the_first_conv_from_the_training_images_at_fit_setup(tmp_path):
    module = make_classifier(tmp_path, "whiten.enabled=true", "whiten.images=4")
    seen = []
    images, _ = image_batch(8)
    module._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(first_train_images=lambda n: seen.append(n) or images[:n])
    )
    before = module.net.features[0].weight.clone()
    module.setup("test")
    assert seen == [] and torch.equal(module.net.features[0].weight, before)
    rng = torch.random.get_rng_state()
    module.setup("fit")
    # no random numbers drawn: a resumed run's random streams stay aligned with an uninterrupted one
    assert torch.equal(torch.random.get_rng_state(), rng)
    weight = module.net.features[0].weight
    assert seen == [4] and not torch.equal(weight, before)
    assert torch.equal(weight[16:], -weight[:16])


def test_hyperparameters_are_the_config_groups_as_plain_data(tmp_path):
    # Checkpoints store them and load with weights_only=True, which refuses OmegaConf nodes and
    # Enums; the module rebuilt from them is the one that trained.
    from cifar_lightning.model.module import Classifier

    module = make_classifier(
        tmp_path, "loss.label_smoothing=0.1", "tta.shift=2", precision="bf16-mixed"
    )
    hp = dict(module.hparams)
    assert set(hp) == {
        *("model", "optim", "scheduler", "class_names", "loss", "augment", "tta", "whiten"),
        *("speed", "monitor", "image_size", "precision", "distill"),
    }
    assert hp["loss"] == {"label_smoothing": 0.1, "l2": 0.0}
    assert hp["tta"] == {"flip": False, "shift": 2, "shift_along": "diagonal"}
    assert hp["precision"] == "bf16-mixed"
    assert hp["distill"] == {"teacher": None, "temperature": 4.0, "weight": 0.5}
    assert "label_smoothing" not in hp["model"] and "tta_flip" not in hp["model"]
    saved = torch.load(save_ckpt(module, tmp_path / "m.ckpt"), weights_only=True)
    assert saved["hyper_parameters"] == hp
    rebuilt = Classifier(**saved["hyper_parameters"])
    rebuilt.load_state_dict(saved["state_dict"])
    x, _ = image_batch()
    module.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
