"""Every config file composes and passes schema.py's checks, and every option instantiates; the
defaults are the notebook's. A key or value that is wrong, on the command line or in a config
file, is one `error:` line that names its key, before anything runs."""

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_lightning.build import resolve_precision
from cifar_lightning.cli import check_override_keys
from cifar_lightning.errors import UserError, describe_config_error, one_line, user_facing_cause
from cifar_lightning.loggers import build_loggers, logger_nodes
from cifar_lightning.model.optim import build_optimizer
from cifar_lightning.model.schedule import build_scheduler
from cifar_lightning.schema import (
    CONF_DIR,
    MOVED_KEYS,
    Config,
    EvaluateConfig,
    ExportConfig,
    LRFindConfig,
    PredictConfig,
    check_config,
    compose,
)
from cifar_lightning.targets import check_override_targets, check_targets, instantiate
from tests.conftest import cfg_for

GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF_DIR.iterdir() if g.is_dir()
}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


def error_line(tmp_path, *overrides: str) -> str:
    """The line `cifar-train OVERRIDES` ends with, found where the command finds it: its check of
    the command line, then composition, then train's check of the config, which comes before
    anything is read or written."""
    from cifar_lightning.train import train

    with pytest.raises(Exception) as caught:
        check_override_keys(list(overrides))
        train(cfg_for(tmp_path / "run", tmp_path / "no_data", *overrides))
    assert user_facing_cause(caught.value) is caught.value  # the user's to fix, not a bug
    assert not (tmp_path / "run").exists()
    return one_line(caught.value)


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
    # model holds Model S's constructor keys only; what the notebook did not do is off
    assert set(cfg.model) == {
        "name",
        "widths",
        "hidden",
        "dropout",
        "num_classes",
        "init",
        "bn_momentum",
        "bn_eps",
    }
    assert (cfg.model.init, cfg.model.bn_momentum, cfg.model.bn_eps) == ("glorot", 0.01, 1e-3)
    assert (cfg.loss.label_smoothing, cfg.loss.l2) == (0, 0)
    augment_keys = {"flip", "rotation_deg", "zoom", "translate", "crop_pad", "cutout"}
    assert set(cfg.augment) == augment_keys | {"alternating_flip"}
    assert not any(cfg.augment.values())
    assert (cfg.tta.flip, cfg.tta.shift, cfg.whiten.enabled) == (False, 0, False)
    assert cfg.distill.teacher is None
    assert (cfg.speed.compile, cfg.speed.channels_last) == (False, True)
    assert cfg.trainer.accumulate_grad_batches == 1 and cfg.trainer.gradient_clip_val is None


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
    precision = resolve_precision(cfg)  # trainer.precision=auto is resolved before a Trainer
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu", "devices": 1})
    trainer = instantiate(
        trainer_cfg, "trainer", precision=precision, logger=False, enable_checkpointing=False
    )
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_passes_the_schemas_checks(group, option, tmp_path):
    checked = check_config(cfg_for(tmp_path, tmp_path, f"{group}={option}"))
    assert isinstance(checked, Config)


# The other entry points' configs, with the keys each requires.
ENTRY_CONFIGS = [
    ("lr_find", [], LRFindConfig),
    ("lr_find", ["experiment=next"], LRFindConfig),  # the training groups, through recipe.yaml
    ("evaluate", ["ckpt_path=x.ckpt", "eval_dir=x"], EvaluateConfig),
    ("predict", ["ckpt_path=x.ckpt", "inputs=x"], PredictConfig),
    ("predict", ["backend=onnxruntime", "onnx_path=x.onnx", "inputs=x"], PredictConfig),
    ("export", ["ckpt_path=x.ckpt"], ExportConfig),
]


@pytest.mark.parametrize("name,given,schema", ENTRY_CONFIGS)
def test_every_entry_points_config_composes_and_passes_its_schemas_checks(
    name, given, schema, tmp_path
):
    checked = check_config(compose([f"run_dir={tmp_path}", *given], config_name=name))
    assert type(checked) is schema


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
        "cifar_lightning.report.files.write_csv",  # project helpers that write any text to any path
        "cifar_lightning.report.files.atomic_write",
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
        "+hydra.callbacks.x={_target_:cifar_lightning.report.files.write_csv,"
        "path:x.sh,rows:[{a:1}],columns:[a]}",
    ],
)
def test_command_line_target_is_refused_before_hydra_builds_callbacks(override):
    with pytest.raises(
        UserError,
        match=r"_target_=(os.system|builtins.exec|cifar_lightning.report.files.write_csv) is not "
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


def not_converted(key: str, value: str, kind: str, given: str = "str") -> str:
    """OmegaConf's refusal of a value that is not of the schema's type."""
    return f"{key}: Value '{value}' of type '{given}' could not be converted to {kind}"


WHOLE = "must be a whole number"
EPOCHS = "must be -1 (no limit) or a whole number >= 1"
CLIP = "must be a number > 0 (null: no clipping)"
WRONG = [
    (
        "augment.alternating_flip=true",
        "augment.alternating_flip=True: needs augment.flip=true (it changes how the flip is drawn)",
    ),
    ("tta.shift_along=rows", "tta.shift_along=rows: is not one of: diagonal, axes"),
    ("distill.temperature=0", "distill.temperature=0.0: must be > 0"),
    ("distill.weight=1.5", "distill.weight=1.5: must be in [0, 1]"),
    ("data.batch_size=abc", not_converted("data.batch_size", "abc", "Integer")),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.image_size=0", "data.image_size=0: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0: must be auto or a whole number >= 1"),
    ("data.eval_batch_size=abc", "data.eval_batch_size=abc: must be auto or a whole number >= 1"),
    (
        "data.train_dirs=abc",
        "data.train_dirs: Invalid value assigned: str is not a ListConfig, list or tuple.",
    ),
    (
        "data.train_dirs=[]",
        "data.train_dirs=[]: must be a list of folder names like [train_1,train_2]",
    ),
    ("trainer.check_val_every_n_epoch=0", f"trainer.check_val_every_n_epoch=0: {WHOLE} >= 1"),
    ("trainer.log_every_n_steps=0", f"trainer.log_every_n_steps=0: {WHOLE} >= 1"),
    ("trainer.max_epochs=abc", f"trainer.max_epochs=abc: {EPOCHS}"),
    ("trainer.max_epochs=0", f"trainer.max_epochs=0: {EPOCHS}"),
    ("trainer.deterministic=no", "trainer.deterministic=no: must be true, false or warn"),
    ("trainer.profiler=fast", "trainer.profiler=fast: is not one of: simple, advanced, pytorch"),
    (
        "+trainer.fast_dev_run=-1",
        "trainer.fast_dev_run=-1: must be true, false or a whole number of batches >= 0",
    ),
    (
        "trainer.limit_train_batches=1.5",
        "trainer.limit_train_batches=1.5: must be a whole number of batches >= 0 or a fraction "
        "in [0.0, 1.0]",
    ),
    (
        "+trainer.overfit_batches=abc",
        "trainer.overfit_batches=abc: must be a whole number of batches >= 0 or a fraction "
        "in [0.0, 1.0]",
    ),
    ("trainer.accumulate_grad_batches=0", f"trainer.accumulate_grad_batches=0: {WHOLE} >= 1"),
    # Lightning would skip a clip value <= 0 without a word
    ("trainer.gradient_clip_val=0", f"trainer.gradient_clip_val=0: {CLIP}"),
    ("trainer.gradient_clip_val=abc", f"trainer.gradient_clip_val=abc: {CLIP}"),
    (
        "trainer.gradient_clip_algorithm=l2",
        "trainer.gradient_clip_algorithm=l2: is not one of: norm, value",
    ),
    ("callbacks.early_stopping.patience=-1", f"callbacks.early_stopping.patience=-1: {WHOLE} >= 0"),
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
        f"callbacks.progress_bar.refresh_rate=abc: {WHOLE} >= 0",
    ),
    # the key typed: fidelity's rules come before those of model, which takes its values
    ("fidelity.init=bogus", "fidelity.init=bogus: is not one of: glorot, torch"),
    ("fidelity.bn_eps=abc", not_converted("fidelity.bn_eps", "abc", "Float")),
    ("fidelity.rmsprop_eps=abc", not_converted("fidelity.rmsprop_eps", "abc", "Float")),
    ("fidelity.plateau=x", "fidelity.plateau=x: is not one of: keras, torch"),
    ("fidelity.batching=x", "fidelity.batching=x: is not one of: per_directory, random"),
    ("fidelity.resize=x", "fidelity.resize=x: is not one of: tf_bilinear, pil_bilinear"),
    ("model.init=x", "model.init=x: is not one of: glorot, torch"),
    ("model.dropout=abc", not_converted("model.dropout", "abc", "Float")),
    ("model.dropout=1.5", "model.dropout=1.5: must be a number in [0, 1)"),
    ("model.hidden=abc", not_converted("model.hidden", "abc", "Integer")),
    ("model.num_classes=0", "model.num_classes=0: must be >= 1"),
    ("model.bn_momentum=1.5", "model.bn_momentum=1.5: must be in [0, 1]"),
    ("model.bn_eps=0", "model.bn_eps=0.0: must be > 0"),
    (
        "model.widths=abc",
        "model.widths: Invalid value assigned: str is not a ListConfig, list or tuple.",
    ),
    ("model.widths=[32,abc,128]", not_converted("model.widths[1]", "abc", "Integer")),
    (
        "model.widths=[32,0,128]",
        "model.widths=[32, 0, 128]: must be a list of whole numbers >= 1 like [32,64,128]",
    ),
    ("optim.eps=abc", not_converted("optim.eps", "abc", "Float")),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("optim.eps_inside_root=no", "optim.eps_inside_root=no: must be true or false"),
    ("optim=sgd optim.norm_bias_decay=no", "optim.norm_bias_decay=no: must be true or false"),
    ("scheduler.factor=x", not_converted("scheduler.factor", "x", "Float")),
    ("scheduler.patience=-1", "scheduler.patience=-1: must be >= 0"),
    ("scheduler.counting=x", "scheduler.counting=x: is not one of: keras, torch"),
    (
        "scheduler=onecycle scheduler.anneal_strategy=step",
        "scheduler.anneal_strategy=step: is not one of: cos, linear",
    ),
    ("loss.l2=-1", "loss.l2=-1.0: must be >= 0"),
    ("loss.label_smoothing=abc", not_converted("loss.label_smoothing", "abc", "Float")),
    ("augment.shear=3", "augment.shear: Key 'shear' not in 'AugmentConfig'"),
    # whole pixels: a crop by 1.5 pixels would interpolate
    ("augment.crop_pad=1.5", not_converted("augment.crop_pad", "1.5", "Integer", "float")),
    ("augment.zoom=-0.1", "augment.zoom=-0.1: must be >= 0"),
    ("augment.flip=no", "augment.flip=no: must be true or false"),
    ("tta.shift=-1", "tta.shift=-1: must be >= 0"),
    ("tta.flip=no", "tta.flip=no: must be true or false"),
    ("whiten.enabled=yes", "whiten.enabled=yes: must be true or false"),
    ("whiten.images=0", "whiten.images=0: must be >= 1"),
    ("speed.compile=yes", "speed.compile=yes: must be true or false"),
    ("speed.channels_last=no", "speed.channels_last=no: must be true or false"),
    (
        "speed.compile_mode=fast",
        "speed.compile_mode=fast: is not one of: default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs",
    ),
    # OmegaConf reads `no` as false: only true and false are taken for a switch, so that
    # `test=no` can't be mistaken for something else
    ("test=no", "test=no: must be true or false"),
    ("data.skip_bad_files=no", "data.skip_bad_files=no: must be true or false"),
    ("data.cache=off", "data.cache=off: must be true or false"),
    ("seed=-1", "seed=-1: must be >= 0"),
    ("sweep_objective=x", "sweep_objective=x: is not one of: best_val_acc, best_val_loss"),
    ("monitor=val/accc", "monitor=val/accc: is not one of: val/loss, val/acc"),
    ("monitor_mode=bogus", "monitor_mode=bogus: is not one of: min, max"),
    ("monitor=val/acc", "monitor_mode=min: would keep the worst val/acc; use monitor_mode=max"),
    ("monitor_mode=max", "monitor_mode=max: would keep the worst val/loss; use monitor_mode=min"),
    (
        "scheduler.mode=max",
        "scheduler.mode=max: must be monitor_mode=min: the plateau schedule follows val/loss",
    ),
]


@pytest.mark.parametrize("override,message", WRONG)
def test_a_value_of_the_wrong_kind_is_named_before_anything_runs(override, message, tmp_path):
    assert error_line(tmp_path, *override.split(" ")) == f"error: {message}"


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.foo=1", "model.foo: Key 'foo' not in 'ModelConfig'"),
        # `+` adds a key even to a typed node; the schema's check still refuses it
        ("+model.dropuot=0.3", "model.dropuot: Key 'dropuot' not in 'ModelConfig'"),
        ("++loss.smoothing=0.1", "loss.smoothing: Key 'smoothing' not in 'LossConfig'"),
        ("+seeed=1", "seeed: Key 'seeed' not in 'Config'"),
        ("optim=sgd +optim.rho=0.9", "optim.rho: Key 'rho' not in 'SGDConfig'"),
        ("optim.lr=abc", not_converted("optim.lr", "abc", "Float")),
    ],
)
def test_an_unknown_key_or_a_value_of_the_wrong_type_is_named(override, message, tmp_path):
    assert error_line(tmp_path, *override.split(" ")) == f"error: {message}"


def test_an_interpolated_value_of_the_wrong_type_is_refused_when_resolved(tmp_path):
    # the interpolation composes: its value is only known once resolved, by the schema's check
    cfg = cfg_for(tmp_path / "run", tmp_path, "model.bn_eps=${data.root}")
    with pytest.raises(UserError) as caught:
        check_config(cfg)
    assert one_line(caught.value) == (
        "error: model.bn_eps: While dereferencing interpolation '${data.root}': "
        f"Value '{tmp_path}' of type 'str' could not be converted to Float"
    )
    assert error_line(tmp_path, "model.hidden=${data.eval_batch_size}") == (
        "error: model.hidden: While dereferencing interpolation '${data.eval_batch_size}': "
        "Value 'auto' of type 'str' could not be converted to Integer"
    )


def test_lightnings_accumulation_and_clipping_reach_the_trainer(tmp_path):
    cfg = cfg_for(
        tmp_path,
        tmp_path,
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=1.0",
        "trainer.gradient_clip_algorithm=value",
    )
    check_config(cfg)
    trainer = instantiate(cfg.trainer, "trainer", logger=False, enable_checkpointing=False)
    assert trainer.accumulate_grad_batches == 2 and trainer.gradient_clip_val == 1.0
    assert trainer.gradient_clip_algorithm == "value"


@pytest.mark.parametrize(
    "argv",
    [
        ["test=no"],
        ["+test=no"],
        ["test=0"],
        ["optim=sgd", "optim.nesterov=off"],  # a key of the option chosen, untyped in Config
        ["scheduler=onecycle", "scheduler.cycle_momentum=yes"],
        ["-m", "test=true,no"],  # each job of a sweep
        ["-m", "data.cache=choice(true,0)"],
    ],
    ids=" ".join,
)
def test_a_switch_on_the_command_line_takes_only_true_or_false(argv):
    with pytest.raises(UserError, match=r"^[a-z_.]+=(no|0|off|yes): must be true or false$"):
        check_override_keys(argv)


def test_true_and_false_pass_the_command_lines_check(tmp_path):
    check_override_keys(["test=false", "data.cache=true", "optim.eps_inside_root=false"])
    check_override_keys(["-m", "test=true,false", "seed=range(0,3)", "optim.lr=interval(0.1,1)"])
    assert cfg_for(tmp_path, tmp_path, "test=false").test is False


# Where each key out of `model` went (the release notes' table), checked against MOVED_KEYS.
MOVES = {
    "model.label_smoothing": "loss.label_smoothing",
    "model.l2": "loss.l2",
    "model.augment": "augment",
    "model.tta_flip": "tta.flip",
    "model.tta_shift": "tta.shift",
    "model.whiten": "whiten.enabled",
    "model.whiten_images": "whiten.images",
    "model.channels_last": "speed.channels_last",
    "model.compile": "speed.compile",
    "model.compile_mode": "speed.compile_mode",
    "model.grad_clip": "trainer.gradient_clip_val",
    "model.grad_clip_algorithm": "trainer.gradient_clip_algorithm",
    "model.cuda_graph": "speed.compile",
}


def test_every_moved_key_is_listed():
    assert set(MOVED_KEYS) == set(MOVES)


@pytest.mark.parametrize("old,new", sorted(MOVES.items()))
def test_a_moved_keys_old_spelling_gives_its_new_one(old, new, tmp_path):
    with pytest.raises(UserError) as caught:
        check_override_keys([f"{old}=1"])
    assert str(caught.value) == f"{old} has moved: use {MOVED_KEYS[old]}"
    assert MOVED_KEYS[old].split()[0].split("=")[0] == new
    cfg = cfg_for(tmp_path, tmp_path)
    assert OmegaConf.select(cfg, new, default="absent") != "absent"  # a key of the config
    with pytest.raises(HydraException) as caught:
        cfg_for(tmp_path, tmp_path, f"{old}=1")  # without the command line's check
    leaf = old.split(".")[1]
    assert one_line(caught.value) == f"error: {old}: Key '{leaf}' not in 'ModelConfig'"


@pytest.mark.parametrize(
    "override,key",
    [
        ("+model.augment.flip=true", "model.augment.flip"),  # a key inside a moved node
        ("~model.l2", "model.l2"),
        ("++model.cuda_graph=true", "model.cuda_graph"),
    ],
)
def test_a_moved_key_is_named_however_it_is_spelled(override, key):
    with pytest.raises(UserError, match=rf"^{key} has moved: use "):
        check_override_keys([override])


@pytest.mark.parametrize(
    "body,message",
    [
        ("model:\n  dropuot: 0.3\n", "model.dropuot: Key 'dropuot' not in 'ModelConfig'"),
        ("seeed: 1\n", "seeed: Key 'seeed' not in 'Config'"),
        (
            "model:\n  hidden: many\n",
            "model.hidden: Value 'many' of type 'str' could not be converted to Integer",
        ),
    ],
)
def test_a_bad_key_in_a_config_file_is_named_with_its_file(body, message, tmp_path):
    # a config directory of the user's own, on Hydra's search path as --config-dir puts it
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(f"# @package _global_\n{body}")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    with pytest.raises(HydraException) as caught:
        compose([searchpath, "experiment=mine"])
    assert one_line(caught.value) == f"error: in 'experiment/mine': {message}"
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nmodel:\n  hidden: 8\n")
    assert compose([searchpath, "experiment=mine"]).model.hidden == 8  # the file is found


def test_a_composition_errors_cause_is_one_line():
    with pytest.raises(HydraException) as caught:
        compose(["model.foo=1"])
    cause = caught.value.__cause__
    # OmegaConf's own message is several lines (full_key, reference_type, object_type)
    assert isinstance(cause, OmegaConfBaseException) and "\n" in str(cause)
    assert describe_config_error(caught.value) == "model.foo: Key 'foo' not in 'ModelConfig'"
    assert one_line(caught.value) == "error: model.foo: Key 'foo' not in 'ModelConfig'"
    assert describe_config_error(ValueError("not a config error")) is None
    assert one_line(UserError("a\n  b")) == "error: a b"


ENTRY_GIVEN = {
    "evaluate": ["ckpt_path=no.ckpt", "eval_dir=none"],
    "predict": ["ckpt_path=no.ckpt", "inputs=none"],
    "export": ["ckpt_path=no.ckpt"],
    "lr_find": [],
}


@pytest.mark.parametrize(
    "entry,override,message",
    [
        ("evaluate", "batch_size=0", "batch_size=0: must be >= 1"),
        ("evaluate", "device=tpu", "device=tpu: is not one of: auto, cpu, cuda"),
        ("evaluate", "resize=bogus", "resize=bogus: is not one of: tf_bilinear, pil_bilinear"),
        ("evaluate", "+resise=pil_bilinear", "resise: Key 'resise' not in 'EvaluateConfig'"),
        ("predict", "top_k=0", "top_k=0: must be >= 1"),
        ("predict", "top_k=abc", not_converted("top_k", "abc", "Integer")),
        ("predict", "batch_size=abc", not_converted("batch_size", "abc", "Integer")),
        ("predict", "backend=tf", "backend=tf: is not one of: torch, onnxruntime"),
        ("export", "format=zip", "format=zip: is not one of: onnx, torch_export"),
        ("export", "opset=17", "opset=17: must be >= 18"),
        ("lr_find", "min_lr=0", "min_lr=0.0: must be > 0"),
        ("lr_find", "max_lr=1e-7", "max_lr=1e-07: must be above min_lr=1e-06"),
        ("lr_find", "num_training=1", "num_training=1: must be >= 2"),
        ("lr_find", "mode=cubic", "mode=cubic: is not one of: exponential, linear"),
        ("lr_find", "early_stop_threshold=1", "early_stop_threshold=1.0: must be > 1"),
        ("lr_find", "model.dropout=1.5", "model.dropout=1.5: must be a number in [0, 1)"),
    ],
)
def test_the_other_entry_points_check_their_own_values_first(entry, override, message, tmp_path):
    from cifar_lightning.evaluate import evaluate
    from cifar_lightning.export import export
    from cifar_lightning.lr_find import lr_find
    from cifar_lightning.predict import predict

    run = {"evaluate": evaluate, "predict": predict, "export": export, "lr_find": lr_find}[entry]
    overrides = [f"run_dir={tmp_path / 'run'}", *ENTRY_GIVEN[entry], override]
    if entry == "lr_find":
        overrides.append(f"data.root={tmp_path / 'no_data'}")
    # before the missing checkpoint or data
    with pytest.raises(Exception) as caught:
        run(compose(overrides, config_name=entry))
    assert user_facing_cause(caught.value) is caught.value
    assert one_line(caught.value) == f"error: {message}"
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
        (["tta.shift=32"], "tta.shift=32: must be below data.image_size=32 (reflect padding)"),
        (
            ["data.image_size=16", "augment.crop_pad=16"],
            "augment.crop_pad=16: must be below data.image_size=16 (reflect padding)",
        ),
        (
            ["whiten.enabled=true", "model.widths=[33,64,128]"],
            "model.widths=[33, 64, 128]: with whiten.enabled=true the first width must be even "
            "and at most 54 (half its filters are the top directions of the 27 values of a 3x3 "
            "RGB patch, half their negatives)",
        ),
        (
            ["whiten.enabled=true", "model.widths=[56,64,128]"],
            "model.widths=[56, 64, 128]: with whiten.enabled=true the first width must be even "
            "and at most 54 (half its filters are the top directions of the 27 values of a 3x3 "
            "RGB patch, half their negatives)",
        ),
    ],
)
def test_values_that_must_fit_another_key_are_named_before_anything_runs(
    overrides, message, tmp_path
):
    assert error_line(tmp_path, *overrides) == f"error: {message}"


def test_the_largest_values_that_fit_pass(tmp_path):
    check_config(cfg_for(tmp_path, tmp_path, "tta.shift=31", "augment.crop_pad=31"))
    check_config(cfg_for(tmp_path, tmp_path, "whiten.enabled=true", "model.widths=[54,64,128]"))
    check_config(cfg_for(tmp_path, tmp_path, "whiten.enabled=false", "model.widths=[33,64,128]"))
    check_config(cfg_for(tmp_path, tmp_path, "experiment=fast"))  # whiten, crop_pad 2, shift 1


@pytest.mark.parametrize("width, fits", [(54, True), (56, False), (2, True), (33, False)])
def test_the_whiten_check_is_the_constraint_whitening_has(width, fits, tmp_path):
    from torch import nn

    from cifar_lightning.model.init import whiten_first_conv

    cfg = cfg_for(tmp_path, tmp_path, "whiten.enabled=true", f"model.widths=[{width},64,128]")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    conv = nn.Conv2d(3, width, 3, padding=1)
    if fits:
        check_config(cfg)
        whiten_first_conv(conv, images)
    else:
        with pytest.raises(UserError, match=r"^model\.widths="):
            check_config(cfg)
        with pytest.raises(ValueError, match="cannot whiten"):
            whiten_first_conv(conv, images)
