"""Sweeps beyond the basic launcher, on tiny data through the CLI: hparams_search=optuna (a study
that continues across invocations, failed trials recorded), the joblib and submitit_local
launchers (summary rows of parallel jobs, a failing job), a signalled submitit job continuing from
its last.ckpt, and the SLURM settings."""

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from cifar_lightning.report.sweep import SweepSummary, write_summary
from cifar_lightning.schema import CONF_DIR
from tests.conftest import run_cli

TINY = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "logger=none",
    "callbacks.progress_bar.refresh_rate=0",
]


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def study_trials(launch_dir: Path, study: str):
    storage = f"sqlite:///{launch_dir}/outputs/optuna/{study}.db"
    return optuna.load_study(study_name=study, storage=storage).trials


def folder_state(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_an_optuna_study_continues_with_new_trials(tiny_layout, tmp_path):
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"data.root={tiny_layout}", *TINY]
    first = run_cli("cifar_lightning.train", *args, "hydra.sweep.dir=sweep1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = folder_state(tmp_path / "sweep1")
    second = run_cli("cifar_lightning.train", *args, "hydra.sweep.dir=sweep2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr

    trials = study_trials(tmp_path, "cifar_lightning")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert not set(params[:2]) & set(params[2:]), "the continued study repeated its first trials"
    assert folder_state(tmp_path / "sweep1") == before  # the first invocation's jobs untouched
    for sweep in ("sweep1", "sweep2"):
        rows = summary_rows(tmp_path / sweep)
        assert sorted(r["job"] for r in rows) == ["0", "1"]
        assert all(r["status"] == "completed" and r["test_accuracy"] == "" for r in rows)
    # each trial's value is its metrics.json's best_val_acc (sweep_objective)
    values = sorted(t.value for t in trials[2:])
    saved = sorted(
        json.loads((tmp_path / "sweep2" / j / "metrics.json").read_text())["best_val_acc"]
        for j in ("0", "1")
    )
    assert values == pytest.approx(saved)


@pytest.mark.slow
def test_a_failed_trial_is_recorded_and_the_study_goes_on(tiny_layout, tmp_path):
    result = run_cli(
        "cifar_lightning.train",
        "hparams_search=optuna",
        "hydra.sweeper.study_name=failing",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=0",  # with the pinned Optuna: 1.5 first, then 0.25 twice
        "model.dropout=choice(0.25,1.5)",  # 1.5 is refused by the config check: that trial fails
        f"data.root={tiny_layout}",
        *TINY,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    trials = study_trials(tmp_path, "failing")
    fail, complete = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert [(t.state, t.params["model.dropout"]) for t in trials] == [
        (fail, 1.5),
        (complete, 0.25),
        (complete, 0.25),
    ]
    assert "Failed experiment: model.dropout=1.5: must be a number in [0, 1)" in result.stdout
    assert sorted(r["status"] for r in summary_rows(tmp_path / "sweep")) == [
        "completed",
        "completed",
        "failed",
    ]


def test_a_study_whose_every_trial_failed_ends_in_one_error_line(tiny_layout, tmp_path):
    result = run_cli(
        "cifar_lightning.train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=1",
        "model.dropout=choice(1.5)",
        f"data.root={tiny_layout}",
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: hparams_search: every trial failed, so the study has no best trial")
    )


def broken_copies(db: Path) -> dict[str, bytes]:
    """A store as something else may leave it: cut short, overwritten, or some other file."""
    whole = db.read_bytes()
    return {
        "truncated": whole[: len(whole) // 2],
        "random bytes": os.urandom(len(whole)),
        "text": b"trial 0: x=0.5\ntrial 1: x=",
    }


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "text"])
def test_a_broken_study_file_is_one_error_line_before_the_sweeper_opens_it(
    tmp_path, capsys, damage
):
    from omegaconf import OmegaConf

    from cifar_lightning.errors import UserError
    from cifar_lightning.search import StorageFolder, check_study

    db = tmp_path / "optuna" / "s.db"
    db.parent.mkdir()
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=20)
    check_study(db, "s")  # a sound study passes
    broken = broken_copies(db)[damage]
    db.write_bytes(broken)
    with pytest.raises(UserError, match=rf"^{db}: not a readable SQLite database \(") as exc:
        check_study(db, "s")
    assert "study s can't be continued; move the file aside (or delete it)" in str(exc.value)
    assert "hydra.sweeper.study_name=NEW_NAME" in str(exc.value)
    # Hydra turns a callback's exception into a warning and opens the study anyway: the callback
    # ends the process itself, as cli.run does, with the one line and status 2
    sweeper = {"storage": f"sqlite:///{db}", "study_name": "s"}
    with pytest.raises(SystemExit) as stop:
        StorageFolder().on_multirun_start(OmegaConf.create({"hydra": {"sweeper": sweeper}}))
    assert stop.value.code == 2 and isinstance(stop.value.__cause__, UserError)
    assert capsys.readouterr().err == f"error: {exc.value}\n"
    assert db.read_bytes() == broken and [p.name for p in db.parent.iterdir()] == ["s.db"]


def test_a_broken_study_file_ends_the_cli_in_one_error_line(tmp_path):
    db = tmp_path / "outputs" / "optuna" / "cifar_lightning.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(os.urandom(8192))
    result = run_cli("cifar_lightning.train", "hparams_search=optuna", *TINY, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {db.relative_to(tmp_path)}: not a readable SQLite database (file is not a "
        "database), so study cifar_lightning can't be continued; move the file aside (or delete "
        "it) to start the study afresh, without its past trials, or leave it and start another "
        "study: hydra.sweeper.study_name=NEW_NAME"
    ]
    assert [p.name for p in db.parent.iterdir()] == [db.name]  # and no sweep directory
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["optuna"]


@pytest.mark.parametrize(
    "objective,direction", [("best_val_acc", "maximize"), ("best_val_loss", "minimize")]
)
def test_the_study_direction_follows_the_objective(objective, direction):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            ["hparams_search=optuna", f"sweep_objective={objective}"],
            return_hydra_config=True,
        )
    assert cfg.hydra.sweeper.direction == direction and cfg.test is False


LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_parallel_launchers_summarise_every_job_and_a_failing_one(launcher, tiny_layout, tmp_path):
    result = run_cli(
        "cifar_lightning.train",
        "-m",
        *LAUNCHERS[launcher],
        "model.dropout=0.5,1.5",
        f"data.root={tiny_layout}",
        *TINY,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == ["error: model.dropout=1.5: must be a number in [0, 1)"]
    rows = summary_rows(tmp_path / "sweep")
    status = {r["overrides"].split()[0]: r["status"] for r in rows}
    assert status == {"model.dropout=0.5": "completed", "model.dropout=1.5": "failed"}
    for r in rows:
        log = (tmp_path / "sweep" / r["job"] / "train.log").read_text()
        errors = [line for line in log.splitlines() if "error:" in line]
        if r["status"] == "failed":  # the job's log ends with its one error line
            assert len(errors) == 1 and errors[0].endswith(error_lines[0])
        else:
            assert not errors and (tmp_path / "sweep" / r["job"] / "metrics.json").exists()


def _job_process(sweep_dir: Path) -> int | None:
    """The pid of the submitit task running a job of `sweep_dir`."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"submitit.core._submit" in cmd and any(str(sweep_dir).encode() in c for c in cmd):
                return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds the job's process in /proc")
def test_a_signalled_submitit_job_is_requeued_and_continues_from_last_ckpt(tiny_layout, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    epochs = 30
    args = [
        *("-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "seed=0"),
        *(f"data.root={tiny_layout}", *TINY, f"trainer.max_epochs={epochs}"),
        "callbacks.early_stopping=null",
    ]
    cmd = [sys.executable, "-m", "cifar_lightning.train", *args]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    pid = _job_process(sweep)
    assert last.exists() and pid, "the job never wrote last.ckpt"
    os.kill(pid, signal.SIGUSR2)  # what SLURM sends before a preemption or the time limit
    launcher.communicate(timeout=400)
    assert launcher.returncode == 0

    log = (sweep / "0" / "train.log").read_text()
    assert "Caught signal SIGUSR2" in log and "requeued job: continuing from" in log
    with open(sweep / "0" / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, epochs + 1))
    assert summary_rows(sweep)[0]["status"] == "completed"
    assert json.loads((sweep / "0" / "metrics.json").read_text())["epochs_run"] == epochs


def test_the_slurm_launcher_config_names_its_cluster_settings():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_task == 1 and launcher.timeout_min == 240
    assert launcher.max_num_timeout == 3


def test_lightnings_slurm_requeue_stays_off_under_submitit(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from cifar_lightning.build import build_trainer, resolve_precision
    from tests.conftest import cfg_for

    slurm_job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "x"}
    for key, value in {**slurm_job, "SLURM_JOB_ID": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = cfg_for(tmp_path, tmp_path, "logger=none")
    trainer = build_trainer(cfg, precision=resolve_precision(cfg))
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


def summary_row(job: str) -> dict:
    """A completed job's summary_row.json, as SweepSummary.on_job_end writes it."""
    return {
        "job": job,
        "overrides": f"seed={job}",
        "recipe": "(defaults)",
        "seed": int(job),
        "monitor": "val/loss",
        "monitor_mode": "min",
        "status": "completed",
        "test_accuracy": 0.5,
    }


def _finish_job(sweep_dir: str, job: str, barrier) -> None:
    (Path(sweep_dir) / job).mkdir()
    (Path(sweep_dir) / job / "summary_row.json").write_text(json.dumps(summary_row(job)))
    barrier.wait()  # every job ends at the same moment
    write_summary(Path(sweep_dir))


def test_jobs_ending_at_once_all_reach_the_summary(tmp_path):
    # forked, not spawned: a spawned child would import torch and this module again, for seconds
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    barrier = ctx.Barrier(3)
    jobs = [
        ctx.Process(target=_finish_job, args=(str(tmp_path), str(i), barrier)) for i in range(3)
    ]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(120)
    assert [j.exitcode for j in jobs] == [0] * 3
    assert sorted(r["job"] for r in summary_rows(tmp_path)) == ["0", "1", "2"]


def test_the_summary_is_rewritten_at_the_multirun_end(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary_row.json").write_text(json.dumps(summary_row("0")))
    (tmp_path / ".summary.lock").touch()  # left by the jobs' writes
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert [r["job"] for r in summary_rows(tmp_path)] == ["0"]
    assert not (tmp_path / ".summary.lock").exists()
