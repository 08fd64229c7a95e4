"""Bad inputs, interruption and resume, hostile files, several processes."""

import csv
import json
import multiprocessing as mp
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from cifar_lightning.data.cache import load_split
from cifar_lightning.data.folder import KerasImageFolder
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.errors import UserError
from cifar_lightning.evaluate import evaluate
from cifar_lightning.train import gather_test_outputs, train
from tests.conftest import CLASSES, RunsCode, cfg_for, make_layout, run_cli
from tests.test_cli import QUICK

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


def _history(run_dir):
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in csv.DictReader(f)]


def test_resume_parity(tiny_layout, tmp_path):
    """Stopped after epoch 2 and resumed, a run ends exactly as an uninterrupted one: same history
    (losses, accuracies, learning-rate cuts) and same test metrics. A min_delta no val_loss change can
    meet makes every epoch after the first "bad", whatever the tiny data does: with patience 2 the
    plateau schedule cuts after epoch 3 only if its count of bad epochs (1 after epoch 2) was restored."""
    common = [
        "seed=3",
        "trainer.deterministic=true",
        "scheduler.patience=2",
        "scheduler.min_delta=100",
        *FAST,
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
    assert [float(r["lr"]) for r in b] == pytest.approx(
        [1e-3] * 3 + [1e-4] * 2
    )  # cut after epoch 3, post-resume
    for key in ("test_accuracy", "test_loss", "f1_macro", "best_epoch"):
        assert whole[key] == resumed[key], key


def test_resume_refuses_what_it_cannot_continue_before_writing_anything(tiny_layout, tmp_path):
    """resume= continues in the checkpoint's run directory and overwrites files there, so a checkpoint
    copied elsewhere, a foreign file, other classes or another network are refused up front."""
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
    assert (
        sorted(p.name for p in tmp_path.rglob("*")) == before
    )  # no interrupted.ckpt, nothing beside backup/


def test_last_checkpoint_is_the_last_epoch_even_when_it_did_not_improve(tiny_layout, tmp_path):
    """last.ckpt is what resume continues from. Lightning 2.6's save_last refreshes it only on epochs
    that improve the monitor. Here no epoch can: with lr 0 and frozen BatchNorm statistics val/loss is
    the same every epoch (a tie is not an improvement), so best.ckpt stays at epoch 1."""
    train(
        cfg_for(
            tmp_path,
            tiny_layout,
            "optim.lr=0",
            "model.bn_momentum=0",
            "trainer.max_epochs=3",
            "test=false",
            *FAST,
        )
    )
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0  # the premise: no later epoch improved
    assert (last["epoch"], last["global_step"]) == (
        2,
        3 * 4,
    )  # 3 epochs of 4 steps (4 dirs x ceil(20/64))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]


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


def test_divergence_stops_with_a_clear_message(tiny_layout, tmp_path):
    with pytest.raises(UserError, match=r"training diverged: no epoch had a finite val/loss"):
        train(cfg_for(tmp_path, tiny_layout, "optim.lr=1e9", "trainer.max_epochs=3", *FAST))
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()  # a NaN epoch is never the best


def test_hostile_checkpoint_for_resume_is_refused(tiny_layout, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    evil = (
        tmp_path / "old" / "checkpoints" / "evil.ckpt"
    )  # in a run directory, so it gets as far as loading
    evil.parent.mkdir(parents=True)
    (tmp_path / "old" / "history.csv").write_text("epoch\n")
    torch.save({"state_dict": {}, "x": RunsCode()}, evil)
    with pytest.raises(UserError, match=r"evil.ckpt: refused"):
        train(cfg_for(tmp_path / "run", tiny_layout, f"resume={evil}", *FAST))
    assert not marker.exists()


def test_multirun_with_a_failing_job_completes_the_others(tiny_layout, tmp_path):
    res = run_cli(
        "cifar_lightning.train",
        "-m",
        "optim.lr=-1,1e-3",
        f"data.root={tiny_layout}",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *QUICK,
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error: optim:")
    assert (tmp_path / "sweep" / "1" / "metrics.json").exists()
    # each job's train.log says how that job ended: the failed one its error line, the other none
    assert (
        "error: optim: invalid RMSprop hyperparameters lr=-1"
        in (tmp_path / "sweep" / "0" / "train.log").read_text()
    )
    assert "error:" not in (tmp_path / "sweep" / "1" / "train.log").read_text()
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert (
        "| completed |" in summary
        and "| failed |" in summary
        and "invalid RMSprop hyperparameters lr=-1" in summary
    )


def test_two_runs_started_together_get_two_directories(tiny_layout, tmp_path):
    cmd = [sys.executable, "-m", "cifar_lightning.prepare", f"data.root={tiny_layout}"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 2


def _cache(root):
    images, labels, _ = load_split(KerasImageFolder(root), 32, "tf_bilinear")
    return images.sum().item(), len(labels)


def test_concurrent_caching_and_a_torn_cache_file(tmp_path):
    root = make_layout(tmp_path / "d", classes=CLASSES[:3], splits={"valid": 20}) / "valid"
    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_cache, [root, root])
    assert a == b and len(list(root.parent.glob(".cache-valid-*.pt"))) == 1
    cache = next(root.parent.glob(".cache-valid-*.pt"))
    cache.write_bytes(cache.read_bytes()[:1000])  # as if a writer had crashed mid-file
    assert _cache(root) == a  # rebuilt, not trusted
    assert not list(root.parent.glob("*.tmp"))


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
        f"\nDDP test loss {ddp['test_loss']:.5f} acc {ddp['test_accuracy']:.4f}; its checkpoint in one process "
        f"{one_process['test_loss']:.5f} {one_process['test_accuracy']:.4f}; one-process training "
        f"{single['test_loss']:.5f} {single['test_accuracy']:.4f}"
    )
    assert ddp["test_loss"] == pytest.approx(one_process["test_loss"], abs=1e-5)
    assert ddp["test_accuracy"] == one_process["test_accuracy"]
    assert ddp["per_class"][CLASSES[0]]["support"] == 3  # every test image once, none twice
    assert abs(ddp["test_loss"] - single["test_loss"]) < 0.15
    assert abs(ddp["test_accuracy"] - single["test_accuracy"]) <= 0.2


@pytest.mark.parametrize(
    "n_images,batch_size,world_size", [(30, 8, 2), (17, 8, 2), (33, 8, 4), (9, 4, 3), (5, 64, 8)]
)
def test_ddp_test_outputs_gather_into_file_order_once_each(
    monkeypatch, n_images, batch_size, world_size
):
    """Under DDP each rank tests its chunk of every sequential batch; gathered, the outputs must be the
    test split in file order, each image once: predictions.csv pairs rows with paths by position.
    Includes last batches smaller than world_size (17 % 8 = 1 image for 2 ranks), where some rank
    has no image of its own and repeats one. Each fake output carries its image's index."""
    per_rank = [
        [
            (torch.tensor(b, dtype=torch.float32)[:, None], torch.tensor(b))
            for b in DirectoryBatchSampler(
                [n_images], batch_size, "sequential", rank=r, world_size=world_size
            )
        ]
        for r in range(world_size)
    ]
    monkeypatch.setattr(
        torch.distributed,
        "all_gather_object",
        lambda out, _: out.__setitem__(slice(None), per_rank),
    )
    logits, labels = gather_test_outputs(per_rank[0], world_size, n_images)
    assert labels.tolist() == logits[:, 0].long().tolist() == list(range(n_images))


def test_config_mistake_found_in_fit_saves_nothing_and_names_the_key(tiny_layout, tmp_path):
    # one-cycle over tiny data for one epoch has no warm-up step: found in configure_optimizers
    with pytest.raises(UserError, match=r"scheduler.pct_start=0.25 leaves no warm-up in 4 steps"):
        train(cfg_for(tmp_path, tiny_layout, "experiment=best", "trainer.max_epochs=1", *FAST))
    assert not (
        tmp_path / "checkpoints" / "interrupted.ckpt"
    ).exists()  # nothing to resume or inspect


def test_a_crash_before_any_training_step_keeps_the_old_interrupted_checkpoint(tmp_path):
    from cifar_lightning.callbacks import InterruptCheckpoint

    saved = []
    trainer = type(
        "Trainer", (), {"save_checkpoint": lambda self, path, **kw: saved.append(path)}
    )()
    callback = InterruptCheckpoint(tmp_path / "interrupted.ckpt")
    callback.on_exception(trainer, None, RuntimeError("size mismatch"))  # e.g. in setup or loading
    assert saved == []
    callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == [tmp_path / "interrupted.ckpt"]


def test_a_resumed_run_also_logs_into_the_original_run_directory(tmp_path):
    import logging

    from cifar_lightning.train import log, log_also_to

    (tmp_path / "new").mkdir(), (tmp_path / "old").mkdir()
    root, before = logging.getLogger(), list(logging.getLogger().handlers)
    root.addHandler(
        logging.FileHandler(tmp_path / "new" / "train.log")
    )  # as Hydra's job logging does
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


@pytest.mark.parametrize(
    "after, line",
    [
        (
            "continue with resume=PATH/checkpoints/last.ckpt",
            "error: stopped by SIGTERM; continue with resume=PATH/checkpoints/last.ckpt",
        ),
        ("", "error: stopped by SIGTERM"),
    ],
)
def test_sigterm_line_gives_the_next_step_only_where_there_is_one(monkeypatch, capsys, after, line):
    # train can be resumed; bench (the other entry point that runs a Trainer fit) cannot
    from cifar_lightning.errors import cli

    SIGTERMException = type("SIGTERMException", (SystemExit,), {})  # Lightning's, matched by name
    monkeypatch.setattr(sys, "argv", ["x"])
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # cli wraps both; restored after the test
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")

    def stopped():
        raise SIGTERMException()

    with pytest.raises(SystemExit) as exc:
        cli(stopped, after_sigterm=after)
    assert exc.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
