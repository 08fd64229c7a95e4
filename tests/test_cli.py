"""The command lines, end to end, on tiny data made in tmp_path: what they write, their error
lines (cli.run, HYDRA_FULL_ERROR, SIGTERM), multirun sweeps and run directories."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from cifar_lightning.errors import UserError
from cifar_lightning.model.checkpoint import load_net
from tests.conftest import CLASSES, RunsCode, make_layout, run_cli, write_images

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["trainer=cpu", "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture(scope="module")
def trained(tiny_layout, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    res = run_cli(
        "cifar_lightning.train",
        "model=s",
        "optim=rmsprop",
        f"data.root={tiny_layout}",
        "trainer.max_epochs=2",
        f"hydra.run.dir={run}",
        *QUICK,
        cwd=run.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run, res


def test_train_writes_every_artefact(trained):
    run, res = trained
    for name in [
        ".hydra/config.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "history.csv",
        "metrics.json",
        "predictions.csv",
        "training_curves.png",
        "confusion_matrix.png",
        "roc_curves.png",
    ]:
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))  # the run directory is its TensorBoard run
    m = json.loads((run / "metrics.json").read_text())
    assert (m["trainable_params"], m["non_trainable_params"], m["epochs_run"]) == (815018, 896, 2)
    for key in [
        "test_accuracy",
        "test_loss",
        "best_epoch",
        "train_seconds",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "auroc_macro",
    ]:
        assert isinstance(m[key], (int, float)), key
    assert set(m["per_class"]) == set(CLASSES) and m["per_class"][CLASSES[0]]["support"] == 3
    with open(run / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in hist] == [1, 2]
    assert set(hist[0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "epoch_seconds",
    }
    for r in hist:  # a metric that was never logged would be NaN here, and fail
        assert float(r["train_loss"]) > 0 and float(r["val_loss"]) > 0
        assert 0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["val_acc"]) <= 1
    with open(run / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 30 and abs(sum(float(preds[0][c]) for c in CLASSES) - 1) < 1e-4
    assert all(
        (run / p).read_bytes()[:8] == PNG
        for p in ["training_curves.png", "confusion_matrix.png", "roc_curves.png"]
    )
    assert "Trainable params: 815,018" in res.stdout and "Restoring best weights" in res.stdout
    # ours and Lightning's lines (checkpoint), once on the console
    log = (run / "train.log").read_text()
    assert "test accuracy" in log and "'val/loss' reached" in log and "INFO: " not in res.stderr
    ckpt = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == CLASSES


def test_multirun_writes_one_directory_per_job_and_a_summary(tiny_layout, tmp_path):
    res = run_cli(
        "cifar_lightning.train",
        "-m",
        "optim=rmsprop,adam",
        f"data.root={tiny_layout}",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *QUICK,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
    summary = (sweep / "summary.md").read_text()
    assert (
        "optim=rmsprop" in summary and "optim=adam" in summary and summary.count("completed") == 2
    )
    assert (sweep / "summary.png").read_bytes()[:8] == PNG
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)


@pytest.mark.slow
def test_prepare_builds_every_cache_so_training_starts_warm(tmp_path):
    root = make_layout(tmp_path / "data", classes=CLASSES[:3])
    res = run_cli("cifar_lightning.prepare", f"data.root={root}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    splits = ["train_1", "train_2", "train_3", "train_4", "valid", "test"]
    assert sorted(p.name.split("-")[1] for p in root.glob(".cache-*.pt")) == sorted(splits)
    assert "caching" in res.stderr
    res = run_cli(
        "cifar_lightning.train",
        f"data.root={root}",
        "trainer.max_epochs=1",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        *QUICK,
        cwd=tmp_path,
    )
    # every split came from its cache
    assert res.returncode == 0 and "caching" not in res.stderr + res.stdout
    (root / "valid" / CLASSES[1] / "broken.png").write_bytes(PNG + b"torn")
    res = run_cli("cifar_lightning.prepare", f"data.root={root}", "data.cache=false", cwd=tmp_path)
    assert res.returncode != 0
    last_line = res.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"error: {root / 'valid' / CLASSES[1] / 'broken.png'}: not a readable image"
    )


@pytest.mark.parametrize(
    "override,names",
    [
        ("optim=nope", "optim/nope"),
        ("model.label_smoothing=0.1", "model.label_smoothing has moved: use loss.label_smoothing"),
        ("model.foo=1", "model.foo: Key 'foo' not in 'ModelConfig'"),
        ("test=no", "test=no: must be true or false"),
    ],
)
def test_bad_override_is_one_error_line(tmp_path, override, names):
    res = run_cli("cifar_lightning.train", override, cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip().count("\n") == 0
        and res.stderr.startswith("error: ")
        and names in res.stderr
    )


def test_run_directory_that_cannot_be_made_is_one_error_line(tiny_layout, tmp_path):
    # Hydra makes the run directory before our code runs: a path through a file (or a read-only
    # mount, a full disk) was an OSError traceback
    (tmp_path / "a_file").write_text("")
    res = run_cli(
        "cifar_lightning.train",
        f"data.root={tiny_layout}",
        f"hydra.run.dir={tmp_path}/a_file/run",
        *QUICK,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: [Errno 20] Not a directory: '{tmp_path}/a_file/run'"


def test_only_the_machines_os_errors_are_user_facing():
    from cifar_lightning.errors import user_facing_cause

    assert user_facing_cause(RuntimeError("a bug")) is None
    for code in (13, 28, 30):  # EACCES, ENOSPC, EROFS
        exc = OSError(code, "x", "/some/file")
        wrapped = RuntimeError("wrapped")
        wrapped.__cause__ = exc  # as `raise ... from exc` inside a library
        assert user_facing_cause(exc) is exc and user_facing_cause(wrapped) is exc
    # ours to name, or a bug
    assert user_facing_cause(FileNotFoundError(2, "No such file", "x")) is None
    assert user_facing_cause(OSError("no errno")) is None


def test_evaluate_another_folder_matches_classes_by_name(trained, tmp_path):
    run, _ = trained
    eval_dir = tmp_path / "plain_names"
    for c, name in enumerate(CLASSES):  # "airplane" against the checkpoint's "000_airplane"
        write_images(eval_dir / name.split("_", 1)[1], 2, c, seed=5)
    res = run_cli(
        "cifar_lightning.evaluate",
        f"ckpt_path={run}/checkpoints/best.ckpt",
        f"eval_dir={eval_dir}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "names equal after removing the NNN_ index" in res.stdout
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["per_class"][CLASSES[3]]["support"] == 2 and 0 <= m["test_accuracy"] <= 1
    assert (tmp_path / "eval" / "roc_curves.png").read_bytes()[:8] == PNG


def test_evaluate_unreadable_image_error_is_its_own_last_line(trained, tmp_path):
    run, _ = trained
    eval_dir = make_layout(tmp_path / "d", splits={"x": 2}) / "x"
    # decoded after the other classes' files: the bar is mid-way
    bad = eval_dir / CLASSES[4] / "zz.jpg"
    bad.write_text("not an image")
    res = run_cli(
        "cifar_lightning.evaluate",
        f"ckpt_path={run}/checkpoints/best.ckpt",
        f"eval_dir={eval_dir}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: not a readable image"), res.stderr[-1000:]
    # the run directory says why it failed
    assert last in (tmp_path / "eval" / "evaluate.log").read_text()


def test_evaluate_mismatched_classes_lists_the_difference(trained, tmp_path):
    run, _ = trained
    bad = (
        make_layout(tmp_path / "bad", classes=CLASSES[:9] + ["009_tractor"], splits={"x": 1}) / "x"
    )
    res = run_cli(
        "cifar_lightning.evaluate",
        f"ckpt_path={run}/checkpoints/best.ckpt",
        f"eval_dir={bad}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: ") and res.stderr.strip().count("\n") == 0
    assert "only in eval_dir ['tractor'], only in checkpoint ['truck']" in res.stderr


def test_predict_skips_unreadable_files(trained, tmp_path):
    run, _ = trained
    pics = tmp_path / "pics"
    write_images(pics, 3, 2, size=50, ext=".jpg")
    (pics / "broken.png").write_text("not an image")
    res = run_cli(
        "cifar_lightning.predict",
        f"ckpt_path={run}/checkpoints/best.ckpt",
        f"inputs={pics}",
        f"hydra.run.dir={tmp_path / 'pred'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipped" in res.stdout and "broken.png" in res.stdout
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert (
        len(rows) == 3
        and rows[0]["prediction"] in CLASSES
        and float(rows[0]["p1"]) >= float(rows[0]["p2"])
    )


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, evil)
    with pytest.raises(UserError, match=r"evil.ckpt: refused"):
        load_net(evil)
    assert not marker.exists()


RERUN_SPELLINGS = [  # argparse takes abbreviations
    ["--experimental-rerun", "config.pickle"],
    ["--experimental-rerun=config.pickle"],
    ["--exp", "config.pickle"],
    ["--experimental-rer=config.pickle"],
]


@pytest.mark.parametrize("args", RERUN_SPELLINGS, ids=" ".join)
def test_every_spelling_of_experimental_rerun_is_refused(args):
    from cifar_lightning.cli import refuse_rerun

    with pytest.raises(UserError, match="^--experimental-rerun is refused"):
        refuse_rerun(["model=s", *args])
    refuse_rerun(["model=s", "experiment=best"])  # without it: no error


@pytest.mark.parametrize("module", ["cifar_lightning.train", "cifar_lightning.predict"])
def test_hydra_experimental_rerun_is_refused_before_it_unpickles(tmp_path, monkeypatch, module):
    import pickle

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(RunsCode()))
    # the abbreviated spelling: cli.run asks Hydra's own parser (every spelling is tested above)
    res = run_cli(module, *RERUN_SPELLINGS[2], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --experimental-rerun is refused")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"hello, not a checkpoint\n", r"x.ckpt: not a checkpoint \(KeyError: 101\)$"),
        # torch's reason, not its advice
        (b"x\n", r"x.ckpt: not a checkpoint \(Unsupported operand 120\)$"),
        (b"", r"x.ckpt: not a checkpoint \(EOFError\)$"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content, message):
    (tmp_path / "x.ckpt").write_bytes(content)
    with pytest.raises(UserError, match=message):  # not "refused ... could run code"
        load_net(tmp_path / "x.ckpt")


def test_a_foreign_pickle_is_one_line_without_torchs_protocol_warning(tmp_path, recwarn):
    import pickle

    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(UserError, match=r"raw.pkl: not a checkpoint \(Unsupported operand 149\)$"):
        load_net(tmp_path / "raw.pkl")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_hydra_full_error_shows_the_traceback_of_a_user_error(tmp_path):
    # HYDRA_FULL_ERROR=1 is how a user asks for the traceback behind an `error:` line.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_lightning.evaluate",
            f"ckpt_path={tmp_path / 'nope.ckpt'}",
            f"eval_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "UserError: ckpt_path=" in res.stderr and "nope.ckpt: no such file" in res.stderr


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
    assert res.stderr.strip().splitlines()[-1] == "error: optim.lr=-1.0: must be > 0"
    assert (tmp_path / "sweep" / "1" / "metrics.json").exists()
    # each job's train.log says how that job ended: the failed one its error line, the other none
    assert (
        "error: optim.lr=-1.0: must be > 0" in (tmp_path / "sweep" / "0" / "train.log").read_text()
    )
    assert "error:" not in (tmp_path / "sweep" / "1" / "train.log").read_text()
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert (
        "| completed |" in summary
        and "| failed |" in summary
        and "optim.lr=-1.0: must be > 0" in summary
    )


def test_two_runs_started_together_get_two_directories(tiny_layout, tmp_path):
    cmd = [sys.executable, "-m", "cifar_lightning.prepare", f"data.root={tiny_layout}"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 2


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
    # train can be resumed; the benchmark (benchmarks/bench.py, also a Trainer fit) cannot
    from cifar_lightning.cli import run as cli

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
