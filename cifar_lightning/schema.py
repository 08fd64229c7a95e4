"""Every key of the project's own config: its type and default, declared once, with the rules a
type can't state beside it.

Hydra's structured configs: each dataclass is stored in Hydra's ConfigStore (`register`) and the
YAML files under conf/ name it in their defaults list, so a key that is not declared here, or a
value of the wrong type, is refused while the config is composed. `check_config(cfg)` then builds
the dataclasses (OmegaConf.to_object), which runs each `__post_init__`: ranges, and rules between
keys. Lightning's `trainer`, `callbacks` and `logger` arguments stay Lightning's, untyped here;
Config checks the ones our configs set, since Lightning checks few of them before fit and a wrong
one would surface as a traceback from deep inside it.

A group's schemas are stored in a group of their own, `schema/<group>` (a YAML option names one
as `/schema/optim@_here_: rmsprop`): stored in the group itself they would be offered as its
options, and one named like a YAML file of the group would be merged into it by Hydra's
deprecated automatic matching. Choices
are text checked here, not Enums: checkpoints keep these values and load with weights_only=True,
which refuses Enum objects."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_lightning.data.folder import RESIZES
from cifar_lightning.data.sampler import BATCHINGS
from cifar_lightning.errors import UserError, describe_config_error
from cifar_lightning.exported import FORMATS
from cifar_lightning.model.net import INITS, MODELS
from cifar_lightning.model.schedule import ANNEALS, COUNTINGS
from cifar_lightning.targets import check_targets

# The one metric and the direction that makes it better: val/acc kept at its lowest would be a
# silent mistake.
MONITOR_MODES = {"val/loss": "min", "val/acc": "max"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# values in a 3x3 RGB patch, what whiten decorrelates for Model S's first conv (model/init.py)
WHITEN_PATCH = 3 * 3 * 3
# The YAML files that name the schemas (the package cifar_lightning.conf, conf/ in the repository),
# for tests and tools that list a group's options.
CONF_DIR = Path(str(resources.files("cifar_lightning.conf")))
# build.PROFILERS' names: build imports Lightning, which the schema does not need
PROFILERS = ("simple", "advanced", "pytorch")
SHIFT_DIRECTIONS = ("diagonal", "axes")  # tta.shift_along


def require(ok: bool, key: str, value: Any, must: str) -> None:
    """Raise UserError `key=value: must` unless ok."""
    if not ok:
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise UserError(f"{key}={shown}: {must}")


def at_least(key: str, value: int | float, low: int | float) -> None:
    require(value >= low, key, value, f"must be >= {low}")


def one_of(key: str, value: str, options: tuple | list) -> None:
    require(value in options, key, value, f"is not one of: {', '.join(options)}")


def fraction(key: str, value: float) -> None:
    """A probability that leaves something: [0, 1)."""
    require(0 <= value < 1, key, value, "must be a number in [0, 1)")


# For Lightning's arguments, which are untyped here: OmegaConf converts nothing in them, so `abc`,
# `no` or 1.5 reach these rules as they were typed.
def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(key: str, value: Any, low: int) -> None:
    require(is_whole(value) and value >= low, key, value, f"must be a whole number >= {low}")


def flag(key: str, value: Any) -> None:
    require(isinstance(value, bool), key, value, "must be true or false")


@dataclass
class DataConfig:
    """The notebook's "Group Datasets" layout: root/{train_1..train_4,valid,test}/<class>/."""

    root: str = "data/cifar10"  # relative paths resolve against the launch directory
    # where to build `root` from when it lacks the layout: download (torchvision's CIFAR-10,
    # md5-checked), PATH/cifar-10-python.tar.gz (checksum-verified before anything is unpickled),
    # or PATH.tar.gz / PATH/ of image folders train/<class>/ and test/<class>/
    source: str = "download"
    train_dirs: List[str] = field(
        default_factory=lambda: ["train_1", "train_2", "train_3", "train_4"]
    )  # concatenated, as the notebook did
    val_dir: str = "valid"
    test_dir: str = "test"
    batch_size: int = 64  # images per training step
    # images per validation/test batch: auto = batch_size on a CPU (fastest there), 1024 on a GPU
    # (fewer launches); metrics are per-image means, so the size moves them by rounding only
    eval_batch_size: Any = "auto"
    image_size: int = 32  # pixels; every image is converted to RGB and resized to this
    cache: bool = True  # decode once into a uint8 tensor file beside the data
    num_workers: int = 0  # DataLoader workers for the per-file path (cache=false)
    skip_bad_files: bool = False  # true: skip unreadable images with a warning

    def __post_init__(self):
        at_least("data.batch_size", self.batch_size, 1)
        at_least("data.image_size", self.image_size, 1)
        at_least("data.num_workers", self.num_workers, 0)
        size = self.eval_batch_size
        require(
            size == "auto" or isinstance(size, int) and not isinstance(size, bool) and size >= 1,
            "data.eval_batch_size",
            size,
            "must be auto or a whole number >= 1",
        )
        require(
            len(self.train_dirs) > 0 and all(self.train_dirs),
            "data.train_dirs",
            self.train_dirs,
            "must be a list of folder names like [train_1,train_2]",
        )


@dataclass
class ModelConfig:
    """What Model S's constructor takes (model/net.py), and the teacher's (name=teacher, the same
    keys). init, bn_momentum and bn_eps come from the fidelity group (conf/model/s.yaml)."""

    name: str = "s"  # s (Model S) | teacher (distillation teacher, conf/model/teacher.yaml)
    widths: List[int] = field(default_factory=lambda: [32, 64, 128])  # filters per block
    hidden: int = 256  # units of Model S's first dense layer (the teacher has none: 0)
    dropout: float = 0.5  # probability of zeroing, before each dense layer
    num_classes: int = 10  # set to the number of class folders
    init: str = MISSING  # glorot (Keras) | torch (PyTorch's default)
    bn_momentum: float = MISSING  # PyTorch's momentum = 1 - Keras's
    bn_eps: float = MISSING

    def __post_init__(self):
        one_of("model.name", self.name, MODELS)
        require(
            len(self.widths) > 0 and all(w >= 1 for w in self.widths),
            "model.widths",
            self.widths,
            "must be a list of whole numbers >= 1 like [32,64,128]",
        )
        at_least("model.hidden", self.hidden, 1 if self.name == "s" else 0)
        fraction("model.dropout", self.dropout)
        at_least("model.num_classes", self.num_classes, 1)
        one_of("model.init", self.init, INITS)
        require(
            0 <= self.bn_momentum <= 1, "model.bn_momentum", self.bn_momentum, "must be in [0, 1]"
        )
        require(self.bn_eps > 0, "model.bn_eps", self.bn_eps, "must be > 0")


@dataclass
class LossConfig:
    """The training loss: Keras's sparse categorical cross-entropy, plus these."""

    label_smoothing: float = 0.0  # training loss only; 0 = the notebook's
    l2: float = 0.0  # Keras kernel_regularizer l2: loss += l2 * sum(kernel^2), conv + dense kernels

    def __post_init__(self):
        fraction("loss.label_smoothing", self.label_smoothing)
        at_least("loss.l2", self.l2, 0)


@dataclass
class AugmentConfig:
    """Training augmentation, batched on the device (model/augment.py); all off by default."""

    flip: bool = False  # mirror half the images: a random half of each batch, or see below
    # with flip: mirror a random half of the images in the first epoch, then alternate each
    # image's mirroring from epoch to epoch (airbench's alternating flip, arXiv:2404.00498), so
    # every two epochs see each image both ways; decided per image by the batch sampler
    alternating_flip: bool = False
    rotation_deg: float = 0.0  # random rotation up to +- this many degrees
    zoom: float = 0.0  # random zoom by up to +- this fraction
    translate: float = 0.0  # random fractional shift up to +- this fraction of the side
    crop_pad: int = 0  # pixels: whole-pixel random shifts up to this far each way
    cutout: int = 0  # pixels: the side of a zeroed square at a random place

    def __post_init__(self):
        for key in ("rotation_deg", "zoom", "translate", "crop_pad", "cutout"):
            at_least(f"augment.{key}", getattr(self, key), 0)
        require(
            self.flip or not self.alternating_flip,
            "augment.alternating_flip",
            True,
            "needs augment.flip=true (it changes how the flip is drawn)",
        )

    @property
    def active(self) -> bool:
        return any(getattr(self, k) for k in self.__dataclass_fields__)


@dataclass
class TestTimeConfig:
    """Test-time augmentation at validation and test: the mean probability over views."""

    flip: bool = False  # also the mirrored image
    shift: int = 0  # pixels: also each view moved this far (flip: 6 or 10 views)
    # diagonal: moved down-right and up-left (2 moves a view); axes: left, right, up and down
    # (4 moves a view)
    shift_along: str = "diagonal"

    def __post_init__(self):
        at_least("tta.shift", self.shift, 0)
        one_of("tta.shift_along", self.shift_along, SHIFT_DIRECTIONS)


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher checkpoint (experiment=teacher trains one). The loss
    is (1 - weight) x the label loss + weight x T^2 x KL(teacher || student) at temperature T,
    the teacher run in eval mode, without gradients, on the student's augmented batch."""

    teacher: Optional[str] = None  # PATH/TO/teacher.ckpt; null: no distillation
    temperature: float = 4.0  # T: softens both distributions
    weight: float = 0.5  # the distillation term's share of the loss

    def __post_init__(self):
        require(self.temperature > 0, "distill.temperature", self.temperature, "must be > 0")
        require(0 <= self.weight <= 1, "distill.weight", self.weight, "must be in [0, 1]")


@dataclass
class WhitenConfig:
    """Start Model S's first conv as a whitening of 3x3 patches (model/init.py); it trains on."""

    enabled: bool = False
    images: int = 5000  # training images it reads, evenly spaced over all train_dirs

    def __post_init__(self):
        at_least("whiten.images", self.images, 1)


@dataclass
class SpeedConfig:
    """How the network runs; none of these changes what it computes beyond float rounding."""

    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPU and GPU
    compile: bool = False  # torch.compile the network
    # default | reduce-overhead (CUDA graphs: one launch per graph, for launch-bound GPUs) |
    # max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"

    def __post_init__(self):
        one_of("speed.compile_mode", self.compile_mode, COMPILE_MODES)


@dataclass
class FidelityConfig:
    """Which library's defaults to reproduce, one key per aspect (docs/fidelity.md); these
    defaults are Keras 2.15's, conf/fidelity/torch.yaml PyTorch's."""

    init: str = "glorot"  # glorot_uniform kernels and zero biases
    bn_momentum: float = 0.01  # Keras momentum 0.99
    bn_eps: float = 1.0e-3
    rmsprop_rho: float = 0.9
    rmsprop_eps: float = 1.0e-7
    rmsprop_eps_inside_root: bool = True
    plateau: str = "keras"  # cut when wait >= patience, absolute min_delta
    # per_directory: each train dir shuffled and batched alone, batches shuffled (628 steps/epoch)
    batching: str = "per_directory"
    resize: str = "tf_bilinear"  # bilinear without antialiasing, as tf.image.resize

    def __post_init__(self):
        one_of("fidelity.init", self.init, INITS)
        one_of("fidelity.plateau", self.plateau, COUNTINGS)
        one_of("fidelity.batching", self.batching, BATCHINGS)
        one_of("fidelity.resize", self.resize, RESIZES)


@dataclass
class OptimConfig:
    """An optimizer (`_partial_`: the module passes the parameters)."""

    _target_: str = MISSING
    _partial_: bool = True
    lr: float = 1.0e-3  # learning rate
    weight_decay: float = 0.0  # added to the gradient (PyTorch style); Keras-style L2 is loss.l2
    # false: no weight decay on BatchNorm scales and shifts, nor on biases (ours, not torch's)
    norm_bias_decay: bool = True

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        at_least("optim.weight_decay", self.weight_decay, 0)


@dataclass
class RMSpropConfig(OptimConfig):
    """Keras's RMSprop, epsilon inside the square root (model/optim.py)."""

    _target_: str = "cifar_lightning.model.optim.RMSprop"
    rho: float = MISSING  # decay of the squared-gradient average (PyTorch's alpha)
    eps: float = MISSING
    eps_inside_root: bool = MISSING


@dataclass
class AdamConfig(OptimConfig):
    _target_: str = "torch.optim.Adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-7  # Keras's; PyTorch's default is 1e-8


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 1.0e-2
    momentum: float = 0.9
    nesterov: bool = True


@dataclass
class PlateauConfig:
    """Keras's ReduceLROnPlateau(monitor, factor, patience), in the notebook's terms."""

    _target_: str = "cifar_lightning.model.schedule.reduce_on_plateau"
    _partial_: bool = True
    # the monitor's; Config checks it, after monitor_mode, so a wrong monitor_mode is named as typed
    mode: str = MISSING
    factor: float = 0.1  # multiply the learning rate by this on a plateau
    patience: int = 3  # validations without improvement, counted as `counting` says
    min_delta: float = 1.0e-4  # absolute improvement that counts (Keras's min_delta)
    counting: str = MISSING  # keras: cut when wait >= patience | torch: when bad epochs > patience

    def __post_init__(self):
        require(0 < self.factor < 1, "scheduler.factor", self.factor, "must be in (0, 1)")
        at_least("scheduler.patience", self.patience, 0)
        at_least("scheduler.min_delta", self.min_delta, 0)
        one_of("scheduler.counting", self.counting, COUNTINGS)


@dataclass
class OneCycleConfig:
    """One-cycle: warm up to max_lr over pct_start of all steps, then decay; stepped per batch."""

    _target_: str = "cifar_lightning.model.schedule.one_cycle"
    _partial_: bool = True
    max_lr: float = 0.1  # peak learning rate
    pct_start: float = 0.25  # fraction of the steps spent warming up
    anneal_strategy: str = "cos"  # cos | linear: the shape of the warm-up and the decay
    cycle_momentum: bool = False  # true cycles momentum inversely (an optimizer with momentum)

    def __post_init__(self):
        require(self.max_lr > 0, "scheduler.max_lr", self.max_lr, "must be > 0")
        one_of("scheduler.anneal_strategy", self.anneal_strategy, ANNEALS)


SWEEP_OBJECTIVES = {"best_val_acc": "maximize", "best_val_loss": "minimize"}


@dataclass
class Config:
    """`cifar-train`'s config (conf/config.yaml): the groups, then the run's own keys."""

    data: DataConfig = MISSING
    # before model: its rules name fidelity's keys, which model's take their values from
    fidelity: FidelityConfig = MISSING
    model: ModelConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = MISSING
    tta: TestTimeConfig = field(default_factory=TestTimeConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    optim: Any = MISSING  # an OptimConfig, by conf/optim/
    scheduler: Any = MISSING  # a PlateauConfig or OneCycleConfig; `_target_: null` for none
    trainer: Any = MISSING  # Lightning's Trainer arguments (conf/trainer/)
    callbacks: Any = MISSING  # Lightning callbacks by name (conf/callbacks/)
    logger: Any = field(default_factory=dict)  # Lightning loggers by name (conf/logger/)

    run_dir: str = "${hydra:runtime.output_dir}"  # this run's directory: every artefact goes here
    seed: int = 42  # seeds torch, numpy, python and the batch sampler
    monitor: str = "val/loss"  # read by the checkpoint, early stopping and the plateau schedule
    monitor_mode: str = "min"
    test: bool = True  # false: skip the test phase (tuning must never look at the test split)
    sweep_objective: str = "best_val_acc"  # what train returns to a sweeper (metrics.json's key)
    # the direction a sweeper's study takes for each objective
    sweep_directions: Dict[str, str] = field(default_factory=lambda: dict(SWEEP_OBJECTIVES))
    resume: Optional[str] = None  # PATH to a .ckpt, or "last" (the newest last.ckpt under outputs/)
    # report.html in the run directory after the test phase (or after fit under test=false): one
    # self-contained page of the metrics, figures, mistakes and calibration; false: no page
    report: bool = True
    # with report: fit a temperature on the validation split (one more pass over it, on the test
    # views) and record it and the test ECE it gives in metrics.json; false skips that pass
    report_calibration: bool = True

    def __post_init__(self):
        at_least("seed", self.seed, 0)
        one_of("monitor", self.monitor, tuple(MONITOR_MODES))
        one_of("monitor_mode", self.monitor_mode, ("min", "max"))
        good = MONITOR_MODES[self.monitor]
        require(
            self.monitor_mode == good,
            "monitor_mode",
            self.monitor_mode,
            f"would keep the worst {self.monitor}; use monitor_mode={good}",
        )
        if isinstance(self.scheduler, PlateauConfig):
            require(
                self.scheduler.mode == self.monitor_mode,
                "scheduler.mode",
                self.scheduler.mode,
                f"must be monitor_mode={self.monitor_mode}: the plateau schedule follows "
                f"{self.monitor}",
            )
        one_of("sweep_objective", self.sweep_objective, tuple(SWEEP_OBJECTIVES))
        self._check_fits_data()
        self._check_trainer()
        self._check_callbacks()

    def _check_trainer(self) -> None:
        """The Trainer arguments conf/trainer/ and conf/debug/ set; null is Lightning's default."""
        trainer = self.trainer or {}
        epochs = trainer.get("max_epochs")
        if epochs is not None:
            require(
                is_whole(epochs) and (epochs == -1 or epochs >= 1),
                "trainer.max_epochs",
                epochs,
                "must be -1 (no limit) or a whole number >= 1",
            )
        for key in ("log_every_n_steps", "check_val_every_n_epoch", "accumulate_grad_batches"):
            if trainer.get(key) is not None:
                whole(f"trainer.{key}", trainer.get(key), 1)
        clip = trainer.get("gradient_clip_val")
        if clip is not None:  # Lightning skips a value <= 0 without a word
            require(
                is_number(clip) and clip > 0,
                "trainer.gradient_clip_val",
                clip,
                "must be a number > 0 (null: no clipping)",
            )
        if trainer.get("gradient_clip_algorithm") is not None:
            one_of(
                "trainer.gradient_clip_algorithm",
                trainer.get("gradient_clip_algorithm"),
                ("norm", "value"),
            )
        deterministic = trainer.get("deterministic")
        if deterministic is not None:
            require(
                isinstance(deterministic, bool) or deterministic == "warn",
                "trainer.deterministic",
                deterministic,
                "must be true, false or warn",
            )
        if trainer.get("profiler") is not None:
            one_of("trainer.profiler", trainer.get("profiler"), PROFILERS)
        fast = trainer.get("fast_dev_run")
        if fast is not None:
            require(
                isinstance(fast, bool) or is_whole(fast) and fast >= 0,
                "trainer.fast_dev_run",
                fast,
                "must be true, false or a whole number of batches >= 0",
            )
        # Lightning's rule: a count of batches (int) or a fraction of them (float)
        for key in (
            "overfit_batches",
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
        ):
            limit = trainer.get(key)
            if limit is not None:
                require(
                    is_whole(limit) and limit >= 0 or isinstance(limit, float) and 0 <= limit <= 1,
                    f"trainer.{key}",
                    limit,
                    "must be a whole number of batches >= 0 or a fraction in [0.0, 1.0]",
                )

    def _check_callbacks(self) -> None:
        """The arguments conf/callbacks/ sets; a callback set to null is off."""
        callbacks = self.callbacks or {}
        stopping = callbacks.get("early_stopping") or {}
        if stopping.get("patience") is not None:
            whole("callbacks.early_stopping.patience", stopping["patience"], 0)
        if stopping.get("min_delta") is not None:
            require(
                is_number(stopping["min_delta"]) and stopping["min_delta"] >= 0,
                "callbacks.early_stopping.min_delta",
                stopping["min_delta"],
                "must be a number >= 0",
            )
        if stopping.get("check_finite") is not None:
            flag("callbacks.early_stopping.check_finite", stopping["check_finite"])
        bar = callbacks.get("progress_bar") or {}
        if bar.get("refresh_rate") is not None:
            whole("callbacks.progress_bar.refresh_rate", bar["refresh_rate"], 0)

    def _check_fits_data(self) -> None:
        size = self.data.image_size
        # F.pad(mode="reflect") needs a pad smaller than the side
        for key, pixels in (
            ("augment.crop_pad", self.augment.crop_pad),
            ("tta.shift", self.tta.shift),
        ):
            require(
                pixels < size,
                key,
                pixels,
                f"must be below data.image_size={size} (reflect padding)",
            )
        first = self.model.widths[0]
        require(
            not self.whiten.enabled or (first % 2 == 0 and first <= 2 * WHITEN_PATCH),
            "model.widths",
            self.model.widths,
            f"with whiten.enabled=true the first width must be even and at most "
            f"{2 * WHITEN_PATCH} (half its filters are the top directions of the {WHITEN_PATCH} "
            "values of a 3x3 RGB patch, half their negatives)",
        )


@dataclass
class LRFindConfig(Config):
    """`cifar-lr-find`'s config: the training config and the range test's own keys."""

    min_lr: float = 1.0e-6  # the first step's learning rate
    max_lr: float = 1.0  # the last step's
    num_training: int = 100  # optimizer steps, one learning rate each
    mode: str = "exponential"  # exponential | linear: how the rate grows from step to step
    # stop once the smoothed loss exceeds this x its best so far; null: never
    early_stop_threshold: Optional[float] = 4.0

    def __post_init__(self):
        super().__post_init__()
        require(self.min_lr > 0, "min_lr", self.min_lr, "must be > 0")
        require(
            self.max_lr > self.min_lr, "max_lr", self.max_lr, f"must be above min_lr={self.min_lr}"
        )
        at_least("num_training", self.num_training, 2)
        one_of("mode", self.mode, ("exponential", "linear"))
        if self.early_stop_threshold is not None:
            require(
                self.early_stop_threshold > 1,
                "early_stop_threshold",
                self.early_stop_threshold,
                "must be > 1",
            )


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvaluateConfig:
    """`cifar-evaluate`'s config."""

    ckpt_path: str = MISSING  # a cifar_lightning .ckpt (loaded with weights_only=True)
    eval_dir: str = MISSING  # image folders named as the checkpoint's classes
    batch_size: int = 256  # images per forward pass
    device: str = "auto"  # auto | cpu | cuda
    resize: Optional[str] = None  # null: the checkpoint's own rule | tf_bilinear | pil_bilinear
    run_dir: str = "${hydra:runtime.output_dir}"

    def __post_init__(self):
        at_least("batch_size", self.batch_size, 1)
        one_of("device", self.device, DEVICES)
        if self.resize is not None:
            one_of("resize", self.resize, RESIZES)


@dataclass
class ReportConfig:
    """`cifar-report`'s config: rebuild report.html from the files of a run directory."""

    run_dir: str = MISSING  # a cifar-train run directory or a cifar-evaluate output


@dataclass
class PredictConfig(EvaluateConfig):
    """`cifar-predict`'s config."""

    ckpt_path: Optional[str] = None  # backend=torch: a cifar_lightning .ckpt
    eval_dir: Optional[str] = None  # not read: predict has no labels
    backend: str = "torch"  # torch: ckpt_path's checkpoint | onnxruntime: onnx_path's model
    onnx_path: Optional[str] = None  # backend=onnxruntime: a model.onnx from cifar-export
    inputs: str = MISSING  # an image file, a folder (searched recursively) or a glob
    top_k: int = 3  # classes listed per image

    def __post_init__(self):
        super().__post_init__()
        one_of("backend", self.backend, ("torch", "onnxruntime"))
        at_least("top_k", self.top_k, 1)


@dataclass
class ExportConfig:
    """`cifar-export`'s config."""

    ckpt_path: str = MISSING  # a cifar_lightning .ckpt (loaded with weights_only=True)
    format: str = "onnx"  # onnx (for onnxruntime) | torch_export (a torch.export program, .pt2)
    out: Optional[str] = None  # null: model.onnx or model.pt2 in the run directory
    opset: int = (
        18  # format=onnx: the ONNX operator set, 18 (the lowest torch.onnx writes) or above
    )
    run_dir: str = "${hydra:runtime.output_dir}"

    def __post_init__(self):
        one_of("format", self.format, tuple(FORMATS))
        at_least("opset", self.opset, 18)


GROUP_SCHEMAS = {
    "data": {"base": DataConfig},
    "model": {"base": ModelConfig},
    "augment": {"base": AugmentConfig},
    "fidelity": {"base": FidelityConfig},
    "optim": {"rmsprop": RMSpropConfig, "adam": AdamConfig, "sgd": SGDConfig},
    "scheduler": {
        "plateau": PlateauConfig,
        "onecycle": OneCycleConfig,
    },
}
CONFIG_SCHEMAS = {
    "config_schema": Config,
    "lr_find_schema": LRFindConfig,
    "evaluate_schema": EvaluateConfig,
    "report_schema": ReportConfig,
    "predict_schema": PredictConfig,
    "export_schema": ExportConfig,
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore, where conf/'s defaults lists find them."""
    store = ConfigStore.instance()
    for name, node in CONFIG_SCHEMAS.items():
        store.store(name=name, node=node)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)


def check_config(cfg: DictConfig) -> Any:
    """What every command checks first: each `_target_` against the allowlist, then every rule of
    the schema (each dataclass's __post_init__) on the resolved values. Returns the config as
    dataclasses. A value of the wrong type that only an interpolation revealed is one UserError
    naming its key."""
    check_targets(cfg)
    refuse_undeclared_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(describe_config_error(exc)) from exc


def refuse_undeclared_keys(node: DictConfig, path: str = "") -> None:
    """A key that a schema's node does not declare, in OmegaConf's words. Hydra's `+key=value`
    (and `++`) adds one even to a typed node, and OmegaConf.to_object would keep it silently:
    `+model.dropuot=0.3` would leave the dropout as it was."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        declared = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in declared:
                raise UserError(f"{path}{key}: Key '{key}' not in '{schema.__name__}'")
    for key, value in node.items_ex(resolve=False):
        if OmegaConf.is_dict(value) and not OmegaConf.is_missing(node, key) and value is not None:
            refuse_undeclared_keys(value, f"{path}{key}.")


# Keys that moved out of `model`, and where they went: the old spelling is one error line.
MOVED_KEYS = {
    "model.label_smoothing": "loss.label_smoothing",
    "model.l2": "loss.l2",
    "model.augment": "augment (e.g. augment.flip=true augment.crop_pad=4, or augment=keras)",
    "model.tta_flip": "tta.flip",
    "model.tta_shift": "tta.shift",
    "model.whiten": "whiten.enabled",
    "model.whiten_images": "whiten.images",
    "model.channels_last": "speed.channels_last",
    "model.compile": "speed.compile",
    "model.compile_mode": "speed.compile_mode",
    "model.grad_clip": "trainer.gradient_clip_val (Lightning's own clipping)",
    "model.grad_clip_algorithm": "trainer.gradient_clip_algorithm",
    "model.cuda_graph": "speed.compile=true speed.compile_mode=reduce-overhead (torch.compile's "
    "CUDA graphs)",
}


def refuse_moved_key(key: str) -> None:
    """One error line for an override of a key that moved, giving its new spelling."""
    key = key.lstrip("+~")
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            raise UserError(f"{key} has moved: use {new}")


def bool_field(key: str, schema: type = Config) -> bool:
    """Whether `key` (dotted) is a bool field of `schema`'s dataclasses. A group that `schema`
    leaves untyped (optim, scheduler: typed by the option chosen) counts each of its schemas."""
    classes = [schema]
    *parents, leaf = key.lstrip("+~").split(".")
    for name in parents:
        inner = []
        for cls in classes:
            hint = typing.get_type_hints(cls).get(name)
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                inner.append(hint)
            elif hint is Any and name in GROUP_SCHEMAS:
                inner.extend(GROUP_SCHEMAS[name].values())
        classes = inner
    return any(typing.get_type_hints(cls).get(leaf) is bool for cls in classes)


def refuse_loose_boolean(key: str, value: Any, schema: type = Config) -> None:
    """OmegaConf reads `no`, `off` or `0` as false: on the command line a typo such as `test=no`
    would then pass silently for a bool key, so only true and false are taken there."""
    if not isinstance(value, bool) and bool_field(key, schema):
        raise UserError(f"{key.lstrip('+~')}={value}: must be true or false")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config that `python -m cifar_lightning.train OVERRIDES` would run, for tests and
    notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("cifar_lightning.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [])


register()
