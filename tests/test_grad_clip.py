"""model.grad_clip under manual optimization: the gradients the optimizer steps with are clipped
(by norm or by value) in eager steps and in captured steps alike; training_step returns each
step's loss, detached; 16-mixed, whose gradients are still loss-scaled there, is refused."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

import cifar_lightning.build as build
from cifar_lightning.errors import UserError
from cifar_lightning.model.module import Classifier
from cifar_lightning.report import read_csv
from cifar_lightning.train import train
from tests.conftest import cfg_for, make_classifier
from tests.test_cuda_graph import CpuGraphSteps, use_stand_in_graph

RUN = ["trainer.max_epochs=1", "data.batch_size=8", "logger=none", "seed=2"]


class AtStep(L.Callback):
    """At every optimizer step (a pre-step hook, so replayed steps count too): the gradients'
    total L2 norm and largest magnitude. After every batch: what training_step returned."""

    def __init__(self):
        self.norms, self.peaks, self.outputs, self.sizes = [], [], [], []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_pre_hook(self.measure)

    def measure(self, optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.peaks.append(max(g.abs().max().item() for g in grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)
        self.sizes.append(len(batch[1]))


def _run(monkeypatch, tiny_layout, run_dir, *overrides):
    seen = AtStep()
    real = build.build_trainer
    monkeypatch.setattr(
        "cifar_lightning.train.build_trainer",
        lambda cfg, *cbs, **kw: real(cfg, *cbs, seen, **kw),
    )
    train(cfg_for(run_dir, tiny_layout, *RUN, *overrides))
    return seen


NORM, VALUE = 0.05, 1e-3


def test_the_optimizer_steps_with_clipped_gradients(tiny_layout, tmp_path, monkeypatch):
    free = _run(monkeypatch, tiny_layout, tmp_path / "free")
    by_norm = _run(monkeypatch, tiny_layout, tmp_path / "norm", f"model.grad_clip={NORM}")
    by_value = _run(
        monkeypatch,
        tiny_layout,
        tmp_path / "value",
        f"model.grad_clip={VALUE}",
        "model.grad_clip_algorithm=value",
    )
    assert len(free.norms) == len(by_norm.norms) == len(by_value.norms) == 12
    # the bounds bite: unclipped gradients exceed both at some step
    assert max(free.norms) > 2 * NORM and max(free.peaks) > 2 * VALUE
    # torch scales by max_norm / (norm + 1e-6): a hair under the bound
    assert all(n <= NORM * (1 + 1e-4) for n in by_norm.norms), by_norm.norms
    assert max(by_norm.norms) > 0.9 * NORM  # clipped to the bound, not zeroed
    # (the bound as a float32: 1e-3 rounds up by 5e-11)
    assert all(p <= VALUE * (1 + 1e-6) for p in by_value.peaks), by_value.peaks
    assert max(by_value.peaks) == pytest.approx(VALUE)


def test_captured_steps_clip_as_eager_steps_do(tiny_layout, tmp_path, monkeypatch):
    # On the CPU a stand-in graph replays the captured step (tests/test_cuda_graph.py); the
    # gradient clip is part of that step, so both runs train to the same weights, bit for bit.
    clip = [f"model.grad_clip={NORM}"]
    eager = _run(monkeypatch, tiny_layout, tmp_path / "eager", *clip)
    # the plain Classifier: its eager steps (warm-up, partial batches) return their loss too
    use_stand_in_graph(monkeypatch, Classifier)
    graphed = _run(monkeypatch, tiny_layout, tmp_path / "graphed", *clip, "model.cuda_graph=true")
    (steps,) = CpuGraphSteps.made
    assert steps.replays > 0
    assert all(n <= NORM * (1 + 1e-4) for n in graphed.norms) and graphed.norms == eager.norms
    e, g = (
        torch.load(tmp_path / run / "checkpoints/last.ckpt", weights_only=True)
        for run in ("eager", "graphed")
    )
    for k, v in e["state_dict"].items():
        assert torch.equal(v, g["state_dict"][k]), k
    # replayed steps return their loss too
    assert all(torch.is_tensor(o["loss"]) for o in graphed.outputs)
    assert [o["loss"].item() for o in graphed.outputs] == [o["loss"].item() for o in eager.outputs]


def test_training_step_returns_each_steps_detached_loss(tiny_layout, tmp_path, monkeypatch):
    seen = _run(monkeypatch, tiny_layout, tmp_path)
    losses = [o["loss"] for o in seen.outputs]
    assert len(losses) == 12
    assert all(torch.is_tensor(x) and x.ndim == 0 and not x.requires_grad for x in losses)
    # the epoch's train_loss is the per-image mean of these very losses
    mean = sum(x.item() * n for x, n in zip(losses, seen.sizes)) / sum(seen.sizes)
    (row,) = read_csv(tmp_path / "history.csv")
    assert float(row["train_loss"]) == pytest.approx(mean, rel=1e-6)


def test_grad_clip_with_a_grad_scaler_is_refused_before_a_step(tmp_path):
    # 16-mixed on a GPU: the GradScaler unscales inside optimizer.step, after the clip. (On the
    # CPU Lightning runs 16-mixed as bf16, with no scaler, so the Trainer is a stand-in here.)
    module = make_classifier(tmp_path, grad_clip=1.0)
    module._trainer = SimpleNamespace(
        precision="16-mixed", precision_plugin=SimpleNamespace(scaler=object())
    )
    with pytest.raises(UserError, match=r"^model.grad_clip=1.0 with trainer.precision=16-mixed: "):
        module.on_train_start()
    module._trainer.precision_plugin.scaler = None  # bf16-mixed, 32-true: clipped as configured
    module.on_train_start()


class KeepGraphed(L.Callback):
    """The fit's GraphedStep (None when its steps ran eagerly)."""

    made: list = []

    def on_train_end(self, trainer, pl_module):
        KeepGraphed.made.append(pl_module.graphed)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (run on a GPU: pytest tests/test_grad_clip.py)",
)
def test_a_real_cuda_graph_clips_like_eager_steps_on_the_gpu(tiny_layout, tmp_path, monkeypatch):
    # clip_grad_norm_ in the captured step: foreach norms, the clip factor applied as a tensor
    real = build.build_trainer
    monkeypatch.setattr(
        "cifar_lightning.train.build_trainer",
        lambda cfg, *cbs, **kw: real(cfg, *cbs, KeepGraphed(), **kw),
    )
    KeepGraphed.made = []
    # SGD: its update scales with the gradient (RMSprop's nearly undoes a clip's scaling)
    common = ["trainer=gpu", "trainer.max_epochs=2", "model.dropout=0", "optim=sgd", *RUN[1:]]
    torch.backends.cudnn.deterministic = True
    try:
        for name, extra in (
            ("eager", [f"model.grad_clip={NORM}"]),
            ("graphed", [f"model.grad_clip={NORM}", "model.cuda_graph=true"]),
            ("unclipped", ["model.cuda_graph=true"]),
        ):
            train(cfg_for(tmp_path / name, tiny_layout, *common, *extra))
    finally:
        torch.backends.cudnn.deterministic = False
    eager, graphed, unclipped = KeepGraphed.made
    assert eager is None and graphed.replays > 0 and unclipped.replays > 0
    hist = {n: read_csv(tmp_path / n / "history.csv") for n in ("eager", "graphed", "unclipped")}
    for e, g in zip(hist["eager"], hist["graphed"], strict=True):
        assert float(g["train_loss"]) == pytest.approx(float(e["train_loss"]), rel=1e-3)
        assert float(g["val_loss"]) == pytest.approx(float(e["val_loss"]), rel=1e-3)
    # the clip acted inside the graph: without it the same graph trains elsewhere
    last = hist["unclipped"][-1]["train_loss"], hist["graphed"][-1]["train_loss"]
    assert float(last[0]) != pytest.approx(float(last[1]), rel=1e-2)
