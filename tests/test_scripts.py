"""The scripts, tried small on the CPU: scripts/gpu_results.sh (the one script that takes every
GPU figure) and benchmarks/step_overhead.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_step_over_its_limit_is_killed_and_the_snapshot_keeps_what_was_done(
    tiny_layout, tmp_path
):
    data, out, snapshot = tmp_path / "cifar10", tmp_path / "gpu", tmp_path / "back" / "gpu.tgz"
    shutil.copytree(tiny_layout, data)
    snapshot.parent.mkdir()
    never_stops = (
        f"data.root={data} trainer.max_epochs=100000 callbacks.early_stopping.patience=100000 "
        "callbacks.progress_bar.refresh_rate=0"
    )
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "TRAINER": "cpu",
        "STEP_LIMIT_S": "40",
        "SNAPSHOT": str(snapshot),
        "EXTRA": never_stops,
        "PYTHONWARNINGS": "ignore",
    }
    start = time.monotonic()
    r = subprocess.run(
        ["bash", "scripts/gpu_results.sh", "download", str(out), "recipe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - start

    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"results in {out}; failed: recipe" in r.stdout  # it went on to the end
    assert took < 200  # the step was stopped at its limit, not left to run 100,000 epochs
    with tarfile.open(snapshot) as tar:
        names = {Path(n).name for n in tar.getnames()}
        recipe_log = tar.extractfile("gpu/recipe.log").read().decode()
        monitor_log = tar.extractfile("gpu/monitor.log").read().decode()
    assert {"device.txt", "prepare.log", "recipe.log", "monitor.log"} <= names
    # checkpoints stay behind: the snapshot is for reading
    assert not any(n.endswith(".ckpt") for n in names)
    assert "killed after STEP_LIMIT_S=40 s" in recipe_log
    # training had started: the limit cut a running step, not a crashed one
    assert "Epoch" in recipe_log
    # no wall time for a recipe that never finished
    assert "whole default recipe:" not in recipe_log
    assert "host_used_MiB=" in monitor_log


def test_a_killed_step_without_a_step_limit_is_logged_and_the_script_goes_on(tmp_path):
    # 137 is what an out-of-memory kill gives; with no STEP_LIMIT_S set, it is an ordinary failure
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nexit 137\n")
    fake_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "STEP_LIMIT_S"}
    r = subprocess.run(
        ["bash", "scripts/gpu_results.sh", "download", str(tmp_path / "gpu"), "recipe"],
        cwd=ROOT,
        env={**env, "PYTHON": str(fake_python)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "unbound variable" not in r.stderr
    assert "** device failed" in r.stdout and "killed after" not in r.stdout


@pytest.mark.slow
def test_step_overhead_script_times_the_four_loops(tmp_path):
    # from any directory, against the installed package
    script = ROOT / "benchmarks" / "step_overhead.py"
    res = subprocess.run(
        [sys.executable, str(script), "--steps", "30", "--rounds", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    names = ("a", "c", "c+cb", "c-log")
    rows = {
        f[0]: f for f in (line.split() for line in res.stdout.splitlines()) if f and f[0] in names
    }
    assert set(rows) == set(names)
    # median, over a, a/x, 2 rounds
    assert all(float(f[1]) > 0 and len(f) == 6 for f in rows.values())
    assert float(rows["a"][2]) == 0 and float(rows["c"][3]) == pytest.approx(
        float(rows["a"][1]) / float(rows["c"][1]), abs=0.01
    )


INSTALL = "-m pip install --no-deps --no-build-isolation --no-index -e ."


@pytest.mark.parametrize("installed", [True, False])
def test_gpu_results_installs_the_clone_unless_its_configs_are_importable(tmp_path, installed):
    # pkg://cifar_lightning.conf exists only once the clone is installed (pyproject.toml maps
    # conf/ into the package); a stand-in interpreter records each command and answers the check
    calls, fake_python = tmp_path / "calls.txt", tmp_path / "python"
    check = "" if installed else 'case "$*" in *cifar_lightning.conf*) exit 1;; esac\n'
    fake_python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{check}')
    fake_python.chmod(0o755)
    r = subprocess.run(
        ["bash", "scripts/gpu_results.sh", "download", str(tmp_path / "gpu"), "recipe"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(fake_python), "TRAINER": "cpu"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    commands = calls.read_text().splitlines()
    prepare = next(i for i, c in enumerate(commands) if c.startswith("-m cifar_lightning.prepare"))
    if installed:
        assert INSTALL not in commands
    else:  # before anything reads a config
        assert commands.index(INSTALL) < prepare


def test_the_accuracy_part_trains_the_teacher_then_sweeps_fast_then_best(tmp_path):
    # a stand-in interpreter records each command; for the config reads it answers 7 epochs
    calls, fake_python = tmp_path / "calls.txt", tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho 7\n')
    fake_python.chmod(0o755)
    r = subprocess.run(
        ["bash", "scripts/gpu_results.sh", "download", str(tmp_path / "gpu"), "accuracy"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(fake_python), "TRAINER": "cpu"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = [c for c in calls.read_text().splitlines() if c.startswith("-m cifar_lightning.train")]
    teacher, sweeps = runs[0], runs[1:]
    assert "experiment=teacher" in teacher and " -m " not in teacher and "test=false" in teacher
    names = ["fast_distilled", "fast_distilled_short", "fast", "fast_short"]
    names += ["best_distilled", "best"]
    assert [s.split("hydra.sweep.dir=")[1] for s in sweeps] == [
        f"{tmp_path / 'gpu'}/accuracy_{name}" for name in names
    ]
    assert all(" -m " in s and "seed=0,1,2" in s and "trainer=cpu" in s for s in sweeps)
    for sweep, name in zip(sweeps, names):
        assert f"experiment={name.removesuffix('_short')} " in sweep
        assert ("trainer.max_epochs=6" in sweep) == name.endswith("_short")
        # the fake run wrote no checkpoint, so the students fall back to the committed teacher
        distilled = "distill.teacher=docs/results/teacher_xeon/teacher.ckpt" in sweep
        assert distilled == ("distilled" in name)


def test_gpu_results_usage_names_every_part_it_runs_by_default():
    r = subprocess.run(
        ["bash", "scripts/gpu_results.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    default = next(
        line.split(":-", 1)[1].rstrip("}")
        for line in (ROOT / "scripts" / "gpu_results.sh").read_text().splitlines()
        if line.startswith("parts=${3:-")
    )
    assert default == "graph,recipe,bench,seeds,accuracy"
    assert r.returncode != 0 and f"ARCHIVE [OUT] [{default}]" in r.stderr
