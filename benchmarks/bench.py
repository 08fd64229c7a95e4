"""Time one training epoch + validation four ways, on the same machine, data, network and
optimizer. It runs from a clone, against the installed package (not installed itself):

    python benchmarks/bench.py                                 # a, b, c, k; full epochs
    python benchmarks/bench.py pipelines=[a,c] max_steps=50    # quick: 50 training steps an epoch
    python benchmarks/bench.py rounds=5 max_steps=150          # a busy machine: 5 rounds' medians
    python benchmarks/bench.py pipelines=[a] batch_sizes=[64,256] fractions=[]
    python benchmarks/bench.py trainer=gpu                     # (c) at 32-true and bf16-mixed
    python benchmarks/bench.py pipelines=[c] compile_c=[false,true]   # does torch.compile pay off?

  a  plain PyTorch loop over the cached uint8 tensor (in GPU memory when there is a GPU): the limit
  b  a straightforward Lightning pipeline: ImageFolder + ToTensor + DataLoader(shuffle, workers)
  c  cifar_lightning's own, as train builds it (cifar_lightning.build): Classifier +
     CifarDataModule + Trainer with the configured callbacks (checkpoints, early stopping,
     progress bar, history) and logger, at each `precision` x `compile_c`
  k  the Keras notebook itself (keras_reference.py), in a subprocess with TensorFlow

The config is the training config (the package's groups, on conf/bench.yaml's search path) plus
the bench's own keys (BenchConfig), so data, model, optim, fidelity, trainer and experiment
overrides mean the same as in train. (a) and (b) train with plain cross-entropy: augment and
loss.* (off by default) apply to (c) alone. Every pipeline starts from the same seed and is warmed
up for `warmup_steps` (untimed); a compiled (c) for a whole untimed epoch, so the clock never
meets a batch shape it has not compiled (its val acc is then after two epochs). images/s is
training images / (train epoch + validation) seconds; "one-off s" is what the warm-up took beyond
its steps at the epoch's pace (torch.compile's compile time). Also timed: the cache (build and
load), and (a) against batch size and train-set fraction. data.root must hold the layout (or
data.source builds it, as in train). Prints tables; writes everything to
outputs/bench/<date>/<time>/bench.json."""

from __future__ import annotations

import copy
import gc
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, List, Optional

import hydra
import lightning as L
import torch
from bench_pipelines import (
    KERAS_POLICY,
    keras_epoch,
    keras_missing,
    pipeline_b,
    pipeline_c,
    plain_epoch,
    time_cache,
)
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cifar_lightning import cli
from cifar_lightning.build import build_datamodule
from cifar_lightning.data.datamodule import eval_batch_size
from cifar_lightning.errors import UserError
from cifar_lightning.private_api import cpu_has_native_bf16
from cifar_lightning.report.files import write_json
from cifar_lightning.schema import Config, at_least, check_config, require

CONF = Path(__file__).resolve().parent / "conf"


def _proc_status_MiB(key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since the last reset), from /proc/self/status (Linux)."""
    try:
        line = next(
            s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key + ":")
        )
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return float("nan")


# the baseline that memory growth is measured from
RSS_AFTER_IMPORTS_MiB = _proc_status_MiB("VmRSS")
# Importing torch already runs a child process; its peak is the floor of children_ru_maxrss_MiB.
CHILDREN_AFTER_IMPORTS_MiB = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---------------------------------------------------------------- memory
def reset_peaks() -> None:
    """Make the next memory() report this stage's peaks. Writing 5 to clear_refs resets the kernel's
    peak RSS (VmHWM and ru_maxrss); where that is not allowed, peaks are since the process started.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory() -> dict:
    m = {
        "peak_rss_MiB": _proc_status_MiB("VmHWM"),
        "rss_end_MiB": _proc_status_MiB("VmRSS"),
        "ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        # DataLoader workers (b) are child processes: the largest one that has exited, never reset
        "children_ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    m["peak_growth_MiB"] = m["peak_rss_MiB"] - RSS_AFTER_IMPORTS_MiB
    if torch.cuda.is_available():
        m["gpu_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return {k: round(v, 1) for k, v in m.items()}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- over rounds
def compile_payoff(timed: dict, epochs: int = 30) -> list[dict]:
    """For each compiled (c) with an eager (c) at its precision, from the runs of each round (paired
    by round, as the ratios are): the time saved per full epoch (median of the per-round
    differences, so a slow spell on a busy machine cancels), the one-off cost (the first round's:
    later rounds find the compiled kernels cached in this process; a negative value is noise and
    counts as 0), and after how many epochs compiling pays off (None: it never does)."""
    out = []
    for (pipeline, variant), runs in timed.items():
        eager = timed.get((pipeline, variant.removesuffix("+compile")))
        if pipeline != "c" or not variant.endswith("+compile") or not eager:
            continue
        saved_per_round = [
            e["full_epoch_s_est"] - r["full_epoch_s_est"] for e, r in zip(eager, runs)
        ]
        saved = statistics.median(saved_per_round)
        # warmup_steps=0 leaves eager with no warm-up to measure (None): its one-off is in its epoch
        one_off = max(0.0, runs[0]["one_off_s"] - (eager[0]["one_off_s"] or 0.0))
        out.append(
            {
                "precision": variant.split("+")[0],
                "one_off_s": round(one_off, 1),
                "saved_per_epoch_s": round(saved, 2),
                "saved_per_epoch_s_per_round": [round(x, 2) for x in saved_per_round],
                "pays_off_after_epochs": round(one_off / saved, 1) if saved > 0 else None,
                f"net_gain_{epochs}_epochs_s": round(epochs * saved - one_off, 1),
            }
        )
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median epoch time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["epoch_s"])[(len(runs) - 1) // 2]


# ---------------------------------------------------------------- report
def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (header, key, format spec); a missing value prints as '-'."""
    cells = [[h for h, _, _ in cols]] + [
        [("-" if r.get(k) is None else format(r[k], f)) for _, k, f in cols] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )


EPOCH_COLS = [
    ("images/s", "images_per_s", ",.0f"),
    ("epoch s", "epoch_s", ".2f"),
    ("train s", "train_s", ".2f"),
    ("val s", "val_s", ".2f"),
    ("steps", "steps", ""),
    ("full epoch s (est.)", "full_epoch_s_est", ".1f"),
    ("val acc", "val_acc", ".3f"),
    ("one-off s", "one_off_s", ".1f"),
]


def progress(label: str, r: dict) -> dict:
    """One line per timed epoch as it ends: a full benchmark runs for many minutes."""
    print(
        f"{label}: {r['images_per_s']:,.0f} images/s, epoch {r['epoch_s']:.1f} s "
        f"({r['train_steps']}/{r['full_train_steps']} steps)",
        flush=True,
    )
    return r


def with_steps(r: dict) -> dict:
    return {**r, "steps": f"{r['train_steps']}/{r['full_train_steps']}"}


def machine(device: torch.device) -> dict:
    try:
        cpu = next(
            s.split(":", 1)[1].strip()
            for s in Path("/proc/cpuinfo").read_text().splitlines()
            if s.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu}",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_native_bf16": cpu_has_native_bf16(),
    }


# ---------------------------------------------------------------- config
def each(key: str, items: Any, ok, like: str, must: str, empty_ok: bool = True) -> None:
    """Raise UserError `key=[...]: must be a list like LIKE; each item MUST` unless items is a list
    whose every item is ok (and, without empty_ok, there is one)."""
    require(
        isinstance(items, list) and (empty_ok or len(items) > 0) and all(ok(x) for x in items),
        key,
        items,
        f"must be a list like {like}; each item {must}",
    )


@dataclass
class BenchConfig(Config):
    """The bench's config (benchmarks/conf/bench.yaml): the training config and its own keys."""

    # a: plain loop on the cached tensor | b: ImageFolder+ToTensor+DataLoader Lightning |
    # c: cifar_lightning | k: the Keras notebook itself (the `keras` extra)
    pipelines: List[str] = field(default_factory=lambda: ["a", "b", "c", "k"])
    # (a)'s epoch time at each batch size and precision; [] skips
    batch_sizes: List[int] = field(default_factory=lambda: [64, 256, 512, 1024])
    # (a)'s epoch time on this fraction of each train dir, at data.batch_size; [] skips
    fractions: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    # time every pipeline this many times, interleaved (a,b,c,a,b,c...); report the medians
    rounds: int = 1
    # cap every timed epoch at this many training steps (validation cut in proportion); null: all
    max_steps: Optional[int] = None
    warmup_steps: int = 5  # untimed training + validation steps before each timed epoch
    # (a), (c) and (k) are timed at each; (b) at fp32. bf16 on a CPU only where it is native
    # (AMX-BF16, AVX512-BF16); else one line says why
    precision: List[str] = field(default_factory=lambda: ["32-true", "bf16-mixed"])
    # (k)'s Keras policies, each paired with the precision that matches
    keras: List[str] = field(default_factory=lambda: ["float32", "mixed_bfloat16"])
    keras_epochs: int = 3  # (k) runs whole epochs; the first is warm-up, the rest's median timed
    keras_python: Optional[str] = None  # the interpreter with TensorFlow; null: this one
    # (c) eager/torch.compile'd: null = as speed.compile; [false,true] times both (the payoff).
    # Checked in __post_init__, not typed List[bool]: OmegaConf would read a typo such as `no` as
    # false; nor Optional[List]: check_targets can't walk a list node that holds null.
    compile_c: Any = None
    threads: Optional[int] = None  # torch.set_num_threads; null = torch's default (one per core)

    def __post_init__(self):
        super().__post_init__()
        each(
            "pipelines",
            self.pipelines,
            lambda p: p in ("a", "b", "c", "k"),
            "[a,b,c,k]",
            "must be one of: a, b, c, k",
            empty_ok=False,
        )
        policies = tuple(KERAS_POLICY.values())
        each(
            "keras",
            self.keras,
            lambda p: p in policies,
            "[float32,mixed_bfloat16]",
            f"must be one of: {', '.join(policies)}",
        )
        each("batch_sizes", self.batch_sizes, lambda b: b >= 1, "[64,256]", "must be >= 1")
        each(
            "fractions",
            self.fractions,
            lambda f: 0 < f <= 1,
            "[0.25,0.5,1.0]",
            "must be a number in (0, 1]",
        )
        if self.compile_c is not None:
            each(
                "compile_c",
                self.compile_c,
                lambda c: isinstance(c, bool),
                "[false,true]",
                "must be true or false",
                empty_ok=False,
            )
        at_least("rounds", self.rounds, 1)
        at_least("warmup_steps", self.warmup_steps, 0)
        at_least("keras_epochs", self.keras_epochs, 2)
        for key in ("max_steps", "threads"):
            if getattr(self, key) is not None:
                at_least(key, getattr(self, key), 1)
        # (c) is the only pipeline whose Trainer comes from cfg.trainer
        profiler = self.trainer.get("profiler")
        if profiler:
            raise UserError(
                f"trainer.profiler={profiler} is not for the benchmark, where it would slow (c) "
                "alone; profile with python -m cifar_lightning.train trainer.profiler=..."
            )


# stored under a name of its own, as the package's schemas are (cifar_lightning.schema)
ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config that `python benchmarks/bench.py OVERRIDES` would run, for tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("bench", overrides=overrides or [])


# ---------------------------------------------------------------- main
def bench(cfg: DictConfig) -> dict:
    check_config(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = quiet_setup(cfg)
    bs = cfg.data.batch_size
    # None: called in-process
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    out = {
        "machine": machine(device),
        "overrides": overrides,
        "settings": {
            "pipelines": list(cfg.pipelines),
            "batch_size": bs,
            "max_steps": cfg.max_steps,
            "warmup_steps": cfg.warmup_steps,
            "data_root": str(cfg.data.root),
            "batching": cfg.fidelity.batching,
            "device": str(device),
            "eval_batch_size": eval_batch_size(cfg.data.eval_batch_size, bs, device),
        },
        "rss_after_imports_MiB": round(RSS_AFTER_IMPORTS_MiB, 1),
        "children_ru_maxrss_after_imports_MiB": round(CHILDREN_AFTER_IMPORTS_MiB, 1),
        "notes": [],
    }
    print(
        f"device {out['machine']['device']}  |  {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads  |  "
        f"batch {bs} (validation {out['settings']['eval_batch_size']})  |  "
        f"max_steps {cfg.max_steps}  |  warm-up {cfg.warmup_steps} steps"
    )
    dm, data = load_data(cfg, device, out)
    runners = make_runners(cfg, dm, data, device, out["notes"])
    timed = run_rounds(runners, cfg.rounds, device)
    rows = [
        {
            "pipeline": pl,
            "name": name,
            "variant": v,
            "precision": v.split("+")[0],
            **median_run(timed[pl, v]),
            "memory": max((r["memory"] for r in timed[pl, v]), key=lambda m: m["peak_rss_MiB"]),
            "rounds": [
                {k: r[k] for k in ("epoch_s", "images_per_s", "one_off_s")} for r in timed[pl, v]
            ],
        }
        for pl, v, name, _ in runners
    ]
    if any(pl == "a" for pl, _ in timed):
        out.update(scaling(cfg, data, device, timed))
    del data, runners  # the runners hold (a)'s tensors
    free(device)
    ratios, per_round = paired_ratios(rows, timed)
    out.update(
        compile_payoff=compile_payoff(timed),
        results=rows,
        ratios=ratios,
        ratios_per_round=per_round,
    )
    print_report(cfg, out, device)
    write_json(run_dir / "bench.json", out)
    print(f"bench.json in {run_dir}")
    return out


def quiet_setup(cfg: DictConfig) -> torch.device:
    """Threads, TF32 and log levels as train has them; returns the device every pipeline runs on."""
    torch.set_float32_matmul_precision("high")  # as train: TF32 where the GPU has it
    # on a busy machine fewer threads than cores avoids OpenMP spin-waiting on taken cores
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Lightning's per-Trainer banners and the "few workers"/"logging interval" hints would bury the
    # tables.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    use_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if use_gpu else "cpu")


def load_data(cfg: DictConfig, device: torch.device, out: dict) -> tuple:
    """Times the cache on a copy of one split (into out["cache"]), then sets up the real datamodule
    as train does. Returns (c)'s datamodule and what the other pipelines need: classes, the train
    dirs' sizes, the validation size and, when (a) runs, the cached tensors on `device`."""
    reset_peaks()
    dm = build_datamodule(cfg)
    dm.prepare_data()  # builds data.root from data.source if it lacks the layout (untimed)
    cache = out["cache"] = time_cache(cfg)
    cached = copy.deepcopy(cfg)
    cached.data.cache = True  # (a) needs the tensors even when (c) runs the per-file path
    base = build_datamodule(cached)
    had_cache = all(any(Path(cfg.data.root).glob(f".cache-{s}-*.pt")) for s in base.split_names)
    t0 = time.perf_counter()
    base.setup("fit")
    cache.update(
        setup_s=round(time.perf_counter() - t0, 3), setup_had_cache=had_cache, memory=memory()
    )
    print(
        f"cache: build {cache['split']} ({cache['images']:,} images) {cache['build_s']:.2f} s = "
        f"{cache['build_images_per_s']:,.0f} images/s; load {cache['load_s']:.3f} s; "
        f"datamodule setup, {len(base.split_names)} splits "
        f"{'from cache' if had_cache else 'building caches'}: {cache['setup_s']:.2f} s"
    )
    train, val = base.train_dataloader(), base.val_dataloader()
    data = {
        "classes": base.classes,
        "sizes": train.batch_sampler.sizes,
        "n_val_images": len(val.dataset),
    }
    if "a" in cfg.pipelines:
        data.update(
            x=train.dataset.images.to(device),
            y=train.dataset.labels.to(device),
            vx=val.dataset.images.to(device),
            vy=val.dataset.labels.to(device),
            num_classes=len(base.classes),
        )
    return dm, data


def make_runners(cfg: DictConfig, dm, data: dict, device: torch.device, notes: list) -> list[tuple]:
    """(pipeline, variant, row name, run) per timed epoch; a variant is a precision (or Keras's
    policy), +compile."""
    bs, classes = cfg.data.batch_size, data["classes"]
    precisions = usable_precisions(cfg, device, notes)
    runners = []
    if "a" in cfg.pipelines:
        for p in precisions:
            run = lambda p=p: plain_epoch(cfg, data, device, bs, precision=p)  # noqa: E731
            runners.append(("a", p, f"a  plain loop, uint8 tensor, {p}", run))
    if "b" in cfg.pipelines:
        run = lambda: pipeline_b(cfg, device, len(classes))  # noqa: E731
        runners.append(("b", "32-true", "b  Lightning + ImageFolder + ToTensor", run))
    if "c" in cfg.pipelines:
        runners += c_runners(cfg, dm, data, device, precisions)
    if "k" in cfg.pipelines:
        runners += keras_runners(cfg, device, precisions, notes)
    return runners


def usable_precisions(cfg: DictConfig, device: torch.device, notes: list) -> list[str]:
    """cfg.precision without what this device can't run well, each skip said in one line."""
    usable = []
    for p in map(str, cfg.precision):
        if device.type != "cuda" and p.startswith("16"):
            notes.append(f"(a) and (c) at precision {p} skipped: fp16 needs CUDA")
        elif device.type != "cuda" and "bf16" in p and not cpu_has_native_bf16():
            notes.append(
                f"(a), (c) and (k) at {p} skipped: the CPU has no native bf16 (AMX-BF16 or "
                "AVX512-BF16), so bf16 would be emulated, slower than fp32"
            )
        else:
            usable.append(p)
    return usable


def c_runners(cfg: DictConfig, dm, data: dict, device, precisions: list[str]) -> list[tuple]:
    runners = []
    for p in precisions:
        for compiled in [cfg.speed.compile] if cfg.compile_c is None else cfg.compile_c:
            v = p + ("+compile" if compiled else "")
            c_cfg = copy.deepcopy(cfg)
            c_cfg.speed.compile = bool(compiled)
            # one datamodule for all: the cache loads once
            run = lambda p=p, c_cfg=c_cfg: pipeline_c(  # noqa: E731
                c_cfg, dm, data["classes"], data["sizes"], data["n_val_images"], p, device
            )
            runners.append(("c", v, f"c  cifar_lightning, {v}", run))
    return runners


def keras_runners(cfg: DictConfig, device, precisions: list[str], notes: list) -> list[tuple]:
    """(k) at the Keras policy of each precision that runs here (float32, mixed_bfloat16)."""
    if device.type == "cuda":
        notes.append("(k) skipped: it is timed on the CPU only")
        return []
    missing = keras_missing(cfg)
    if missing:
        notes.append(f"(k) skipped: {missing}")
        return []
    wanted = [KERAS_POLICY[p] for p in precisions if p in KERAS_POLICY]
    return [
        (
            "k",
            policy,
            f"k  Keras notebook, {policy}",
            lambda policy=policy: keras_epoch(cfg, policy),
        )
        for policy in cfg.keras
        if policy in wanted
    ]


def run_rounds(
    runners: list[tuple], rounds: int, device: torch.device
) -> dict[tuple[str, str], list[dict]]:
    """Every runner once per round, in turn (a, b, c, a, b, c...), so a slow spell on a shared
    machine lands on every pipeline alike and each round gives a paired ratio."""
    timed: dict[tuple[str, str], list[dict]] = {}
    for k in range(rounds):
        for pipeline, variant, name, run in runners:
            reset_peaks()
            r = run()  # (k) brings its own process's memory
            timed.setdefault((pipeline, variant), []).append({"memory": memory(), **r})
            progress(f"round {k + 1}/{rounds}  {name}", timed[pipeline, variant][-1])
            free(device)
    return timed


def scaling(cfg: DictConfig, data: dict, device: torch.device, timed: dict) -> dict:
    """How the limit (a) scales with batch size, at each precision timed, and with train-set
    fraction; the main runs of (a) stand in for data.batch_size and all of the train set."""
    bs = cfg.data.batch_size
    precisions = [v for pl, v in timed if pl == "a"]

    def at_batch(b: int, p: str) -> dict:
        if b == bs:
            return median_run(timed["a", p])
        return progress(f"(a) at batch {b}, {p}", plain_epoch(cfg, data, device, b, precision=p))

    def on_fraction(f: float) -> dict:
        if f == 1:
            return median_run(timed["a", precisions[0]])
        run = plain_epoch(cfg, data, device, bs, f, precision=precisions[0])
        return progress(f"(a) on {f:g} of the train set, {precisions[0]}", run)

    return {
        "scaling_batch_size": [
            {"batch_size": b, "precision": p, **at_batch(b, p)}
            for p in precisions
            for b in cfg.batch_sizes
        ],
        "scaling_fraction": [
            {"fraction": f, "precision": precisions[0], **on_fraction(f)} for f in cfg.fractions
        ],
    }


def paired_ratios(rows: list[dict], timed: dict) -> tuple[dict, dict]:
    """The median of the per-round ratios (each pair timed minutes apart), and each round's: for
    (c)'s first variant c/a, c/b and c/k; for each other precision of (c), c/a[p] and c/k[p] at
    that precision; and every other (c) variant over the first."""
    c0 = next((r for r in rows if r["pipeline"] == "c"), None)
    ratios, per_round = {}, {}

    def ratio(name: str, num: tuple[str, str], den: tuple[str, str]) -> None:
        if num not in timed or den not in timed:
            return
        pairs = [x["images_per_s"] / y["images_per_s"] for x, y in zip(timed[num], timed[den])]
        ratios[name] = round(statistics.median(pairs), 3)
        per_round[name] = [round(q, 3) for q in pairs]

    if c0 is None:
        return ratios, per_round
    ratio("c/a", ("c", c0["variant"]), ("a", c0["precision"]))
    ratio("c/b", ("c", c0["variant"]), ("b", "32-true"))
    ratio("c/k", ("c", c0["variant"]), ("k", KERAS_POLICY.get(c0["precision"], "")))
    for r in rows:
        if r["pipeline"] != "c" or r is c0:
            continue
        v = r["variant"]
        if v == r["precision"]:  # another precision, not compiled
            ratio(f"c/a[{v}]", ("c", v), ("a", v))
            ratio(f"c/k[{v}]", ("c", v), ("k", KERAS_POLICY.get(v, "")))
        ratio(f"c[{v}]/c[{c0['variant']}]", ("c", v), ("c", c0["variant"]))
    return ratios, per_round


def print_report(cfg: DictConfig, out: dict, device: torch.device) -> None:
    # Capped: the extrapolated full epoch is worth a column, and val acc is not (capped validation
    # sees the first, class-sorted, images only: one or two classes).
    drop = "val_acc" if cfg.max_steps else "full_epoch_s_est"
    epoch_cols = [c for c in EPOCH_COLS if c[1] != drop]
    print_epochs(cfg, out, device, epoch_cols)
    print_extras(out)
    print_scaling(cfg, out, epoch_cols)
    rows = out["results"]
    print(
        f"\nRSS after imports {RSS_AFTER_IMPORTS_MiB:,.0f} MiB; peak RSS per stage (MiB): "
        + ", ".join(
            [f"cache+setup {out['cache']['memory']['peak_rss_MiB']:,.0f}"]
            + [f"{r['pipeline']}[{r['variant']}] {r['memory']['peak_rss_MiB']:,.0f}" for r in rows]
        )
    )


def print_epochs(cfg: DictConfig, out: dict, device: torch.device, epoch_cols: list) -> None:
    """The main table, one row per timed pipeline and variant, and the paired ratios."""
    rows, ratios, per_round = out["results"], out["ratios"], out["ratios_per_round"]
    base_ips = next((r["images_per_s"] for r in rows if r["pipeline"] == "a"), None)
    capped = f", capped at {cfg.max_steps} steps" if cfg.max_steps else ""
    print(f"\n== one epoch = train + validation, batch {cfg.data.batch_size}{capped} ==")
    shown = [
        {
            **with_steps(r),
            "vs_a": base_ips and r["images_per_s"] / base_ips,
            "peak_rss": r["memory"]["peak_rss_MiB"],
            "gpu_peak": r["memory"].get("gpu_peak_MiB"),
        }
        for r in rows
    ]
    cols = [("pipeline", "name", ""), *epoch_cols]
    cols += [("x a", "vs_a", ".2f"), ("peak RSS MiB", "peak_rss", ",.0f")]
    if device.type == "cuda":
        cols.append(("GPU peak MiB", "gpu_peak", ",.0f"))
    print(table(shown, cols))
    print(
        "  ".join(f"{k} = {v:.2f}" for k, v in ratios.items())
        or "(no ratios: run a and c, or b and c)"
    )
    if cfg.rounds > 1:
        print(
            f"median of {cfg.rounds} interleaved rounds; per round: "
            + "; ".join(f"{k} " + " ".join(f"{q:.2f}" for q in v) for k, v in per_round.items())
        )


def print_extras(out: dict) -> None:
    """torch.compile's payoff and the notes."""
    for c in out["compile_payoff"]:
        after = c["pays_off_after_epochs"]
        rounds = c["saved_per_epoch_s_per_round"]
        per_round = f" (per round: {' '.join(f'{x:.2f}' for x in rounds)})"
        print(
            f"torch.compile at {c['precision']}: one-off {c['one_off_s']:.1f} s, "
            f"saves {c['saved_per_epoch_s']:.2f} s per full epoch"
            + (per_round if len(rounds) > 1 else "")
            + ": "
            + (f"pays off after {after:.1f} epochs" if after is not None else "never pays off")
            + f"; net over 30 epochs {c['net_gain_30_epochs_s']:+.1f} s"
        )
    for note in out["notes"]:
        print(note)


def print_scaling(cfg: DictConfig, out: dict, epoch_cols: list) -> None:
    """(a) against batch size and train-set fraction."""
    if out.get("scaling_batch_size"):
        print("\n== plain loop (a) vs batch size ==")
        rows = [with_steps(r) for r in out["scaling_batch_size"]]
        cols = [("batch", "batch_size", ""), ("precision", "precision", ""), *epoch_cols]
        print(table(rows, cols))
    if out.get("scaling_fraction"):
        print(f"\n== plain loop (a) vs train-set fraction, batch {cfg.data.batch_size} ==")
        rows = [with_steps(r) for r in out["scaling_fraction"]]
        cols = [("fraction", "fraction", ".2f"), ("images", "images", ","), *epoch_cols]
        print(table(rows, cols))


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def _main(cfg: DictConfig) -> None:
    bench(cfg)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
