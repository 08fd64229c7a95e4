"""Distillation (distill.*, model/module.py Classifier.distilled): the loss, the teacher's view of
the batch, loading the teacher safely, and keeping it out of everything the student saves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_lightning.errors import UserError
from cifar_lightning.model.checkpoint import load_teacher
from tests.conftest import CLASSES, RunsCode, image_batch, make_classifier, save_ckpt
from tests.test_module import _training_step


@pytest.fixture
def teacher_ckpt(tmp_path):
    """A (randomly initialised) experiment=teacher checkpoint, as load_net reads it."""
    teacher = make_classifier(tmp_path, "experiment=teacher")
    return save_ckpt(teacher, tmp_path / "teacher.ckpt")


class _Recorder(nn.Module):
    """A teacher that records what it is shown and answers fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen = logits, []

    def forward(self, x):
        self.seen.append(x)
        return self.logits


def test_the_loss_is_the_weighted_sum_of_label_and_tempered_kl_terms(tmp_path):
    module = make_classifier(
        tmp_path, "distill.teacher=unused", "distill.temperature=3", "distill.weight=0.25"
    )
    x, y = image_batch()
    teacher_logits = torch.randn(len(y), 10, generator=torch.Generator().manual_seed(2))
    module.teacher = (_Recorder(teacher_logits),)
    module.train()
    torch.manual_seed(0)
    loss, logits = _training_step(module, x, y)
    kl = (
        (
            F.softmax(teacher_logits / 3, -1)
            * (F.log_softmax(teacher_logits / 3, -1) - F.log_softmax(logits / 3, -1))
        )
        .sum(-1)
        .mean()
    )
    expected = 0.75 * F.cross_entropy(logits, y) + 0.25 * 9 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # without a teacher the same step is the label loss alone
    module.teacher = ()
    torch.manual_seed(0)
    plain, logits = _training_step(module, x, y)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_the_teacher_scores_the_students_augmented_view(tmp_path):
    module = make_classifier(
        tmp_path,
        "distill.teacher=unused",
        "augment.flip=true",
        "augment.crop_pad=2",
        "augment.cutout=8",
    )
    x, y = image_batch()
    recorder = _Recorder(torch.zeros(len(y), 10))
    module.teacher = (recorder,)
    student_inputs = []
    hook = module.net.register_forward_pre_hook(lambda net, args: student_inputs.append(args[0]))
    module.train()
    _training_step(module, x, y)
    hook.remove()
    (seen,) = recorder.seen
    # the premise: augmentation changed the batch; the teacher got the changed batch, not x
    assert not torch.equal(seen.float(), x.float())
    assert torch.equal(seen, student_inputs[0])


def test_a_teacher_loads_frozen_in_eval_mode_with_plain_logits(teacher_ckpt):
    net = load_teacher(teacher_ckpt, CLASSES)
    assert type(net).__name__ == "TeacherNet"  # its tta views unwrapped: it scores one view
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_a_teacher_for_other_classes_is_refused(teacher_ckpt):
    with pytest.raises(UserError, match=r"distill.teacher=.*teacher.ckpt: its classes"):
        load_teacher(teacher_ckpt, [*CLASSES[:-1], "010_other"])


def test_a_missing_teacher_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^distill.teacher=.*nope.ckpt: no such file$"):
        load_teacher(tmp_path / "nope.ckpt", CLASSES)


def test_a_teacher_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    torch.save({"state_dict": RunsCode()}, tmp_path / "hostile.ckpt")
    with pytest.raises(UserError, match="refused"):
        load_teacher(tmp_path / "hostile.ckpt", CLASSES)
    assert not marker.exists()


@pytest.mark.slow
def test_the_student_trains_and_saves_without_the_teacher(teacher_ckpt, tiny_layout, tmp_path):
    from cifar_lightning.train import train
    from tests.conftest import cfg_for, run_cli

    run = tmp_path / "student"
    m = train(
        cfg_for(
            run,
            tiny_layout,
            "experiment=fast",
            f"distill.teacher={teacher_ckpt}",
            "callbacks=ema",
            "trainer.max_epochs=1",
            "logger=none",
            "data.batch_size=16",
            "test=false",
        )
    )
    assert m["trainable_params"] == 815_018
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    teacher_shapes = {
        tuple(v.shape) for v in torch.load(teacher_ckpt, weights_only=True)["state_dict"].values()
    }
    saved = [k for k in ckpt["state_dict"]]
    assert saved and all(k.startswith(("net.", "train_", "val_", "test_")) for k in saved)
    assert not any("teacher" in k for k in saved)
    # the teacher's 256-filter convolutions exist nowhere in the student's file, EMA state included
    tensors = [v for v in ckpt["state_dict"].values()]
    for state in ckpt.get("callbacks", {}).values():
        if isinstance(state, dict):
            tensors += [v for v in state.values() if torch.is_tensor(v)]
            for inner in state.values():
                if isinstance(inner, dict):
                    tensors += [v for v in inner.values() if torch.is_tensor(v)]
    assert (256, 256, 3, 3) in teacher_shapes
    assert not any(tuple(t.shape) == (256, 256, 3, 3) for t in tensors)
    # evaluate needs no teacher
    teacher_ckpt.unlink()
    res = run_cli(
        "cifar_lightning.evaluate",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"eval_dir={tiny_layout / 'valid'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "accuracy" in res.stdout
