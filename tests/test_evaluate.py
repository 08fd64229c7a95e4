"""evaluate.py: matching an evaluation folder's classes to the checkpoint's, and scoring a
checkpoint exactly as its own training run's test phase did."""

import pytest
import torch

from cifar_lightning.errors import UserError
from cifar_lightning.evaluate import match_classes
from cifar_lightning.model.checkpoint import load_net
from cifar_lightning.schema import compose
from tests.conftest import cfg_for, image_batch

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


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


def test_evaluate_scores_a_checkpoint_as_its_own_test_phase_did(tiny_layout, tmp_path):
    # a tta.flip + tta.shift checkpoint is evaluated on the same 6 views and with the resize rule
    # it trained with
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
            "tta.flip=true",
            "tta.shift=1",
            "fidelity=torch",
            *FAST,
        )
    )
    best = train_run / "checkpoints" / "best.ckpt"
    assert load_checkpoint(best)["datamodule_hyper_parameters"]["resize"] == "pil_bilinear"
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
    x, _ = image_batch()
    with torch.no_grad():  # the check can fail: without the views' average the logits differ
        assert not torch.allclose(net(x), net.net(x), atol=1e-4)
    assert (net.flip, net.pixels) == (True, 1)


def test_evaluate_runs_at_the_precision_the_checkpoint_trained_at(tiny_layout, tmp_path, caplog):
    # A bf16-mixed run tests under bf16 autocast: evaluate scores its checkpoint the same way.
    import torch.nn.functional as F

    from cifar_lightning.data.folder import KerasImageFolder
    from cifar_lightning.evaluate import evaluate
    from tests.conftest import make_classifier, save_ckpt

    module = make_classifier(tmp_path, precision="bf16-mixed")
    with torch.no_grad():  # larger logits, so that rounding them to bf16 moves the loss clearly
        module.net.classifier[-1].weight.mul_(20)
    ckpt = save_ckpt(module, tmp_path / "bf16.ckpt")
    folder = KerasImageFolder(tiny_layout / "test")
    images = torch.stack([folder.loader(p) for p, _ in folder.samples])
    labels = torch.tensor(folder.targets)
    module.eval()
    with torch.no_grad():
        fp32 = F.cross_entropy(module(images), labels).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = F.cross_entropy(module(images).float(), labels).item()
    caplog.set_level("INFO", logger="cifar_lightning.evaluate")
    cfg = compose(
        [
            f"ckpt_path={ckpt}",
            f"eval_dir={tiny_layout / 'test'}",
            f"run_dir={tmp_path / 'eval'}",
            "device=cpu",
        ],
        config_name="evaluate",
    )
    evaluated = evaluate(cfg)
    assert "precision bf16-mixed (bf16 autocast on cpu)" in caplog.text
    assert evaluated["test_loss"] == pytest.approx(bf16, abs=1e-6)
    assert abs(fp32 - bf16) > 1e-4  # the check can fail: fp32 scores otherwise
