"""The benchmark's timed epochs, one function per pipeline (bench.py's docstring says what each is
and how they are compared): (a) plain_epoch, (b) pipeline_b, (c) pipeline_c; and time_cache, the
decode-once cache's build and load. Each epoch comes back as result()'s dict of times and counts."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import datasets, transforms

from cifar_lightning.build import build_module, build_trainer, model_config, plain
from cifar_lightning.data.cache import load_split
from cifar_lightning.data.datamodule import eval_batch_size
from cifar_lightning.data.folder import KerasImageFolder
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.model.net import build_net
from cifar_lightning.model.optim import build_optimizer


# ---------------------------------------------------------------- shared pieces
def clock(device: torch.device) -> float:
    """perf_counter once the GPU has finished its queued kernels (they run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def caps(n_train: int, n_val: int, max_steps: int | None) -> tuple[int, int]:
    """(train steps, val steps) of a timed epoch. With max_steps, validation is cut in the same
    proportion, so train:val time stays as in a full epoch and the full epoch can be extrapolated.
    """
    if not max_steps or max_steps >= n_train:
        return n_train, n_val
    return max_steps, max(1, math.ceil(n_val * max_steps / n_train))


def result(
    images: int, steps: int, full_steps: int, val_steps: int, train_s: float, val_s: float, val_acc
) -> dict:
    epoch_s = train_s + val_s
    return {
        "images": images,
        "train_steps": steps,
        "full_train_steps": full_steps,
        "val_steps": val_steps,
        "train_s": round(train_s, 4),
        "val_s": round(val_s, 4),
        "epoch_s": round(epoch_s, 4),
        "images_per_s": round(images / epoch_s, 1),
        "full_epoch_s_est": round(epoch_s * full_steps / steps, 2),
        "val_acc": None if val_acc is None else round(float(val_acc), 4),
    }


def with_warmup(r: dict, warmup_s: float, steps: int, val_steps: int | None = None) -> dict:
    """The warm-up's wall time, and its one-off cost: what it took beyond `steps` training and
    `val_steps` (default: `steps`) validation steps at the timed epoch's pace (torch.compile's
    compile time, allocator, autotuning)."""
    val_steps = steps if val_steps is None else val_steps
    at_pace = steps * r["train_s"] / r["train_steps"] + val_steps * r["val_s"] / r["val_steps"]
    return {
        **r,
        "warmup_s": round(warmup_s, 3),
        "one_off_s": round(warmup_s - at_pace, 3) if steps else None,
    }


def make_net(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """Model S as the Classifier builds it: memory layout and torch.compile as `speed` says."""
    L.seed_everything(cfg.seed, verbose=False)  # the same initial weights in every pipeline
    net = build_net(model_config(cfg, num_classes), cfg.data.image_size, cfg.speed.channels_last)
    return torch.compile(net, mode=cfg.speed.compile_mode) if cfg.speed.compile else net


# ---------------------------------------------------------------- (a) plain loop
def plain_epoch(
    cfg: DictConfig,
    data: dict,
    device: torch.device,
    batch_size: int,
    fraction: float = 1.0,
    precision: str = "32-true",
) -> dict:
    """One epoch of the same net, optimizer and batch order as (c) over uint8 tensors already on
    `device`: no DataLoader, no Lightning, no metrics objects. The reference limit. At
    bf16-mixed, forward and loss run under autocast, as Lightning's precision plugin does."""
    x, y, sizes, vx, vy = data["x"], data["y"], data["sizes"], data["vx"], data["vy"]
    # the first `fraction` of each train dir, so per-directory batching still applies
    if fraction < 1:
        starts = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
        sizes = [max(1, int(n * fraction)) for n in sizes]
        keep = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes)]).to(device)
        x, y = x[keep], y[keep]
    # Index tensors are made before the clock starts: (c) pays for them per step, but that is the
    # data path's cost, which is what the limit leaves out.
    batches = [
        torch.tensor(b, device=device)
        for b in DirectoryBatchSampler(sizes, batch_size, cfg.fidelity.batching, cfg.seed).batches()
    ]
    # validation batches, as (c) has them
    vbs = eval_batch_size(cfg.data.eval_batch_size, batch_size, device)
    n_train, n_val = caps(len(batches), math.ceil(len(vy) / vbs), cfg.max_steps)
    net = make_net(cfg, data["num_classes"]).to(device)
    opt = build_optimizer(plain(cfg.optim), net)
    channels_last = bool(cfg.speed.channels_last)

    def fmt(xb):
        return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb

    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"
    )

    def train(idx_list):
        net.train()
        for idx in idx_list:
            with autocast():
                loss = F.cross_entropy(net(fmt(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def validate(steps):
        net.eval()
        end = min(steps * vbs, len(vy))
        # summed on the device: no per-step sync
        correct = torch.zeros((), dtype=torch.long, device=device)
        for i in range(0, end, vbs):
            with autocast():
                correct += (net(fmt(vx[i : i + vbs])).argmax(1) == vy[i : i + vbs]).sum()
        return correct.item() / end

    w = cfg.warmup_steps
    tw = clock(device)
    if w:  # allocator, thread pools, cuDNN algorithm choice, torch.compile: not part of an epoch
        train(batches[:w])
        validate(w)
    t0 = clock(device)
    train(batches[:n_train])
    t1 = clock(device)
    acc = validate(n_val)
    t2 = clock(device)
    images = sum(len(b) for b in batches[:n_train])
    return with_warmup(
        result(images, n_train, len(batches), n_val, t1 - t0, t2 - t1, acc), t0 - tw, w
    )


# ---------------------------------------------------------------- (b) and (c): Lightning
class EpochTimer(L.Callback):
    """Train-epoch and validation wall time, and the training images seen. Validation runs inside
    the epoch; the clock stops at on_train_end, so "val s" also holds the epoch-end callbacks that
    Lightning calls after ours (checkpoint writes, early stopping)."""

    def on_train_epoch_start(self, trainer, module):
        self.images, self.t0 = 0, clock(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.images += len(batch[1])

    def on_validation_epoch_start(self, trainer, module):
        self.t1 = clock(module.device)

    def on_train_end(self, trainer, module):
        self.t2 = clock(module.device)


def lightning_epoch(
    make_trainer,
    module: L.LightningModule,
    n_train: int,
    n_val: int,
    cfg: DictConfig,
    compiled: bool = False,
    **fit_kwargs,
) -> dict:
    """Warm up with a short fit, then time one epoch with a fresh Trainer on the same module. A
    compiled module warms up on the timed epoch itself (same batches: same seed, epoch 0), so every
    batch shape the clock meets (each directory's last partial batch, validation's) is compiled."""
    steps, val_steps = caps(n_train, n_val, cfg.max_steps)
    warm_steps, warm_val = (steps, val_steps) if compiled else (cfg.warmup_steps, cfg.warmup_steps)
    tw = time.perf_counter()
    if warm_steps:
        make_trainer(limit_train_batches=warm_steps, limit_val_batches=warm_val).fit(
            module, **fit_kwargs
        )
    warmup_s = time.perf_counter() - tw
    timer = EpochTimer()
    trainer = make_trainer(
        callbacks=[timer], limit_train_batches=steps, limit_val_batches=val_steps
    )
    trainer.fit(module, **fit_kwargs)
    r = result(
        timer.images,
        steps,
        n_train,
        val_steps,
        timer.t1 - timer.t0,
        timer.t2 - timer.t1,
        trainer.callback_metrics.get("val/acc"),
    )
    # what ran inside the timed epoch besides the module
    r.update(
        callbacks=[type(c).__name__ for c in trainer.callbacks if c is not timer],
        logger=type(trainer.logger).__name__ if trainer.logger else None,
    )
    return with_warmup(r, warmup_s, warm_steps, warm_val)


class PlainModule(L.LightningModule):
    """(b)'s minimal LightningModule around the same network: cross-entropy, the same optimizer."""

    def __init__(self, net: torch.nn.Module, optim: dict, channels_last: bool):
        super().__init__()
        self.net, self.optim, self.channels_last = net, optim, channels_last

    def forward(self, x):
        x = x * 255  # ToTensor scaled to 0..1; the net divides by 255 itself
        return self.net(
            x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return build_optimizer(self.optim, self.net)


def pipeline_b(cfg: DictConfig, device: torch.device, num_classes: int) -> dict:
    root, to_tensor = Path(cfg.data.root), transforms.ToTensor()
    train = ConcatDataset(
        [datasets.ImageFolder(root / d, transform=to_tensor) for d in cfg.data.train_dirs]
    )
    val = datasets.ImageFolder(root / cfg.data.val_dir, transform=to_tensor)
    workers, bs = min(4, os.cpu_count() or 1), cfg.data.batch_size
    # Not persistent: workers start inside each timed epoch, a cost this pipeline pays every epoch.
    train_dl = DataLoader(train, batch_size=bs, shuffle=True, num_workers=workers)
    val_dl = DataLoader(val, batch_size=bs, num_workers=workers)
    module = PlainModule(
        make_net(cfg, num_classes), plain(cfg.optim), bool(cfg.speed.channels_last)
    )

    def make_trainer(**kw):
        return L.Trainer(
            accelerator=device.type,
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=cfg.run_dir,
            **kw,
        )

    out = lightning_epoch(
        make_trainer,
        module,
        len(train_dl),
        len(val_dl),
        cfg,
        train_dataloaders=train_dl,
        val_dataloaders=val_dl,
    )
    return {**out, "num_workers": workers}


def pipeline_c(
    cfg: DictConfig,
    datamodule,
    classes: list[str],
    sizes: list[int],
    n_val_images: int,
    precision: str,
    device: torch.device,
) -> dict:
    """What train runs: the Classifier and the datamodule in a Trainer with the configured callbacks
    (checkpoints, early stopping, progress bar, history...) and logger, all timed. Each fit writes
    into its own directory, removed afterwards."""
    L.seed_everything(cfg.seed, verbose=False)
    model = build_module(cfg, classes, precision)
    fits = Path(tempfile.mkdtemp(prefix="c-fits-", dir=cfg.run_dir))

    def make_trainer(callbacks=(), **kw):
        fit_cfg = copy.deepcopy(cfg)
        # the config's ${run_dir}: checkpoints, logs, history
        fit_cfg.run_dir = tempfile.mkdtemp(dir=fits)
        return build_trainer(fit_cfg, *callbacks, max_epochs=1, precision=precision, **kw)

    bs = cfg.data.batch_size
    n_train = len(DirectoryBatchSampler(sizes, bs, cfg.fidelity.batching))
    try:
        n_val = math.ceil(n_val_images / eval_batch_size(cfg.data.eval_batch_size, bs, device))
        return lightning_epoch(
            make_trainer,
            model,
            n_train,
            n_val,
            cfg,
            compiled=bool(cfg.speed.compile),
            datamodule=datamodule,
        )
    finally:
        shutil.rmtree(fits, ignore_errors=True)


# ---------------------------------------------------------------- cache
def time_cache(cfg: DictConfig) -> dict:
    """Build, then load, the valid split's cache in a temporary copy of that split alone: the real
    cache files are never touched, and one split is quick to decode."""
    src = Path(cfg.data.root) / cfg.data.val_dir
    with tempfile.TemporaryDirectory(prefix="cifar-bench-") as tmp:
        split = Path(tmp) / src.name
        shutil.copytree(src, split)
        folder = KerasImageFolder(
            split, cfg.data.image_size, cfg.fidelity.resize, cfg.data.skip_bad_files
        )
        args = (folder, cfg.data.image_size, cfg.fidelity.resize)
        t0 = time.perf_counter()
        images = load_split(*args)[0]  # no cache file yet: decode every image, save
        t1 = time.perf_counter()
        load_split(*args)  # the file now exists: fingerprint + torch.load
        t2 = time.perf_counter()
    return {
        "split": src.name,
        "images": len(images),
        "build_s": round(t1 - t0, 3),
        "load_s": round(t2 - t1, 4),
        "build_images_per_s": round(len(images) / (t1 - t0), 1),
    }


# ---------------------------------------------------------------- (k) the Keras notebook
# trainer.precision -> the Keras mixed-precision policy that does the same
KERAS_POLICY = {"32-true": "float32", "bf16-mixed": "mixed_bfloat16"}
KERAS_SCRIPT = Path(__file__).with_name("keras_reference.py")


def keras_python(cfg: DictConfig) -> str:
    return str(cfg.keras_python or sys.executable)


def keras_missing(cfg: DictConfig) -> str | None:
    """Why (k) can't run with keras_python, or None."""
    py = keras_python(cfg)
    probe = subprocess.run([py, "-c", "import tensorflow, keras"], capture_output=True, text=True)
    if probe.returncode:
        return (
            f"TensorFlow/Keras is not importable by {py} "
            "(pip install 'cifar_lightning[keras]', or keras_python=PATH/TO/python)"
        )
    return None


def keras_epoch(cfg: DictConfig, policy: str) -> dict:
    """The notebook's own pipeline (keras_reference.py) in a subprocess with the same threads and
    data; its median steady-state epoch (after the first) as a result() row. It decodes the JPEG
    files every epoch, as image_dataset_from_directory does, and runs whole epochs."""
    threads = cfg.threads or torch.get_num_threads()
    command = [
        keras_python(cfg),
        str(KERAS_SCRIPT),
        "--root",
        str(cfg.data.root),
        "--train-dirs",
        ",".join(cfg.data.train_dirs),
        "--val-dir",
        cfg.data.val_dir,
        "--batch",
        str(cfg.data.batch_size),
        "--epochs",
        str(cfg.keras_epochs),
        "--threads",
        str(threads),
        "--policy",
        policy,
        "--seed",
        str(cfg.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])
        raise RuntimeError(f"(k) at {policy} failed: {tail}")
    k = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "images": k["train_images"],
        "train_steps": k["train_steps"],
        "full_train_steps": k["train_steps"],
        "val_steps": None,
        "train_s": None,
        "val_s": None,
        "epoch_s": k["epoch_s"],
        "images_per_s": k["images_per_s"],
        "full_epoch_s_est": k["epoch_s"],
        "val_acc": round(k["val_acc"][-1], 4),
        "one_off_s": round(k["epoch_seconds"][0] - k["epoch_s"], 3),
        "keras": {key: k[key] for key in ("epoch_seconds", "val_acc", "tensorflow", "keras")},
        "memory": {"peak_rss_MiB": k["peak_rss_MiB"]},  # the subprocess's, not the bench's
    }
