"""The logger group: a 1-epoch run with every logger config writes that logger's files, the
recipe's hyperparameters and the figures, and metrics.json; a logger that can't take something
never fails the run; the MLflow store survives parallel creation; a missing extra is named."""

import json
import multiprocessing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cifar_lightning.build import resolve_precision
from cifar_lightning.errors import UserError
from cifar_lightning.loggers import (
    build_loggers,
    log_figure,
    log_hparams,
    mlflow_locations,
    prepare_mlflow,
    recipe_hparams,
)
from cifar_lightning.schema import CONF_DIR
from cifar_lightning.train import train
from tests.conftest import cfg_for

LOGGERS = sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml"))
FAST = ["callbacks.progress_bar.refresh_rate=0", "trainer=cpu", "trainer.max_epochs=1"]
FIGURES = {"training_curves", "test/confusion_matrix", "test/roc_curves"}


def tensorboard_tags(run_dir: Path) -> tuple[set, set]:
    """(image tags, scalar tags) in the run directory's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, scalars = set(), set()
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        images |= set(acc.Tags()["images"])
        scalars |= set(acc.Tags()["scalars"])
    return images, scalars


def mlflow_run(launch_dir: Path, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{launch_dir}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("cifar_lightning")
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    figures = {
        a.path
        for folder in ("figures", "figures/test")
        for a in client.list_artifacts(run.info.run_id, folder)
        if not a.is_dir
    }
    return run, figures


@pytest.mark.parametrize("logger", LOGGERS)
def test_every_logger_gets_its_files_hparams_and_figures(
    logger, tiny_layout, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the launch directory: MLflow's store is outputs/mlflow.db here
    run_dir = tmp_path / "outputs" / "run"
    cfg = cfg_for(run_dir, tiny_layout, f"logger={logger}", *FAST)
    metrics = train(cfg)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert {"training_curves.png", "confusion_matrix.png", "roc_curves.png"} <= {
        p.name for p in run_dir.iterdir()
    }
    kinds = set(OmegaConf.to_container(cfg.logger) or {})
    assert kinds == (
        {"tensorboard", "csv", "mlflow"}
        if logger == "many"
        else set([] if logger == "none" else [logger])
    )
    hparams = recipe_hparams(cfg, resolve_precision(cfg))
    if "tensorboard" in kinds:
        images, scalars = tensorboard_tags(run_dir)
        assert images == FIGURES
        assert {"hparams/test_accuracy", "val/loss", "test/acc"} <= scalars
    else:
        assert not list(run_dir.glob("events.out.tfevents.*"))
    if "csv" in kinds:
        header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"hparams/test_accuracy", "val/loss", "train/loss"} <= set(header)
        saved = OmegaConf.load(run_dir / "csv" / "hparams.yaml")
        assert set(saved) == set(hparams) and saved["optim/name"] == "RMSprop"
    if "mlflow" in kinds:
        run, figures = mlflow_run(tmp_path, "outputs/run")  # named by its run directory
        assert run.data.params["optim/name"] == "RMSprop"
        assert set(run.data.params) == set(hparams)
        assert run.data.metrics["hparams/test_accuracy"] == pytest.approx(metrics["test_accuracy"])
        assert figures == {f"figures/{f}.png" for f in FIGURES}
    if "wandb" in kinds:
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        images = offline / "files" / "media" / "images"
        # W&B names an image KEY_STEP_HASH.png
        names = {str(p.relative_to(images)).rsplit("_", 2)[0] for p in images.rglob("*.png")}
        assert names == FIGURES


def test_the_hparams_are_the_recipe_not_the_plumbing(tmp_path):
    cfg = cfg_for(tmp_path, tmp_path, "experiment=best", "trainer.precision=32-true")
    hparams = recipe_hparams(cfg, resolve_precision(cfg))
    assert hparams["optim/name"] == "SGD" and hparams["scheduler/name"] == "one_cycle"
    assert hparams["batch_size"] == cfg.data.batch_size and hparams["precision"] == "32-true"
    assert hparams["model/dropout"] == cfg.model.dropout and hparams["seed"] == cfg.seed
    assert "fidelity/init" in hparams
    # the recipe's keys out of model: the loss, augmentation, test-time views and whitening
    assert hparams["loss/label_smoothing"] == 0.2 and hparams["augment/crop_pad"] == 4
    assert hparams["tta/shift"] == 1 and hparams["whiten/enabled"] is True
    assert not [
        k for k in hparams if k.startswith(("callbacks/", "trainer/", "data/", "speed/", "run_dir"))
    ]
    assert not [k for k in hparams if k.endswith(("_target_", "_partial_"))]
    # the precision the run trains at, as resolved, not the config's `auto`
    auto = cfg_for(tmp_path, tmp_path, "experiment=best")
    assert auto.trainer.precision == "auto"
    assert recipe_hparams(auto, "bf16-mixed")["precision"] == "bf16-mixed"


class Refusing:
    """A logger whose every call fails, as a logger with no image or table support might."""

    def log_hyperparams(self, *args, **kwargs):
        raise NotImplementedError("no hyperparameters here")

    log_metrics = log_hyperparams

    @property
    def experiment(self):
        raise AttributeError("'ExperimentWriter' object has no attribute 'add_figure'")


def test_a_logger_that_fails_warns_and_never_stops_the_run(caplog):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    log_figure([Refusing()], "training_curves", fig)  # not a known kind: nothing is sent
    log_hparams([Refusing()], {"optim/lr": 0.1}, {"test_accuracy": 0.5})
    assert "Refusing did not take the hyperparameters (NotImplementedError" in caplog.text
    plt.close(fig)


def test_a_missing_extra_names_it(tmp_path, monkeypatch):
    def no_package(node, key, **kwargs):
        raise UserError(f"{key}: no mlflow") from ModuleNotFoundError("No module named 'mlflow'")

    monkeypatch.setattr("cifar_lightning.loggers.instantiate", no_package)
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(tmp_path, tmp_path, "logger=mlflow")
    with pytest.raises(
        UserError,
        match=r"logger.mlflow: MLFlowLogger needs the mlflow extra: "
        r'pip install "cifar_lightning\[mlflow\]"',
    ):
        build_loggers(cfg)


def _create_store(launch_dir: str, barrier) -> None:
    import os

    os.chdir(launch_dir)
    from cifar_lightning.schema import compose

    node = compose(["logger=mlflow", f"run_dir={launch_dir}"]).logger.mlflow
    node = OmegaConf.merge(node, mlflow_locations(node))
    barrier.wait()  # both processes create the fresh store at the same moment
    prepare_mlflow(node)


@pytest.mark.slow
def test_parallel_jobs_create_one_mlflow_store_without_colliding(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    jobs = [ctx.Process(target=_create_store, args=(str(tmp_path), barrier)) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(120)
    assert [j.exitcode for j in jobs] == [0, 0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    names = [e.name for e in client.search_experiments()]
    assert names.count("cifar_lightning") == 1


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "text"])
def test_a_broken_mlflow_store_is_one_error_naming_it(tmp_path, damage):
    import os

    db = tmp_path / "outputs" / "mlflow.db"
    node = OmegaConf.create(
        {
            "tracking_uri": f"sqlite:///{db}",
            "experiment_name": "cifar_lightning",
            "artifact_location": (tmp_path / "outputs" / "mlflow").as_uri(),
        }
    )
    prepare_mlflow(node)  # a sound store
    prepare_mlflow(node)  # ...opened again
    whole = db.read_bytes()
    broken = {
        "truncated": whole[: len(whole) // 2],
        "random bytes": os.urandom(len(whole)),
        "text": b"runs: 3\nexperiment: cifar_lig",
    }[damage]
    db.write_bytes(broken)
    before = sorted(p.name for p in db.parent.iterdir())
    with pytest.raises(UserError, match=rf"^{db}: not a readable SQLite database \(") as exc:
        prepare_mlflow(node)
    assert str(exc.value).endswith(
        "so MLflow can't record this run in it; move the file aside (or delete it) to start a new "
        "store, without the runs it lists (their run directories keep their files), or log to "
        "another store: logger.mlflow.tracking_uri=sqlite:///NEW_PATH"
    )
    assert db.read_bytes() == broken and sorted(p.name for p in db.parent.iterdir()) == before


def test_a_broken_mlflow_store_ends_the_cli_in_one_error_line(tiny_layout, tmp_path):
    from tests.conftest import run_cli

    db = tmp_path / "outputs" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"SQLite format 3\0" + bytes(100))  # a header, and the rest cut off
    result = run_cli(
        "cifar_lightning.train", "logger=mlflow", f"data.root={tiny_layout}", *FAST, cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {db}: not a readable SQLite database (")
    assert db.read_bytes() == b"SQLite format 3\0" + bytes(100)
