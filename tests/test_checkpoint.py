"""Loading a trained network back (model/checkpoint.py): load_net on a compiled model's
checkpoint, an inference copy, and checkpoints written by the previous release (its hyperparameter
layout). Refused and foreign checkpoints are tested through the commands (test_cli.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_lightning.model import net as model_net
from cifar_lightning.model.checkpoint import hparams_of, load_checkpoint, load_net
from cifar_lightning.schema import ModelConfig, compose
from tests.conftest import CLASSES, image_batch, make_classifier, save_ckpt, write_images

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_of_a_compiled_model_loads_with_the_same_outputs(tmp_path):
    # torch.compile wraps the network, so its keys read net._orig_mod.*: load_net must still fit
    # the plain net.
    module = make_classifier(tmp_path, "speed.compile=true")
    # constructing it is enough; nothing compiles
    assert any("._orig_mod." in k for k in module.state_dict())
    net, names, _ = load_net(save_ckpt(module, tmp_path / "compiled.ckpt"))
    x, _ = image_batch()
    # same weights; only the memory layout (channels_last in training) differs
    with torch.no_grad():
        assert torch.allclose(net(x), module.net._orig_mod.eval()(x), rtol=1e-5, atol=1e-6)
    assert names == CLASSES


def test_an_inference_copy_scores_as_the_original_and_is_about_half_its_size(tmp_path):
    from cifar_lightning.model.checkpoint import load_checkpoint

    module = make_classifier(tmp_path, "tta.flip=true", "tta.shift=1")
    full = save_ckpt(module, tmp_path / "full.ckpt")
    ckpt = torch.load(full, weights_only=True)
    # what a fitted SGD checkpoint also holds: momentum buffers as large as the weights
    ckpt["optimizer_states"] = [
        {
            "state": {
                i: {"momentum_buffer": p.detach().clone()}
                for i, p in enumerate(module.parameters())
            }
        }
    ]
    ckpt["callbacks"] = {"History": {"rows": []}}
    # how the run decoded its images, which evaluate and predict decode theirs by
    ckpt["datamodule_hyper_parameters"] = {"image_size": 32, "resize": "pil_bilinear"}
    torch.save(ckpt, full)
    slim = tmp_path / "slim.ckpt"
    r = subprocess.run(
        [sys.executable, "scripts/slim_checkpoint.py", str(full), str(slim)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    kept = load_checkpoint(slim)
    assert set(kept) == {"hyper_parameters", "datamodule_hyper_parameters", "state_dict"}
    assert kept["datamodule_hyper_parameters"] == {"image_size": 32, "resize": "pil_bilinear"}
    assert load_net(slim)[2]["resize"] == "pil_bilinear"
    assert slim.stat().st_size < 0.6 * full.stat().st_size
    x, _ = image_batch()
    (a, *_), (b, *_) = load_net(full), load_net(slim)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    bad = subprocess.run(
        [sys.executable, "scripts/slim_checkpoint.py", str(tmp_path / "none.ckpt"), str(slim)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: ckpt_path={tmp_path / 'none.ckpt'}: no such file"
    ]


# keys the previous release kept inside `model`, off their defaults (not speed.compile: the
# module then compiles when it first runs, which is slow and no part of the layout)
RECIPE = [
    "loss.label_smoothing=0.2",
    "loss.l2=0.0001",
    "augment.flip=true",
    "augment.crop_pad=2",
    "tta.flip=true",
    "tta.shift=1",
    "whiten.enabled=true",
    "whiten.images=100",
    "speed.compile_mode=max-autotune",
]
# what hparams_of maps; the other hyperparameters kept their place
MOVED = ("model", "loss", "augment", "tta", "whiten", "speed", "precision")


def previous_release_checkpoint(module, precision_kept_in: str) -> dict:
    """`module` saved as the previous release saved its run: the loss, augmentation, test-time,
    whitening and speed keys inside `model` (augment as a recipe file set it, only the keys it
    turned on), keys this release dropped, the scheduler with its Lightning interval, and the
    precision in the hyperparameters or, in releases before that, only in the RunSettings
    callback's state."""
    hp = module.hparams
    model = {
        **hp["model"],
        "label_smoothing": hp["loss"]["label_smoothing"],
        "l2": hp["loss"]["l2"],
        "augment": {k: v for k, v in hp["augment"].items() if v},
        "tta_flip": hp["tta"]["flip"],
        "tta_shift": hp["tta"]["shift"],
        "whiten": hp["whiten"]["enabled"],
        "whiten_images": hp["whiten"]["images"],
        "channels_last": hp["speed"]["channels_last"],
        "compile": hp["speed"]["compile"],
        "compile_mode": hp["speed"]["compile_mode"],
        "cuda_graph": False,
        "grad_clip": 1.0,
        "grad_clip_algorithm": "norm",
    }
    old = {
        "model": model,
        "optim": hp["optim"],
        "scheduler": {**hp["scheduler"], "interval": "epoch", "needs_total_steps": False},
        "class_names": hp["class_names"],
        "monitor": hp["monitor"],
        "image_size": hp["image_size"],
        "precision": hp["precision"] if precision_kept_in == "hyper_parameters" else None,
    }
    ckpt = {
        "hyper_parameters": old,
        "datamodule_hyper_parameters": {"image_size": 32, "resize": "tf_bilinear"},
        "state_dict": module.state_dict(),
    }
    if precision_kept_in == "callbacks":
        ckpt["callbacks"] = {"RunSettings": {"precision": hp["precision"]}}
    return ckpt


@pytest.mark.parametrize("precision_kept_in", ["hyper_parameters", "callbacks"])
def test_a_checkpoint_of_the_previous_release_evaluates_and_predicts(
    precision_kept_in, tiny_layout, tmp_path
):
    from cifar_lightning.evaluate import evaluate
    from cifar_lightning.inference import predict_logits
    from cifar_lightning.predict import predict

    module = make_classifier(tmp_path, *RECIPE, precision="bf16-mixed")
    with torch.no_grad():  # spread the probabilities, so that a difference would show
        module.net.classifier[-1].weight.mul_(20)
    old = tmp_path / "old.ckpt"
    torch.save(previous_release_checkpoint(module, precision_kept_in), old)
    new = save_ckpt(module, tmp_path / "new.ckpt")
    assert "loss" not in load_checkpoint(old)["hyper_parameters"]  # the premise: the old layout
    mapped = hparams_of(load_checkpoint(old))
    assert {k: mapped[k] for k in MOVED} == {k: module.hparams[k] for k in MOVED}

    net, names, hp = load_net(old)
    assert names == CLASSES and hp["precision"] == "bf16-mixed"
    assert isinstance(net, model_net.TestTimeAugment) and (net.flip, net.pixels) == (True, 1)
    x, y = image_batch(12)
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's bf16-mixed
        own = module.test_step((x, y), 0).float()
    cpu = torch.device("cpu")
    assert torch.equal(predict_logits(net, x, 5, cpu, hp["precision"]), own)

    # evaluate and predict score it as the same module saved by this release
    def scores(ckpt):
        common = [f"ckpt_path={ckpt}", f"run_dir={tmp_path / ckpt.stem}", "device=cpu"]
        evaluated = evaluate(
            compose([*common, f"eval_dir={tiny_layout / 'test'}"], config_name="evaluate")
        )
        rows = predict(
            compose(
                [*common, f"inputs={tmp_path / 'pics'}", f"run_dir={tmp_path / ckpt.stem}_p"],
                config_name="predict",
            )
        )
        metrics = ("test_loss", "test_accuracy", "f1_macro", "auroc_macro")
        return {k: evaluated[k] for k in metrics}, rows

    write_images(tmp_path / "pics", 4, 3)
    (old_metrics, old_rows), (new_metrics, new_rows) = scores(old), scores(new)
    assert old_metrics == new_metrics and old_rows == new_rows and len(old_rows) == 4


def test_the_committed_best_xeon_checkpoint_loads_as_its_run_tested(tmp_path):
    """docs/results/best_xeon/s0_best.ckpt, written by the previous release, is the checkpoint
    RESULTS.md's evaluate row comes from (the real test split, which tests don't have): it keeps
    its precision and its 6 test-time views, and the module its mapped hyperparameters build
    computes what load_net's network does."""
    from cifar_lightning.inference import predict_logits
    from cifar_lightning.model.module import Classifier

    path = ROOT / "docs" / "results" / "best_xeon" / "s0_best.ckpt"
    ckpt = load_checkpoint(path)
    assert "loss" not in ckpt["hyper_parameters"]  # the premise: the previous release's layout
    net, names, hp = load_net(path)
    assert names == CLASSES and hp["precision"] == "bf16-mixed"
    assert isinstance(net, model_net.TestTimeAugment) and (net.flip, net.pixels) == (True, 1)
    assert len(model_net.tta_views(torch.zeros(1, 3, 32, 32), net.flip, net.pixels)) == 6
    assert set(hp["model"]) == set(ModelConfig.__dataclass_fields__)
    assert hp["loss"] == {"label_smoothing": 0.2, "l2": 0.0}
    assert hp["augment"] == {
        "flip": True,
        "rotation_deg": 0,
        "zoom": 0,
        "translate": 0,
        "crop_pad": 4,
        "cutout": 0,
        "alternating_flip": False,
    }
    assert hp["whiten"] == {"enabled": True, "images": 5000}
    assert hp["speed"] == {"channels_last": True, "compile": False, "compile_mode": "default"}
    assert (hp["image_size"], hp["resize"]) == (32, "tf_bilinear")

    # hparams_of gives Classifier's arguments: the module they build tests as load_net predicts
    module = Classifier(**hparams_of(ckpt))
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    x, y = image_batch(12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        own = module.test_step((x, y), 0).float()
    assert torch.equal(predict_logits(net, x, 5, torch.device("cpu"), hp["precision"]), own)
