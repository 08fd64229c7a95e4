"""Resuming a run (resume.py, train's resume=): an interrupted run continues exactly as an
uninterrupted one, last.ckpt is the last epoch, what can't be continued is refused before anything
is written, and the resumed run also logs into the original run directory."""

import csv

import pytest
import torch

from cifar_lightning.errors import UserError
from cifar_lightning.train import train
from tests.conftest import CLASSES, RunsCode, cfg_for, make_layout

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


def _history(run_dir):
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in csv.DictReader(f)]


# the default recipe, and one with the recipe levers that draw random numbers or read the data
LEVERS = [
    "whiten.enabled=true",
    "augment.flip=true",
    "augment.crop_pad=2",
    "augment.cutout=4",
    "tta.shift=1",
]


# an average that moves fast enough to differ from the weights within the tiny run
EMA = ["callbacks=ema", "callbacks.ema.decay=0.9"]


@pytest.mark.slow
@pytest.mark.parametrize("levers", [[], LEVERS, EMA], ids=["default", "levers", "ema"])
def test_resume_parity(levers, tiny_layout, tmp_path):
    """Stopped after epoch 2 and resumed, a run ends exactly as an uninterrupted one: same history
    (losses, accuracies, learning-rate cuts) and same test metrics. A min_delta no val_loss change
    can meet makes every epoch after the first "bad", whatever the tiny data does: with patience 2
    the plateau cuts after epoch 3 only if its count of bad epochs (1 after epoch 2) is restored."""
    common = [
        "seed=3",
        "trainer.deterministic=true",
        "scheduler.patience=2",
        "scheduler.min_delta=100",
        *FAST,
        *levers,
    ]
    whole = train(cfg_for(tmp_path / "whole", tiny_layout, "trainer.max_epochs=5", *common))
    train(cfg_for(tmp_path / "parts", tiny_layout, "trainer.max_epochs=2", "test=false", *common))
    resumed = train(
        cfg_for(
            tmp_path / "ignored",
            tiny_layout,
            "trainer.max_epochs=5",
            *common,
            f"resume={tmp_path / 'parts' / 'checkpoints' / 'last.ckpt'}",
        )
    )
    a, b = _history(tmp_path / "whole"), _history(tmp_path / "parts")
    print("\nuninterrupted:", *a, "\nresumed after epoch 2:", *b, sep="\n")
    assert len(a) == 5 and a == b
    # cut after epoch 3, post-resume
    assert [float(r["lr"]) for r in b] == pytest.approx([1e-3] * 3 + [1e-4] * 2)
    for key in ("test_accuracy", "test_loss", "f1_macro", "best_epoch"):
        assert whole[key] == resumed[key], key


def test_resume_refuses_what_it_cannot_continue_before_writing_anything(tiny_layout, tmp_path):
    """resume= continues in the checkpoint's run directory and overwrites files there, so a
    checkpoint copied elsewhere, a foreign file, other classes or another network are refused
    up front."""
    run = tmp_path / "run"
    train(cfg_for(run, tiny_layout, "trainer.max_epochs=1", "test=false", *FAST))
    last = run / "checkpoints" / "last.ckpt"
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "x.ckpt").write_bytes(last.read_bytes())
    torch.save({"weight": torch.zeros(2)}, run / "checkpoints" / "plain.ckpt")
    three_classes = make_layout(tmp_path / "three", classes=CLASSES[:3])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = [
        (tmp_path / "backup" / "x.ckpt", tiny_layout, [], r"x.ckpt: not in a run directory"),
        (
            run / "checkpoints" / "plain.ckpt",
            tiny_layout,
            [],
            r"plain.ckpt: not a cifar_lightning training checkpoint",
        ),
        (last, three_classes, [], r"last.ckpt: its classes \[.*\] differ from the class folders"),
        (
            last,
            tiny_layout,
            ["model.hidden=128"],
            r"model.hidden=128, but the checkpoint was trained with 256",
        ),
        (
            last,
            tiny_layout,
            ["optim=adam"],
            r"optim._target_=torch.optim.Adam, but the checkpoint was trained with",
        ),
    ]
    for ckpt, data, extra, message in cases:
        with pytest.raises(UserError, match=message):
            train(cfg_for(tmp_path / "new", data, f"resume={ckpt}", *extra, *FAST))
    # no interrupted.ckpt, nothing beside backup/
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_last_checkpoint_is_the_last_epoch_even_when_it_did_not_improve(tiny_layout, tmp_path):
    """last.ckpt is what resume continues from. Lightning 2.6's save_last refreshes it only on
    epochs that improve the monitor. Here no epoch can: with a learning rate that rounds to 0 in
    float32 (optim.lr must be > 0), the weights never change, and with frozen BatchNorm statistics
    val/loss is the same every epoch (a tie is not an improvement): best.ckpt stays at epoch 1."""
    train(
        cfg_for(
            tmp_path,
            tiny_layout,
            "optim.lr=1e-50",
            "model.bn_momentum=0",
            "trainer.max_epochs=3",
            "test=false",
            *FAST,
        )
    )
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0  # the premise: no later epoch improved
    # 3 epochs of 4 steps (4 dirs x ceil(20/64))
    assert (last["epoch"], last["global_step"]) == (2, 3 * 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]


def test_hostile_checkpoint_for_resume_is_refused(tiny_layout, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    # in a run directory, so it gets as far as loading
    evil = tmp_path / "old" / "checkpoints" / "evil.ckpt"
    evil.parent.mkdir(parents=True)
    (tmp_path / "old" / "history.csv").write_text("epoch\n")
    torch.save({"state_dict": {}, "x": RunsCode()}, evil)
    with pytest.raises(UserError, match=r"evil.ckpt: refused"):
        train(cfg_for(tmp_path / "run", tiny_layout, f"resume={evil}", *FAST))
    assert not marker.exists()


def test_a_resumed_run_also_logs_into_the_original_run_directory(tmp_path):
    import logging

    from cifar_lightning.resume import log, log_also_to

    (tmp_path / "new").mkdir(), (tmp_path / "old").mkdir()
    root, before = logging.getLogger(), list(logging.getLogger().handlers)
    # as Hydra's job logging does
    root.addHandler(logging.FileHandler(tmp_path / "new" / "train.log"))
    level = root.level
    root.setLevel(logging.INFO)
    try:
        log_also_to(tmp_path / "old" / "train.log")
        log.info("epoch 3 done")
    finally:
        for h in set(root.handlers) - set(before):
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
    assert "epoch 3 done" in (tmp_path / "new" / "train.log").read_text()
    assert "epoch 3 done" in (tmp_path / "old" / "train.log").read_text()
    assert f"resumed from {tmp_path / 'new'}" in (tmp_path / "old" / "train.log").read_text()
