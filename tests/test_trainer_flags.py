"""Lightning's own Trainer flags under the Classifier's automatic optimization:
trainer.accumulate_grad_batches (one optimizer step per N batches, with their gradients summed)
and trainer.gradient_clip_val / gradient_clip_algorithm (the optimizer steps with clipped
gradients); and the loss training_step returns, which Lightning hands to callbacks."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import cifar_lightning.build as build
from cifar_lightning.report.files import read_csv
from cifar_lightning.train import train
from tests.conftest import cfg_for

# A narrow Model S: the flags do not depend on the width, and each step costs a fraction.
RUN = [
    "trainer.max_epochs=1",
    "data.batch_size=8",
    "model.widths=[8,16,16]",
    "model.hidden=32",
    "logger=none",
    "seed=2",
    "test=false",
]
# 4 train dirs of 20 images at batch 8: 8, 8 and 4 images from each, 12 batches an epoch
BATCHES = 12


class AtStep(L.Callback):
    """At every optimizer step: the gradients it stepped with, as their total L2 norm and largest
    magnitude. (A post-step hook: Lightning runs forward, backward and clipping in a closure
    inside optimizer.step, after the pre-step hooks.) At every batch: the batch, what Lightning got
    from training_step, and the optimizer steps so far. At the start: a copy of the network."""

    def __init__(self):
        self.norms, self.peaks, self.first_grads = [], [], None
        self.batches, self.outputs, self.steps_at_batch_end = [], [], []
        self.initial_net = None

    def on_train_start(self, trainer, pl_module):
        self.initial_net = copy.deepcopy(pl_module.net)
        trainer.optimizers[0].register_step_post_hook(self.measure)

    def measure(self, optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.first_grads is None:
            self.first_grads = [g.clone() for g in grads]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.peaks.append(max(g.abs().max().item() for g in grads))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(tuple(t.clone() for t in batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)
        self.steps_at_batch_end.append(len(self.norms))


def _run(monkeypatch, tiny_layout, run_dir, *overrides) -> AtStep:
    seen = AtStep()
    real = build.build_trainer
    monkeypatch.setattr(
        "cifar_lightning.train.build_trainer",
        lambda cfg, *cbs, **kw: real(cfg, *cbs, seen, **kw),
    )
    train(cfg_for(run_dir, tiny_layout, *RUN, *overrides))
    return seen


def _gradients(net, batches) -> list[torch.Tensor]:
    """The gradients of the mean of the batches' cross-entropies, as the Classifier computes its
    loss (default recipe: no smoothing, no l2, no augmentation; its forward's memory layout)."""
    net = copy.deepcopy(net).train()
    for x, y in batches:
        logits = net(x.contiguous(memory_format=torch.channels_last))
        (F.cross_entropy(logits, y) / len(batches)).backward()
    return [p.grad for p in net.parameters()]


def test_accumulate_grad_batches_steps_once_per_4_batches_with_their_summed_gradients(
    tiny_layout, tmp_path, monkeypatch
):
    # 10 of the 12 batches an epoch: steps after batches 4, 8 and 10 (the epoch's last, however
    # few it gathered), ceil(10 / 4) = 3 an epoch. Dropout off: the gradients can be recomputed.
    flags = ["trainer.max_epochs=2", "trainer.limit_train_batches=10", "model.dropout=0"]
    every = _run(monkeypatch, tiny_layout, tmp_path / "every", *flags)
    four = _run(
        monkeypatch, tiny_layout, tmp_path / "four", *flags, "trainer.accumulate_grad_batches=4"
    )
    assert every.steps_at_batch_end == list(range(1, 21))  # the flag is what changes the count
    assert four.steps_at_batch_end == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 6]
    ckpt = torch.load(tmp_path / "four" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * 3  # Lightning counts the optimizer's steps
    # The first step's gradients: each batch's loss divided by 4, summed over the 4 batches
    # (Lightning's accumulation), i.e. the gradient of their mean loss.
    summed = _gradients(four.initial_net, four.batches[:4])
    assert len(four.first_grads) == len(summed) == 28
    for got, want in zip(four.first_grads, summed):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6 * want.abs().max())
    # the check can fail: the first batch's own gradients are other ones
    first_only = _gradients(four.initial_net, four.batches[:1])
    assert not all(torch.allclose(g, w, rtol=1e-2) for g, w in zip(four.first_grads, first_only))
    # without the flag the first step has batch 1's gradients alone
    for got, want in zip(every.first_grads, _gradients(every.initial_net, every.batches[:1])):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6 * want.abs().max())


NORM, VALUE = 1.0, 0.05


def test_the_optimizer_steps_with_clipped_gradients(tiny_layout, tmp_path, monkeypatch):
    free = _run(monkeypatch, tiny_layout, tmp_path / "free")
    by_norm = _run(monkeypatch, tiny_layout, tmp_path / "norm", f"trainer.gradient_clip_val={NORM}")
    by_value = _run(
        monkeypatch,
        tiny_layout,
        tmp_path / "value",
        f"trainer.gradient_clip_val={VALUE}",
        "trainer.gradient_clip_algorithm=value",
    )
    assert len(free.norms) == len(by_norm.norms) == len(by_value.norms) == BATCHES
    # the bounds bite: unclipped gradients exceed both at some step
    assert max(free.norms) > 2 * NORM and max(free.peaks) > 2 * VALUE
    # torch scales by max_norm / (norm + 1e-6): a hair under the bound
    assert all(n <= NORM * (1 + 1e-4) for n in by_norm.norms), by_norm.norms
    assert max(by_norm.norms) > 0.9 * NORM  # clipped to the bound, not zeroed
    # (the bound as a float32: a decimal fraction rounds by up to 1 part in 2**24)
    assert all(p <= VALUE * (1 + 1e-6) for p in by_value.peaks), by_value.peaks
    assert max(by_value.peaks) == pytest.approx(VALUE)


def test_training_step_returns_the_loss_lightning_hands_to_callbacks(
    tiny_layout, tmp_path, monkeypatch
):
    seen = _run(monkeypatch, tiny_layout, tmp_path)
    losses = [o["loss"] for o in seen.outputs]
    assert len(losses) == BATCHES
    assert all(torch.is_tensor(x) and x.ndim == 0 and not x.requires_grad for x in losses)
    # the epoch's train_loss is the per-image mean of these very losses
    sizes = [len(y) for _, y in seen.batches]
    assert sorted(set(sizes)) == [4, 8]  # uneven batches: a mean of batch means would differ
    mean = sum(x.item() * n for x, n in zip(losses, sizes)) / sum(sizes)
    (row,) = read_csv(tmp_path / "history.csv")
    assert float(row["train_loss"]) == pytest.approx(mean, rel=1e-6)
