"""debug=fdr|overfit|limit|profiler (conf/debug/): each runs a whole training on tiny data, with
history.csv, metrics.json and the test report written; overfit_batches trains and validates on
the same batches every epoch; the debug keys' values are checked before anything runs."""

import csv
import json
import logging
import re

import lightning as L
import pytest

import cifar_lightning.build as build
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.errors import UserError
from cifar_lightning.schema import CONF_DIR, compose
from cifar_lightning.train import train
from tests.conftest import cfg_for, run_cli

DEBUG = sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml"))

# per debug file: the overrides that keep it short on tiny data (20 images a directory, 30 test
# images), then what the run must show. batch 4: 20 train, 5 val and 8 test batches.
EXPECT = {
    # one batch of each split, no checkpoints; the default logger, which Lightning swaps for a
    # DummyLogger: our callbacks must not depend on what it logs
    "fdr": dict(overrides=["data.batch_size=4"], epochs=1, tested=4, ckpt=False),
    "overfit": dict(
        overrides=["data.batch_size=4", "trainer.max_epochs=3", "logger=none"],
        epochs=3,
        tested=30,
        ckpt=True,
    ),
    "limit": dict(overrides=["data.batch_size=4", "logger=none"], epochs=3, tested=20, ckpt=True),
    "profiler": dict(overrides=["data.batch_size=8", "logger=none"], epochs=1, tested=30, ckpt=1),
}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_debug_file_has_its_expectations():
    assert DEBUG == sorted(EXPECT)


@pytest.mark.parametrize("name", DEBUG)
def test_each_debug_option_trains_tests_and_reports(name, tiny_layout, tmp_path, caplog):
    expect = EXPECT[name]
    with caplog.at_level(logging.INFO):
        metrics = train(cfg_for(tmp_path, tiny_layout, f"debug={name}", *expect["overrides"]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    # (a class missing from a few tested images has a NaN AUROC: compare the scalars)
    assert saved["test_loss"] == metrics["test_loss"] and 0 <= saved["test_accuracy"] <= 1
    # History: one row per epoch, with the epoch's training metrics (logged at its last batch,
    # which a limited epoch must still reach)
    rows = _rows(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, expect["epochs"] + 1))
    for r in rows:
        assert all(float(r[k]) == float(r[k]) for k in ("train_loss", "val_loss")), r  # not NaN
    assert saved["epochs_run"] == expect["epochs"]
    # RunReport: predictions.csv holds the images the test phase scored, and only those
    preds = _rows(tmp_path / "predictions.csv")
    assert len(preds) == expect["tested"]
    assert [r["path"] for r in preds] == sorted(r["path"] for r in preds)  # file order
    assert (tmp_path / "checkpoints" / "best.ckpt").exists() == expect["ckpt"]
    if not expect["ckpt"]:
        assert "trainer.fast_dev_run saves no checkpoint: testing the final weights" in caplog.text
    if expect["tested"] < 30:
        assert f"testing the first {expect['tested']} of 30 test images" in caplog.text
    if name == "profiler":
        for stage in ("fit", "test"):
            assert "Profiler Report" in (tmp_path / f"{stage}-profile.txt").read_text()


class SeenBatches(L.Callback):
    """Records the labels of every training and validation batch, per epoch."""

    def __init__(self):
        self.train, self.val = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.setdefault(trainer.current_epoch, []).append(batch[1].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *_):
        self.val.setdefault(trainer.current_epoch, []).append(batch[1].tolist())


def test_overfit_trains_and_validates_on_the_same_batches_every_epoch(
    tiny_layout, tmp_path, monkeypatch
):
    # Lightning replaces a shuffling *sampler* with a sequential one, but leaves a custom
    # batch_sampler alone: ours reshuffles every epoch unless the datamodule fixes its order.
    seen = SeenBatches()
    real_build_trainer = build.build_trainer
    monkeypatch.setattr(
        "cifar_lightning.train.build_trainer",
        lambda cfg, *cbs, **kw: real_build_trainer(cfg, *cbs, seen, **kw),
    )
    overrides = ["debug=overfit", "data.batch_size=4", "trainer.max_epochs=3", "logger=none"]
    train(cfg_for(tmp_path, tiny_layout, *overrides))
    assert sorted(seen.train) == sorted(seen.val) == [0, 1, 2]
    first = seen.train[0]
    assert len(first) == 3 and all(seen.train[e] == first for e in (1, 2))
    # epoch 0's per-directory shuffle: mixed classes, not the first files of train_1
    assert len({label for batch in first for label in batch}) > 2
    # validation: the first 3 batches of the validation split, the same each epoch (Lightning)
    assert len(seen.val[0]) == 3 and all(seen.val[e] == seen.val[0] for e in (1, 2))


def test_a_fixed_batch_sampler_keeps_epoch_0s_order():
    moving = DirectoryBatchSampler([10, 10], 4, seed=1)
    fixed = DirectoryBatchSampler([10, 10], 4, seed=1, fixed=True)
    first = list(fixed)
    assert first == list(moving)
    moving.set_epoch(1)
    fixed.set_epoch(1)
    assert list(fixed) == first and list(moving) != first


def test_fdr_from_the_command_line_prints_what_it_tested(tiny_layout, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "cifar_lightning.train",
        f"data.root={tiny_layout}",
        "debug=fdr",
        "callbacks.progress_bar.refresh_rate=0",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "trainer.fast_dev_run saves no checkpoint: testing the final weights" in out
    assert re.search(r"test accuracy \d\.\d{4}", out)
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.fast_dev_run=-1", "must be true, false or a whole number of batches >= 0"),
        ("trainer.fast_dev_run=yes", "must be true, false or a whole number of batches >= 0"),
        (
            "trainer.overfit_batches=1.5",
            "must be a whole number of batches >= 0 or a fraction in [0.0, 1.0]",
        ),
        (
            "trainer.limit_train_batches=-2",
            "must be a whole number of batches >= 0 or a fraction in [0.0, 1.0]",
        ),
        (
            "trainer.limit_val_batches=abc",
            "must be a whole number of batches >= 0 or a fraction in [0.0, 1.0]",
        ),
        (
            "trainer.limit_test_batches=some",
            "must be a whole number of batches >= 0 or a fraction in [0.0, 1.0]",
        ),
    ],
)
def test_a_debug_value_of_the_wrong_kind_is_named_before_anything_runs(override, message, tmp_path):
    key, _, value = override.partition("=")
    with pytest.raises(UserError, match=f"^{re.escape(f'{key}={value}: {message}')}$"):
        train(cfg_for(tmp_path / "run", tmp_path / "no_data", "++" + override))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", DEBUG)
def test_debug_files_compose_after_an_experiment(name):
    # listed after experiment in config.yaml's defaults: a debug file's trainer settings win
    cfg = compose(["experiment=fast", f"debug={name}"])
    expected = {"fdr": 1, "overfit": 50, "limit": 3, "profiler": 1}[name]
    assert cfg.trainer.max_epochs == expected
