"""train.py, a whole training run in-process on tiny data: what metrics.json and
predictions.csv say, following the monitor, each experiment reaching the module and optimizer,
divergence, config mistakes found in fit, SIGTERM, and DDP on the CPU against one process."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cifar_lightning.errors import UserError
from cifar_lightning.evaluate import evaluate
from cifar_lightning.schema import CONF_DIR
from cifar_lightning.train import train
from tests.conftest import CLASSES, cfg_for, make_classifier, run_cli, save_ckpt

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


@pytest.mark.slow
def test_train_metrics_and_predictions_follow_the_history_and_the_test_files(tiny_layout, tmp_path):
    # batch 8: the 30 test images come in 4 batches, so a shuffled or reversed batch order would
    # misalign predictions.csv's paths and labels. best_val_* come from the best epoch's row in
    # history.csv.
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


@pytest.mark.slow
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
    # the first of the highest
    best = max(hist, key=lambda r: (float(r["val_acc"]), -int(r["epoch"])))
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert m["best_epoch"] == int(best["epoch"]) == ckpt["epoch"] + 1
    assert m["best_val_acc"] == pytest.approx(float(best["val_acc"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
)
def test_experiments_train_one_epoch(experiment, tiny_layout, tmp_path):
    from cifar_lightning.train import train

    teacher = []
    if experiment.endswith("_distilled"):
        module = make_classifier(tmp_path, "experiment=teacher")
        teacher = [f"distill.teacher={save_ckpt(module, tmp_path / 'teacher.ckpt')}"]
    # 8 steps of 16 tiny images: peak lr 0.1 would outrun BatchNorm's running statistics (momentum
    # 0.01) and validation would be NaN; the full recipe runs on real data (RESULTS.md).
    m = train(
        cfg_for(
            tmp_path / "run",
            tiny_layout,
            f"experiment={experiment}",
            "trainer.max_epochs=1",
            "logger=none",
            "data.batch_size=16",
            # (distilled from a random teacher, fast's peak lr 0.2 diverges there too)
            "scheduler.max_lr=0.01" if experiment not in ("fast", "next") else "seed=0",
            *teacher,
        )
    )
    params = 1_166_538 if experiment == "teacher" else 815_018  # every other recipe: Model S
    assert m["trainable_params"] == params and m["epochs_run"] == 1
    assert 0 <= m["test_accuracy"] <= 1
    # the recipe reached the module and the optimizer that trained, not only the config
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    hp, group = ckpt["hyper_parameters"], ckpt["optimizer_states"][0]["param_groups"][0]
    assert hp["augment"]["flip"] is True
    if experiment == "next":
        assert hp["loss"]["l2"] == 1e-4 and group["betas"] == (0.9, 0.999)  # Adam
    elif experiment in ("best", "fast"):
        assert hp["tta"]["flip"] and hp["loss"]["label_smoothing"] == 0.2
    else:  # the teacher, and students of a teacher: no label smoothing
        assert hp["tta"]["flip"] and hp["loss"]["label_smoothing"] == 0.0
        assert hp["distill"]["teacher"] == (teacher[0].split("=", 1)[1] if teacher else None)


def test_divergence_stops_with_a_clear_message(tiny_layout, tmp_path):
    with pytest.raises(UserError, match=r"training diverged: no epoch had a finite val/loss"):
        train(cfg_for(tmp_path, tiny_layout, "optim.lr=1e9", "trainer.max_epochs=3", *FAST))
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()  # a NaN epoch is never the best


def test_config_mistake_found_in_fit_saves_nothing_and_names_the_key(tiny_layout, tmp_path):
    # one-cycle over tiny data for one epoch has no warm-up step: found in configure_optimizers
    with pytest.raises(UserError, match=r"scheduler.pct_start=0.25 leaves no warm-up in 4 steps"):
        train(cfg_for(tmp_path, tiny_layout, "experiment=best", "trainer.max_epochs=1", *FAST))
    # nothing to resume or inspect
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()


def test_sigterm_leaves_loadable_checkpoints_and_exits_nonzero(tiny_layout, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cifar_lightning.train",
        f"data.root={tiny_layout}",
        "trainer.max_epochs=500",
        f"hydra.run.dir={run}",
        *FAST,
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (run / "history.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    for name in ("interrupted.ckpt", "last.ckpt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["state_dict"] and ckpt["optimizer_states"]


@pytest.mark.slow
def test_ddp_cpu_matches_one_process(tiny_layout, tmp_path):
    """trainer=ddp_cpu: 2 gloo processes, each taking half of every batch. (1) Its test phase,
    gathered from both ranks, equals evaluating its best checkpoint in one process (tolerance 1e-5).
    (2) Its training matches a one-process run within 0.15 in test loss and 0.2 in accuracy on this
    tiny data: CPU DDP can't sync BatchNorm (PyTorch's SyncBatchNorm is GPU-only), so each rank
    normalises over its half-batch, and float sums run in another order."""
    runs = {}
    for trainer in ("cpu", "ddp_cpu"):
        run = tmp_path / trainer
        res = run_cli(
            "cifar_lightning.train",
            f"trainer={trainer}",
            f"data.root={tiny_layout}",
            "trainer.max_epochs=3",
            "model.dropout=0",
            "logger=none",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs[trainer] = json.loads((run / "metrics.json").read_text())
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(tmp_path / "ddp_cpu" / "checkpoints" / "best.ckpt"),
            "eval_dir": str(tiny_layout / "test"),
            "batch_size": 64,
            "device": "cpu",
            "run_dir": str(tmp_path / "eval"),
            "resize": None,
        }
    )
    one_process = evaluate(cfg)
    ddp, single = runs["ddp_cpu"], runs["cpu"]
    print(
        f"\nDDP test loss {ddp['test_loss']:.5f} acc {ddp['test_accuracy']:.4f}; "
        f"its checkpoint in one process {one_process['test_loss']:.5f} "
        f"{one_process['test_accuracy']:.4f}; one-process training "
        f"{single['test_loss']:.5f} {single['test_accuracy']:.4f}"
    )
    assert ddp["test_loss"] == pytest.approx(one_process["test_loss"], abs=1e-5)
    assert ddp["test_accuracy"] == one_process["test_accuracy"]
    assert ddp["per_class"][CLASSES[0]]["support"] == 3  # every test image once, none twice
    assert abs(ddp["test_loss"] - single["test_loss"]) < 0.15
    assert abs(ddp["test_accuracy"] - single["test_accuracy"]) <= 0.2


def test_a_run_directory_inside_data_root_is_refused_before_anything_is_written(tmp_path):
    # The next run would read the run's figures as images of a class named after its folder.
    from tests.conftest import make_layout

    root = make_layout(tmp_path / "cifar10")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    run_dir = root / "train_1" / "000_airplane" / "run"
    res = run_cli(
        "cifar_lightning.train",
        f"data.root={root}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: run directory {run_dir} is inside data.root={root}: its files would be read as "
        "images; put runs elsewhere (hydra.run.dir=..., or launch from another folder)"
    )
    # Hydra made the directory and its log before train() ran; nothing else was written
    made = {p.relative_to(root) for p in root.rglob("*")} - set(before)
    assert all(str(p).startswith("train_1/000_airplane/run") for p in made)
    assert not (run_dir / "checkpoints").exists() and not any(root.glob(".cache-*"))


def test_a_run_directory_beside_data_root_is_fine(tmp_path):
    from cifar_lightning.build import refuse_run_dir_inside_data

    refuse_run_dir_inside_data(tmp_path / "outputs" / "run", tmp_path / "data" / "cifar10")
    refuse_run_dir_inside_data(tmp_path / "cifar10-runs", tmp_path / "cifar10")
    with pytest.raises(UserError, match="is inside data.root"):
        refuse_run_dir_inside_data(tmp_path / "cifar10", tmp_path / "cifar10")
