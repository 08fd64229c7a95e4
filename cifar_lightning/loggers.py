"""The run's Lightning loggers, built from the `logger` group, and what a run sends them beyond
the metrics Lightning logs itself: the recipe's hyperparameters and the PNG figures, each in the
form that logger takes. A logger we do not know gets the hyperparameters only; the figures are
files in the run directory whatever the logger."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.loggers import (
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from omegaconf import DictConfig, OmegaConf

from cifar_lightning.errors import UserError
from cifar_lightning.stores import check_sqlite
from cifar_lightning.targets import instantiate

log = logging.getLogger(__name__)

# the extra that brings each optional logger's package
EXTRAS = {"MLFlowLogger": "mlflow", "WandbLogger": "wandb"}
# the argument that names a run, for loggers whose run name is otherwise random or fixed
RUN_NAME_ARGS = {"MLFlowLogger": "run_name", "WandbLogger": "name"}
# what the recipe is made of; the rest of the config is plumbing (paths, callbacks, progress bar)
RECIPE_GROUPS = ("optim", "scheduler", "model", "loss", "augment", "tta", "whiten", "fidelity")


def recipe_hparams(cfg: DictConfig, precision: str) -> dict:
    """The knobs that tell runs apart, flat (`optim/lr`, `model/dropout`), for every logger's
    hyperparameter table: seed, the precision the run trains at, epochs, batch size and the
    recipe groups. A group's `_target_` shows as its class or function name (`optim/name: SGD`)."""
    out = {
        "seed": cfg.seed,
        "precision": precision,
        "max_epochs": cfg.trainer.max_epochs,
        "batch_size": cfg.data.batch_size,
        "monitor": cfg.monitor,
    }
    for group in RECIPE_GROUPS:
        node = OmegaConf.to_container(cfg[group], resolve=True) if group in cfg else {}
        for key, value in flatten(node or {}, f"{group}/").items():
            if key.endswith("/_partial_"):
                continue
            if key.endswith("/_target_"):
                key = key.replace("/_target_", "/name")
                value = str(value).rpartition(".")[2] if value else "none"
            out.setdefault(key, value)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of `a/b` keys; values other than numbers, text and booleans as
    text (lists, null)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def logger_nodes(cfg: DictConfig) -> dict:
    """`logger.NAME` nodes that build a logger (logger=none has none)."""
    return {k: v for k, v in (cfg.get("logger") or {}).items() if v and v.get("_target_")}


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Every configured logger. A missing optional package is one error line naming the extra,
    before training starts."""
    loggers = []
    for name, node in logger_nodes(cfg).items():
        kind = str(node._target_).rpartition(".")[2]
        extra = {}
        if kind in RUN_NAME_ARGS and node.get(RUN_NAME_ARGS[kind]) is None:
            extra[RUN_NAME_ARGS[kind]] = run_name(cfg.run_dir)
        if kind == "MLFlowLogger":
            # a relative store is the launch directory's, fixed now: MLflow caches stores by URI
            node = OmegaConf.merge(node, mlflow_locations(node))
            prepare_mlflow(node)
        try:
            loggers.append(instantiate(node, f"logger.{name}", **extra))
        except UserError as exc:
            if kind in EXTRAS and isinstance(exc.__cause__, ImportError):
                raise UserError(
                    f"logger.{name}: {kind} needs the {EXTRAS[kind]} extra: "
                    f'pip install "cifar_lightning[{EXTRAS[kind]}]"'
                ) from exc
            raise
    return loggers


def run_name(run_dir: str | Path) -> str:
    """A run's name in a tracker: its directory, relative to the launch directory when inside it
    (outputs/2026-01-02/10-11-12-345678, outputs/multirun/.../3)."""
    path = Path(run_dir).resolve()
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if cwd in path.parents else str(path)


def mlflow_locations(node: DictConfig) -> dict:
    """tracking_uri and artifact_location with a relative SQLite file or folder made absolute."""
    out = {}
    uri = str(node.get("tracking_uri") or "")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out["tracking_uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    location = node.get("artifact_location")
    if location is not None and "://" not in str(location):
        out["artifact_location"] = Path(str(location)).resolve().as_uri()
    return out


def prepare_mlflow(node: DictConfig) -> None:
    """Create the SQLite tracking store and the experiment under a file lock: jobs of a parallel
    sweep that create a fresh store at once otherwise fail (`table experiments already exists`),
    and two that both find no experiment both try to create it. A store that is not a database is
    one UserError naming it (stores.check_sqlite)."""
    uri = str(node.get("tracking_uri") or "")
    if not uri.startswith("sqlite:///"):
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return  # build_loggers names the extra
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        check_sqlite(
            db,
            "MLflow can't record this run in it",
            "move the file aside (or delete it) to start a new store, without the runs it lists "
            "(their run directories keep their files), or log to another store: "
            "logger.mlflow.tracking_uri=sqlite:///NEW_PATH",
        )
        client = MlflowClient(tracking_uri=uri)
        name = str(node.get("experiment_name") or "lightning_logs")
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=node.get("artifact_location"))


def log_hparams(loggers: list[Logger], hparams: dict, metrics: dict) -> None:
    """The recipe's hyperparameters, and the run's final figures as `hparams/<name>` metrics.
    TensorBoard's log_hyperparams takes the metrics (its HParams table); the others take
    hyperparameters only, so the metrics go to their log_metrics."""
    final = {
        f"hparams/{k}": v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    for logger in loggers:
        with _never_fails(logger, "hyperparameters"):
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(hparams, final)
            else:
                logger.log_hyperparams(hparams)
                logger.log_metrics(final)


def log_figure(loggers: list[Logger], name: str, fig) -> None:
    """A matplotlib figure to each logger that takes images: TensorBoard's add_figure, MLflow's
    log_figure (an artefact of the run), W&B's log_image. CSV and unknown loggers: none (the PNG
    is in the run directory)."""
    for logger in loggers:
        with _never_fails(logger, f"figure {name}"):
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(name, fig, close=False)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, fig, f"figures/{name}.png")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=name, images=[fig])


class _never_fails:
    """A logger that can't take something warns; the run and its files carry on."""

    def __init__(self, logger: Logger, what: str):
        self.logger, self.what = logger, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            text = " ".join(str(exc).split())[:200]
            log.warning(
                f"{type(self.logger).__name__} did not take the {self.what} "
                f"({type(exc).__name__}: {text}); the run's files are complete"
            )
            return True
        return False
