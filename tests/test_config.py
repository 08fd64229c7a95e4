"""Every option of every config group composes and instantiates; the defaults are the notebook's."""

import re

import pytest
import torch
from omegaconf import OmegaConf

from cifar_lightning.build import resolve_precision
from cifar_lightning.config import CONF_DIR, check_values, compose
from cifar_lightning.errors import UserError
from cifar_lightning.loggers import build_loggers, logger_nodes
from cifar_lightning.model.optim import build_optimizer
from cifar_lightning.model.schedule import build_scheduler
from cifar_lightning.targets import check_override_targets, check_targets, instantiate
from tests.conftest import cfg_for

GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF_DIR.iterdir() if g.is_dir()
}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


def test_defaults_are_the_notebook_recipe(tmp_path):
    cfg = cfg_for(tmp_path, tmp_path)
    assert cfg.model.name == "s" and cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 30
    assert cfg.optim._target_.endswith("RMSprop") and cfg.optim.lr == 1e-3
    assert (cfg.optim.rho, cfg.optim.eps, cfg.optim.eps_inside_root) == (0.9, 1e-7, True)
    assert (cfg.scheduler.factor, cfg.scheduler.patience, cfg.scheduler.min_delta) == (0.1, 3, 1e-4)
    assert cfg.callbacks.early_stopping.patience == 6 and cfg.monitor == "val/loss"
    for key in ("checkpoint", "early_stopping"):
        assert cfg.callbacks[key].monitor == cfg.monitor
    assert cfg.data.train_dirs == ["train_1", "train_2", "train_3", "train_4"]
    assert cfg.trainer.precision == "32-true" and cfg.fidelity.batching == "per_directory"


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_instantiates(group, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logger=mlflow's store is outputs/mlflow.db in the launch folder
    cfg = cfg_for(tmp_path, tmp_path, f"{group}={option}")
    OmegaConf.resolve(cfg)
    check_targets(cfg)
    opt = build_optimizer(OmegaConf.to_container(cfg.optim), torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.Optimizer)
    if cfg.scheduler._target_:
        scheduler, interval = build_scheduler(
            OmegaConf.to_container(cfg.scheduler), opt, lambda: 100
        )
        assert interval in ("epoch", "step") and hasattr(scheduler, "step")
    for key, cb in cfg.callbacks.items():
        if cb is not None:
            assert instantiate(cb, f"callbacks.{key}") is not None
    loggers = build_loggers(cfg)  # every configured logger builds (each extra is installed)
    assert len(loggers) == len(logger_nodes(cfg))
    # CI has no GPU
    resolve_precision(cfg)  # trainer.precision=auto is resolved before a Trainer is built
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu", "devices": 1})
    trainer = instantiate(trainer_cfg, "trainer", logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_foreign_target_is_refused_not_run(tmp_path):
    cfg = cfg_for(tmp_path, tmp_path, "optim._target_=os.system")
    with pytest.raises(UserError, match=r"optim._target_=os.system is not an allowed target"):
        check_targets(cfg)


@pytest.mark.parametrize(
    "target",
    [
        "cifar_lightning.data.cache.os.system",  # an allowed module's import, reached through it
        "cifar_lightning.data.prepare.shutil.rmtree",
        "torch.optim.optimizer.torch.load",  # torch.load, outside torch.optim
        "lightning.pytorch.loggers.tensorboard.os.remove",
        "torch.load",  # outside every allowed prefix
        "lightning.fabric.utilities.cloud_io._load",
        "cifar_lightning.report.write_csv",  # project helpers that write any text to any path
        "cifar_lightning.report._atomic_write",
        "cifar_lightning.data.cache._atomic_save",
        "cifar_lightning.data.prepare.ensure_layout",
    ],
)
def test_target_that_resolves_outside_the_allowed_modules_is_refused(target, tmp_path):
    with pytest.raises(UserError, match=rf"optim._target_={target} is not an allowed target"):
        instantiate({"_target_": target, "path": str(tmp_path)}, "optim")  # instantiate checks, too
    assert tmp_path.is_dir()  # shutil.rmtree(path=tmp_path) did not run


def test_target_inside_a_list_is_checked():
    with pytest.raises(
        UserError, match=r"trainer.plugins.1._target_=os.system is not an allowed target"
    ):
        check_targets(
            {"trainer": {"plugins": [{"_target_": "torch.optim.SGD"}, {"_target_": "os.system"}]}}
        )
    with pytest.raises(UserError, match=r"_target_=os.system is not an allowed target"):
        check_override_targets(["+trainer.plugins=[{_target_:os.system}]"])


@pytest.mark.parametrize(
    "override",
    [
        "+hydra.callbacks.evil._target_=os.system",
        "hydra.callbacks.sweep_summary._target_=builtins.exec",
        "+hydra.callbacks.evil={_target_:os.system}",
        "optim._target_=torch.optim.Adam,os.system",
        "+hydra.callbacks.x={_target_:cifar_lightning.report.write_csv,path:x.sh,rows:[{a:1}],columns:[a]}",
    ],
)
def test_command_line_target_is_refused_before_hydra_builds_callbacks(override):
    with pytest.raises(
        UserError,
        match=r"_target_=(os.system|builtins.exec|cifar_lightning.report.write_csv) is not "
        r"an allowed target",
    ):
        check_override_targets(["-m", "seed=0", override])


def test_command_line_check_passes_allowed_targets_and_deletions():
    check_override_targets(
        [
            "-m",
            "optim=rmsprop,adam",
            "~hydra.callbacks.sweep_summary",
            "optim._target_=torch.optim.SGD",
        ]
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=abc", "data.batch_size=abc: must be a whole number >= 1"),
        ("data.batch_size=0", "data.batch_size=0: must be a whole number >= 1"),
        (
            "trainer.check_val_every_n_epoch=0",
            "trainer.check_val_every_n_epoch=0: must be a whole number >= 1",
        ),
        (
            "trainer.max_epochs=abc",
            "trainer.max_epochs=abc: must be -1 (no limit) or a whole number >= 1",
        ),
        # the key typed, not model.init
        ("fidelity.init=bogus", "fidelity.init=bogus is not one of: glorot, torch"),
        ("optim.eps=abc", "optim.eps=abc: must be a number"),
        ("fidelity.rmsprop_eps=abc", "fidelity.rmsprop_eps=abc: must be a number"),
        ("scheduler.factor=x", "scheduler.factor=x: must be a number"),
        (
            "trainer.max_epochs=0",
            "trainer.max_epochs=0: must be -1 (no limit) or a whole number >= 1",
        ),
        ("model.dropout=abc", "model.dropout=abc: must be a number in [0, 1)"),
        ("model.dropout=1.5", "model.dropout=1.5: must be a number in [0, 1)"),
        ("model.hidden=abc", "model.hidden=abc: must be a whole number >= 1"),
        (
            "model.widths=abc",
            "model.widths=abc: must be a list like [32,64,128]; "
            "each item must be a whole number >= 1",
        ),
        (
            "model.widths=[32,0,128]",
            "model.widths=[32, 0, 128]: must be a list like [32,64,128]; "
            "each item must be a whole number >= 1",
        ),
        # the key typed, not model.bn_eps
        ("fidelity.bn_eps=abc", "fidelity.bn_eps=abc: must be a number > 0"),
        ("model.l2=-1", "model.l2=-1: must be a number >= 0"),
        ("model.label_smoothing=abc", "model.label_smoothing=abc: must be a number in [0, 1)"),
        (
            "model.augment=abc",
            "model.augment=abc: must be null or {flip: true|false, rotation_deg: N, zoom: N, "
            "translate: N, crop_pad: PIXELS, cutout: PIXELS} with numbers >= 0",
        ),
        (
            "model.augment={flip:true,shear:3}",
            "model.augment={'flip': True, 'shear': 3}: must be null or {flip: "
            "true|false, rotation_deg: N, zoom: N, translate: N, crop_pad: PIXELS, cutout: PIXELS} "
            "with numbers >= 0",
        ),
        (  # whole pixels: a crop by 1.5 pixels would interpolate
            "model.augment={flip:true,crop_pad:1.5}",
            "model.augment={'flip': True, 'crop_pad': 1.5}: must be null or {flip: "
            "true|false, rotation_deg: N, zoom: N, translate: N, crop_pad: PIXELS, cutout: PIXELS} "
            "with numbers >= 0",
        ),
        ("model.tta_shift=-1", "model.tta_shift=-1: must be a whole number >= 0"),
        ("model.whiten=yes", "model.whiten=yes: must be true or false"),
        ("optim=sgd optim.norm_bias_decay=no", "optim.norm_bias_decay=no: must be true or false"),
        (
            "scheduler=onecycle scheduler.anneal_strategy=step",
            "scheduler.anneal_strategy=step is not one of: cos, linear",
        ),
        # Any string is truthy: `test=no` would run the test phase, `data.skip_bad_files=no` skip
        # files.
        ("test=no", "test=no: must be true or false"),
        ("data.skip_bad_files=no", "data.skip_bad_files=no: must be true or false"),
        ("data.cache=off", "data.cache=off: must be true or false"),
        ("model.compile=yes", "model.compile=yes: must be true or false"),
        (
            "data.train_dirs=abc",
            "data.train_dirs=abc: must be a list like [train_1,train_2]; "
            "each item must be a folder name",
        ),
        ("monitor=val/accc", "monitor=val/accc is not one of: val/loss, val/acc"),
        ("monitor_mode=bogus", "monitor_mode=bogus is not one of: min, max"),
        ("monitor=val/acc", "monitor_mode=min would keep the worst val/acc; use monitor_mode=max"),
        (
            "monitor_mode=max",
            "monitor_mode=max would keep the worst val/loss; use monitor_mode=min",
        ),
        ("trainer.deterministic=no", "trainer.deterministic=no: must be true, false or warn"),
        (
            "callbacks.early_stopping.min_delta=abc",
            "callbacks.early_stopping.min_delta=abc: must be a number >= 0",
        ),
        (
            "callbacks.early_stopping.check_finite=no",
            "callbacks.early_stopping.check_finite=no: must be true or false",
        ),
        (
            "callbacks.progress_bar.refresh_rate=abc",
            "callbacks.progress_bar.refresh_rate=abc: must be a whole number >= 0",
        ),
        ("data.eval_batch_size=0", "data.eval_batch_size=0: must be auto or a whole number >= 1"),
        ("model.cuda_graph=yes", "model.cuda_graph=yes: must be true or false"),
        ("trainer.profiler=fast", "trainer.profiler=fast is not one of: simple, advanced, pytorch"),
        (
            "+trainer.accumulate_grad_batches=2",
            "trainer.accumulate_grad_batches=2 is not supported: the Classifier steps "
            "its optimizer itself (Lightning's manual optimization); use a larger data.batch_size",
        ),
        (
            "+trainer.gradient_clip_val=1.0",
            "trainer.gradient_clip_val=1.0 is not supported: the Classifier steps its "
            "optimizer itself (Lightning's manual optimization); use model.grad_clip=MAX_NORM "
            "instead",
        ),
        (
            "+trainer.gradient_clip_algorithm=value",
            "trainer.gradient_clip_algorithm=value is not supported: the Classifier steps its "
            "optimizer itself (Lightning's manual optimization); use "
            "model.grad_clip_algorithm=norm|value instead",
        ),
        ("model.grad_clip=0", "model.grad_clip=0: must be a number > 0"),
        ("model.grad_clip=abc", "model.grad_clip=abc: must be a number > 0"),
        ("model.grad_clip_algorithm=l2", "model.grad_clip_algorithm=l2 is not one of: norm, value"),
    ],
)
def test_a_value_of_the_wrong_kind_is_named_before_anything_runs(override, message, tmp_path):
    from cifar_lightning.train import train

    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        # before the data is even looked at
        train(cfg_for(tmp_path / "run", tmp_path / "no_data", *override.split(" ")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_passes_the_value_check(group, option, tmp_path):
    check_values(cfg_for(tmp_path, tmp_path, f"{group}={option}"))


@pytest.mark.parametrize(
    "entry,override,message",
    [
        ("evaluate", "batch_size=0", "batch_size=0: must be a whole number >= 1"),
        ("evaluate", "device=tpu", "device=tpu is not one of: auto, cpu, cuda"),
        ("evaluate", "resize=bogus", "resize=bogus is not one of: tf_bilinear, pil_bilinear"),
        ("predict", "top_k=0", "top_k=0: must be a whole number >= 1"),
        ("predict", "top_k=abc", "top_k=abc: must be a whole number >= 1"),
        ("predict", "batch_size=abc", "batch_size=abc: must be a whole number >= 1"),
        ("bench", "rounds=abc", "rounds=abc: must be a whole number >= 1"),
        ("bench", "max_steps=0", "max_steps=0: must be a whole number >= 1"),
        (
            "bench",
            "batch_sizes=[0]",
            "batch_sizes=[0]: must be a list like [64,256]; each item must be a whole number >= 1",
        ),
        (
            "bench",
            "pipelines=[a,d]",
            "pipelines=['a', 'd']: must be a list like [a,b,c,k]; each item must be one of: a, b, "
            "c, k",
        ),
        (
            "bench",
            "fractions=[0]",
            "fractions=[0]: must be a list like [0.25,0.5,1.0]; "
            "each item must be a number in (0, 1]",
        ),
        (
            "bench",
            "compile_c=[no]",
            "compile_c=['no']: must be a list like [false,true]; each item must be true or false",
        ),
        (
            "bench",
            "cuda_graph_c=[no]",
            "cuda_graph_c=['no']: must be a list like [false,true]; "
            "each item must be true or false",
        ),
        (
            "bench",
            "trainer.profiler=simple",
            "trainer.profiler=simple is not for the benchmark, where it would slow (c) "
            "alone; profile with python -m cifar_lightning.train trainer.profiler=...",
        ),
    ],
)
def test_evaluate_predict_and_bench_check_their_own_values_first(
    entry, override, message, tmp_path
):
    from cifar_lightning.bench import bench
    from cifar_lightning.evaluate import evaluate
    from cifar_lightning.predict import predict

    run = {"evaluate": evaluate, "predict": predict, "bench": bench}[entry]
    given = {
        "evaluate": ["ckpt_path=no.ckpt", "eval_dir=none"],
        "predict": ["ckpt_path=no.ckpt", "inputs=none"],
        "bench": [f"data.root={tmp_path / 'no_data'}"],
    }[entry]
    cfg = compose([f"run_dir={tmp_path / 'run'}", *given, override], config_name=entry)
    # before the missing checkpoint or data
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_a_gpu_is_one_error_line(monkeypatch):
    from cifar_lightning.inference import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^device=cuda: no CUDA GPU is usable here"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.tta_shift=32"],
            "model.tta_shift=32: must be below data.image_size=32 (reflect padding)",
        ),
        (
            ["data.image_size=16", "model.augment={flip:true,crop_pad:16}"],
            "model.augment.crop_pad=16: must be below data.image_size=16 (reflect padding)",
        ),
        (
            ["model.whiten=true", "model.widths=[33,64,128]"],
            "model.widths=[33, 64, 128]: with model.whiten=true the first width must be even and "
            "at most 54 (half its filters are the top directions of the 27 values of a 3x3 RGB "
            "patch, half their negatives)",
        ),
        (
            ["model.whiten=true", "model.widths=[56,64,128]"],
            "model.widths=[56, 64, 128]: with model.whiten=true the first width must be even and "
            "at most 54 (half its filters are the top directions of the 27 values of a 3x3 RGB "
            "patch, half their negatives)",
        ),
    ],
)
def test_values_that_must_fit_another_key_are_named_before_anything_runs(
    overrides, message, tmp_path
):
    from cifar_lightning.train import train

    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        train(cfg_for(tmp_path / "run", tmp_path / "no_data", *overrides))
    assert not (tmp_path / "run").exists()


def test_the_largest_values_that_fit_pass(tmp_path):
    check_values(cfg_for(tmp_path, tmp_path, "model.tta_shift=31", "model.augment={crop_pad:31}"))
    check_values(cfg_for(tmp_path, tmp_path, "model.whiten=true", "model.widths=[54,64,128]"))
    check_values(cfg_for(tmp_path, tmp_path, "model.whiten=false", "model.widths=[33,64,128]"))
    check_values(cfg_for(tmp_path, tmp_path, "experiment=fast"))  # whiten, crop_pad 2, shift 1


@pytest.mark.parametrize("width, fits", [(54, True), (56, False), (2, True), (33, False)])
def test_the_whiten_check_is_the_constraint_whitening_has(width, fits, tmp_path):
    from torch import nn

    from cifar_lightning.model.init import whiten_first_conv

    cfg = cfg_for(tmp_path, tmp_path, "model.whiten=true", f"model.widths=[{width},64,128]")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    conv = nn.Conv2d(3, width, 3, padding=1)
    if fits:
        check_values(cfg)
        whiten_first_conv(conv, images)
    else:
        with pytest.raises(UserError, match=r"^model\.widths="):
            check_values(cfg)
        with pytest.raises(ValueError, match="cannot whiten"):
            whiten_first_conv(conv, images)
