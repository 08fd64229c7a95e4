"""Details of the LightningModule, augmentation, callbacks, checkpoint loading and the evaluate/predict
helpers that the other tests leave open: which stage each option applies to, and the exact sums."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from cifar_lightning.callbacks import History, InterruptCheckpoint
from cifar_lightning.config import compose
from cifar_lightning.errors import UserError
from cifar_lightning.evaluate import match_classes
from cifar_lightning.model.checkpoint import load_net
from cifar_lightning.model.module import Classifier
from cifar_lightning.wiring import pick_device
from tests.conftest import CLASSES, cfg_for, write_images

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


def _classifier(tmp_path, **model):
    cfg = cfg_for(tmp_path, tmp_path)
    torch.manual_seed(0)
    module = Classifier(
        model={**OmegaConf.to_container(cfg.model, resolve=True), **model},
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        scheduler=None,
        class_names=CLASSES,
    )
    return module


def _one_step(module, x, y):
    """train_step with a plain optimizer and backward, as a CUDA graph captures it; returns (loss, acc) sums."""
    module.train_sums = torch.zeros(2, dtype=torch.float64)
    module.train_step(x, y, torch.Tensor.backward, torch.optim.SGD(module.parameters(), lr=0.0))
    return module.train_sums.tolist()


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(
        n
    ) % 10


class _Spy(nn.Module):
    """Stands in for Augment: records each batch it is given, returns it unchanged."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x.float()


# ---------------------------------------------------------------- Classifier._step
def test_augmentation_runs_in_training_only(tmp_path):
    # Keras's preprocessing layers are inactive at inference: validation and test see the raw images.
    module = _classifier(tmp_path, augment={"flip": True})
    module.augment = spy = _Spy()
    x, y = _batch()
    module.eval()
    module.validation_step((x, y), 0)
    module.test_step((x, y), 0)
    assert spy.seen == []
    module.train()
    _one_step(module, x, y)
    assert len(spy.seen) == 1 and torch.equal(
        spy.seen[0], x
    )  # the check can fail: training does augment


def test_label_smoothing_applies_to_the_training_loss_only(tmp_path):
    # The reported val/test loss must stay the plain cross-entropy, comparable with the notebook's.
    module = _classifier(tmp_path, label_smoothing=0.3)
    with torch.no_grad():  # larger logits, so that smoothed and plain cross-entropy differ clearly
        module.net.classifier[-1].weight.mul_(20)
    x, y = _batch()
    module.train()
    loss, logits = module.train_loss_and_logits(x, y)
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.3).item(), rel=1e-6
    )
    module.eval()
    with torch.no_grad():
        module.validation_step((x, y), 0)
        plain = F.cross_entropy(module(x), y).item()
    assert module.val_loss.compute().item() == pytest.approx(plain, rel=1e-6)
    assert (
        abs(plain - F.cross_entropy(module(x), y, label_smoothing=0.3).item()) > 0.01
    )  # smoothing would show


def test_l2_sums_kernels_only_and_is_part_of_the_reported_train_loss(tmp_path):
    # Keras's kernel_regularizer: l2 * sum(w^2) over conv and dense kernels; biases and BatchNorm's gamma/beta
    # are not regularized. The penalty is in the loss Keras reports, so in train/loss as well.
    l2 = 0.01
    module = _classifier(tmp_path, l2=l2)
    with (
        torch.no_grad()
    ):  # non-zero biases (Keras init leaves them 0), so that counting them would show
        for m in module.net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.fill_(0.1)
    kernels = [m.weight for m in module.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(kernels) == 8
    penalty = l2 * sum(w.pow(2).sum().item() for w in kernels)
    everything = l2 * sum(p.pow(2).sum().item() for p in module.net.parameters())
    assert everything - penalty > 0.1  # biases and BatchNorm's weights add a visible amount
    x, y = _batch()
    module.eval()  # no dropout: the step's forward gives these logits again
    with torch.no_grad():
        logits = module(x)
    ce = F.cross_entropy(logits, y).item()
    loss, _ = module.train_loss_and_logits(x, y)
    assert loss.item() == pytest.approx(ce + penalty, rel=1e-5)
    loss_sum, correct = _one_step(
        module, x, y
    )  # lr 0: the weights stay, the reported loss is this one
    assert loss_sum / len(y) == pytest.approx(
        ce + penalty, rel=1e-5
    )  # the sum of loss x images, per image
    assert correct == (logits.argmax(1) == y).sum().item()


def test_tta_flip_averages_probabilities_not_logits(tmp_path):
    # The mean of the two softmaxes (Keras-style TTA on predicted probabilities), not softmax of mean logits.
    module = _classifier(tmp_path, tta_flip=True)
    with torch.no_grad():  # larger logits, so that the two kinds of average differ clearly
        module.net.classifier[-1].weight.mul_(20)
    x, y = _batch()
    module.eval()
    with torch.no_grad():
        module.validation_step((x, y), 0)
        module.test_step((x, y), 0)
        a, b = module(x), module(x.flip(-1))
    expected = (a.softmax(-1) + b.softmax(-1)) / 2
    logits = module.test_outputs[0][0]
    assert torch.allclose(logits.softmax(-1), expected, atol=1e-6)
    assert module.val_loss.compute().item() == pytest.approx(
        F.nll_loss(expected.log(), y).item(), rel=1e-5
    )
    assert (
        ((a + b) / 2).softmax(-1) - expected
    ).abs().max() > 1e-3  # the logit average is distinguishable


def test_lightnings_hook_name_skips_nn_module_setattr_and_the_rest_does_not(tmp_path, monkeypatch):
    # Lightning sets _current_fx_name ~44 times a step; Classifier sets it plainly (no Parameter/Module/
    # Buffer checks). Every other attribute still goes through nn.Module, so submodules register.
    module, extra = _classifier(tmp_path), nn.Linear(2, 2)
    seen, module_setattr = [], nn.Module.__setattr__
    monkeypatch.setattr(
        nn.Module, "__setattr__", lambda self, k, v: seen.append(k) or module_setattr(self, k, v)
    )
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step" and seen == []
    module.extra = extra
    assert (
        seen == ["extra"] and "extra" in module._modules and "extra.weight" in module.state_dict()
    )


# ---------------------------------------------------------------- Augment's ranges
def test_augment_ranges_reach_keras_bounds(monkeypatch):
    # RandomTranslation(0.1) shifts by up to 10% of the size (0.2 in grid units, where 2 = full width),
    # RandomRotation is given in degrees, RandomZoom(0.1) scales within [0.9, 1.1]. Read them off the
    # affine matrices over many images: within the bounds, and approaching them.
    import cifar_lightning.model.augment as augment

    thetas, affine_grid = [], F.affine_grid
    monkeypatch.setattr(
        augment.F,
        "affine_grid",
        lambda theta, *a, **k: thetas.append(theta) or affine_grid(theta, *a, **k),
    )
    torch.manual_seed(0)
    augment.Augment(flip=False, rotation_deg=10, zoom=0.1, translate=0.1)(
        torch.zeros(4000, 1, 4, 4)
    )
    (theta,) = thetas
    a, c = theta[:, 0, 0], theta[:, 1, 0]
    scale, angle = torch.hypot(a, c), torch.atan2(c, a)
    shift = theta[:, :, 2].abs()
    assert shift.max() <= 0.2 + 1e-6 and shift.max() > 0.8 * 0.2
    rad = math.radians(10)
    assert angle.abs().max() <= rad + 1e-6 and angle.abs().max() > 0.8 * rad
    assert scale.min() >= 0.9 - 1e-6 and scale.max() <= 1.1 + 1e-6
    assert scale.min() < 0.92 and scale.max() > 1.08


def test_augment_samples_the_same_pixels_under_bf16_autocast():
    # trainer.precision=bf16-mixed runs training_step under autocast; the warp's grid must stay fp32
    # (a bf16 grid moves sampling positions by up to ~1/256 of the image, a visible shift of edges).
    import cifar_lightning.model.augment as augment

    x = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )
    warp = augment.Augment(flip=True, rotation_deg=10, zoom=0.1, translate=0.1)
    torch.manual_seed(0)
    fp32 = warp(x)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = warp(x)
    assert mixed.dtype == torch.float32
    assert (mixed - fp32).abs().max() < 1e-2  # 0-255 scale


# ---------------------------------------------------------------- checkpoints
def _ckpt(module, path):
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_checkpoint_of_a_compiled_model_loads_with_the_same_outputs(tmp_path):
    # torch.compile wraps the network: its keys read net._orig_mod.*; load_net must still fit the plain net.
    module = _classifier(tmp_path, compile=True)
    assert any(
        "._orig_mod." in k for k in module.state_dict()
    )  # constructing it is enough; nothing compiles
    net, names, _ = load_net(_ckpt(module, tmp_path / "compiled.ckpt"))
    x, _ = _batch()
    with (
        torch.no_grad()
    ):  # same weights; only the memory layout (channels_last in training) differs
        assert torch.allclose(net(x), module.net._orig_mod.eval()(x), rtol=1e-5, atol=1e-6)
    assert names == CLASSES


# ---------------------------------------------------------------- callbacks
def test_history_adds_no_second_row_for_an_epoch_it_has(tmp_path):
    # A resumed run replays the end of its last epoch; its row is already in the restored history.
    history = History(tmp_path / "history.csv")
    history.load_state_dict({"rows": [{"epoch": e, "val_loss": 1.0 / e} for e in (1, 2)]})
    metrics = {
        "train/loss": torch.tensor(0.9),
        "train/acc": torch.tensor(0.5),
        "val/loss": torch.tensor(0.3),
        "val/acc": torch.tensor(0.6),
    }
    trainer = SimpleNamespace(
        callback_metrics=metrics, current_epoch=1, is_global_zero=True
    )  # epoch 2, 0-based
    history.on_train_epoch_end(trainer, None)
    assert [r["epoch"] for r in history.rows] == [1, 2] and history.rows[1]["val_loss"] == 0.5
    trainer.current_epoch = 2
    history.on_train_epoch_end(trainer, None)
    assert [r["epoch"] for r in history.rows] == [1, 2, 3]
    assert history.rows[2]["val_loss"] == pytest.approx(0.3)


def test_interrupt_checkpoint_ignores_a_user_error_even_after_training(tmp_path):
    # A config or data mistake has its own error line; no interrupted.ckpt for it, however far training got.
    saved = []
    trainer = SimpleNamespace(save_checkpoint=lambda path, **k: saved.append(path))
    callback = InterruptCheckpoint(tmp_path / "interrupted.ckpt")
    callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_exception(trainer, None, UserError("data.root: bad"))
    assert saved == []
    callback.on_exception(
        trainer, None, RuntimeError("crash")
    )  # the check can fail: other errors save
    assert saved == [tmp_path / "interrupted.ckpt"]


# ---------------------------------------------------------------- train's artefacts
def test_train_metrics_and_predictions_follow_the_history_and_the_test_files(tiny_layout, tmp_path):
    # batch 8: the 30 test images come in 4 batches, so a shuffled or reversed batch order would misalign
    # predictions.csv's paths and labels. best_val_* come from the best epoch's history row.
    from cifar_lightning.train import train

    m = train(
        cfg_for(tmp_path, tiny_layout, "trainer.max_epochs=2", "data.batch_size=8", "seed=1", *FAST)
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    with open(tmp_path / "history.csv") as f:
        hist = list(csv.DictReader(f))
    best = min(hist, key=lambda r: float(r["val_loss"]))
    assert saved["best_val_loss"] == pytest.approx(float(best["val_loss"]))
    assert saved["best_val_acc"] == pytest.approx(float(best["val_acc"]))
    assert (
        saved["best_epoch"] == int(best["epoch"]) and m["best_val_loss"] == saved["best_val_loss"]
    )
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    test_dir = tiny_layout / "test"
    files = [
        p
        for c in sorted(d.name for d in test_dir.iterdir())
        for p in sorted((test_dir / c).iterdir())
    ]
    assert [Path(r["path"]) for r in rows] == files
    assert [int(r["label"]) for r in rows] == [
        CLASSES.index(Path(r["path"]).parent.name) for r in rows
    ]


# ---------------------------------------------------------------- evaluate / predict helpers
def test_match_classes_maps_folder_order_to_checkpoint_order():
    # labels[i] = index[folder target]: folder class "a" is the checkpoint's class 1.
    assert match_classes(["a", "b"], ["000_b", "001_a"])[0] == [1, 0]
    assert match_classes(["my_cat", "dog"], ["000_dog", "001_my_cat"])[0] == [1, 0]
    assert match_classes(["my_cat"], ["my_cat"])[0] == [0]


@pytest.mark.parametrize(
    "folder, ckpt", [(["cat"], ["my_cat"]), (["1_cat"], ["cat"]), (["0001_cat"], ["cat"])]
)
def test_only_a_three_digit_index_is_stripped(folder, ckpt):
    # "NNN_" is the notebook's folder numbering; any other prefix is part of the class name.
    with pytest.raises(UserError, match="classes differ"):
        match_classes(folder, ckpt)


def test_predict_prediction_is_the_top1_class(tmp_path):
    from cifar_lightning.predict import predict

    module = _classifier(tmp_path)
    with torch.no_grad():  # spread the probabilities, so that top1 and top3 are different classes
        module.net.classifier[-1].weight.mul_(20)
    ckpt = _ckpt(module, tmp_path / "m.ckpt")
    write_images(tmp_path / "pics", 4, 3)
    cfg = compose(
        [
            f"ckpt_path={ckpt}",
            f"inputs={tmp_path / 'pics'}",
            f"run_dir={tmp_path / 'out'}",
            "device=cpu",
            "top_k=3",
        ],
        config_name="predict",
    )
    rows = predict(cfg)
    assert len(rows) == 4
    for r in rows:
        p = [float(r[f"p{j}"]) for j in (1, 2, 3)]
        assert r["prediction"] == r["top1"] and p == sorted(p, reverse=True) and p[0] > p[2]
    with open(tmp_path / "out" / "predictions.csv") as f:
        assert [r["prediction"] for r in csv.DictReader(f)] == [r["top1"] for r in rows]


def test_pick_device_auto_follows_cuda_availability(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_monitor_val_acc_reports_the_epoch_of_the_checkpoint_it_tested(tiny_layout, tmp_path):
    # best_epoch, best_val_* and the value returned to sweepers follow `monitor`, as best.ckpt does
    from cifar_lightning.train import train

    m = train(
        cfg_for(
            tmp_path,
            tiny_layout,
            "trainer.max_epochs=3",
            "data.batch_size=8",
            "seed=1",
            "monitor=val/acc",
            "monitor_mode=max",
            *FAST,
        )
    )
    with open(tmp_path / "history.csv") as f:
        hist = list(csv.DictReader(f))
    best = max(
        hist, key=lambda r: (float(r["val_acc"]), -int(r["epoch"]))
    )  # the first of the highest
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert m["best_epoch"] == int(best["epoch"]) == ckpt["epoch"] + 1
    assert m["best_val_acc"] == pytest.approx(float(best["val_acc"]))


def test_evaluate_scores_a_checkpoint_as_its_own_test_phase_did(tiny_layout, tmp_path):
    # a tta_flip checkpoint is evaluated with the flip average, and with the resize rule it was trained with
    from cifar_lightning.evaluate import evaluate
    from cifar_lightning.model.checkpoint import load_checkpoint
    from cifar_lightning.train import train

    train_run = tmp_path / "train"
    trained = train(
        cfg_for(
            train_run,
            tiny_layout,
            "trainer.max_epochs=2",
            "data.batch_size=8",
            "seed=1",
            "model.tta_flip=true",
            "fidelity=torch",
            *FAST,
        )
    )
    best = train_run / "checkpoints" / "best.ckpt"
    assert load_checkpoint(best)["hyper_parameters"]["resize"] == "pil_bilinear"
    cfg = compose(
        [
            f"ckpt_path={best}",
            f"eval_dir={tiny_layout / 'test'}",
            f"run_dir={tmp_path / 'eval'}",
            "device=cpu",
        ],
        config_name="evaluate",
    )
    evaluated = evaluate(cfg)
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], abs=1e-5)
    assert evaluated["auroc_macro"] == pytest.approx(trained["auroc_macro"], abs=1e-6)
    net, _, _ = load_net(best)
    x, _ = _batch()
    with torch.no_grad():  # the check can fail: without the flip average the logits differ
        assert not torch.allclose(net(x), net.net(x), atol=1e-4)
