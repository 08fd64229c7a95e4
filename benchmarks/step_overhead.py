"""Per-step cost of the training loop around Model S, with the compute made small: what
Lightning and our module add to each step, which is what bounds c/a on a GPU, where a step's
kernels take ~1 ms.

    python benchmarks/step_overhead.py                    # 8x8 images, batch 2, one CPU thread
    python benchmarks/step_overhead.py --profile          # also cProfile's top entries for (c)
    python benchmarks/step_overhead.py --size 32 --batch 64 --device cuda   # real shapes, a GPU
    python benchmarks/step_overhead.py --device cuda --sync-debug   # where (c) waits for the GPU

Times, in one run and interleaved over --rounds, ms per training step of:
  a       a plain PyTorch loop: forward, cross-entropy, backward, optimizer step
  c       cifar_lightning's Classifier in a Lightning Trainer (metrics updated per step, logged per
          epoch)
  c+cb    the same with train's callbacks and logger (checkpoint, early stopping, progress bar, LR
          monitor, history, TensorBoard), as train and the benchmark's (c) run it
  c-log   c with self.log(...) called every step for the loss and the accuracy, the common
          Lightning idiom
Synthetic uint8 data; same network and optimizer (conf defaults, no schedule) everywhere; each fit
ends with one untimed validation batch. It runs from a clone, against the installed package."""

from __future__ import annotations

import argparse
import collections
import copy
import cProfile
import logging
import pstats
import statistics
import tempfile
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from bench_pipelines import EpochTimer, clock
from torch.utils.data import DataLoader

from cifar_lightning.build import build_logger_and_callbacks, model_config, plain
from cifar_lightning.data.datamodule import TensorImages, _whole_batch
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.model.module import Classifier
from cifar_lightning.model.net import build_net
from cifar_lightning.model.optim import build_optimizer
from cifar_lightning.schema import compose


class PerStepLogging(Classifier):
    """Logs the step's loss and accuracy from every training step, as most Lightning code does."""

    def update_metrics(self, stage, loss, logits, y):
        super().update_metrics(stage, loss, logits, y)
        if stage == "train":
            n = len(y)
            self.log("train/step_loss", loss, on_step=False, on_epoch=True, batch_size=n)
            accuracy = (logits.argmax(1) == y).float().mean()
            self.log("train/step_acc", accuracy, on_step=False, on_epoch=True, batch_size=n)


def plain_loop(module_args, x, y, batches, size, device):
    net = build_net(module_args["model"], size, channels_last=True).to(device)
    opt = build_optimizer(module_args["optim"], net)

    def run(bs):
        for idx in bs:
            loss = F.cross_entropy(
                net(x[idx].contiguous(memory_format=torch.channels_last)), y[idx]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(batches[:20])  # warm-up: allocator, cuDNN choices
    t0 = clock(device)
    run(batches)
    return (clock(device) - t0) / len(batches) * 1e3


def lightning(cls, module_args, x, y, batch, size, device, profiler=None, train_cfg=None):
    """ms per training step of `cls` in a Trainer; with train_cfg, also train's callbacks and
    logger."""
    module = cls(**module_args, class_names=[str(i) for i in range(10)], image_size=size)
    sizes = [len(y)]

    def fit(limit, callbacks=()):
        loader = DataLoader(
            TensorImages(x, y),
            collate_fn=_whole_batch,
            batch_sampler=DirectoryBatchSampler(sizes, batch, "per_directory", 0),
        )
        options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        with tempfile.TemporaryDirectory() as tmp:
            if train_cfg is not None:  # checkpoints, logs and history.csv go to tmp
                run_cfg = copy.deepcopy(train_cfg)
                run_cfg.run_dir = tmp
                logger, configured = build_logger_and_callbacks(run_cfg)
                options, callbacks = dict(logger=logger or False), [*configured, *callbacks]
            # one validation batch, untimed: the checkpoint and early stopping need val/loss
            L.Trainer(
                accelerator=device.type,
                devices=1,
                max_epochs=1,
                enable_model_summary=False,
                limit_train_batches=limit,
                limit_val_batches=1,
                num_sanity_val_steps=0,
                callbacks=list(callbacks),
                **options,
            ).fit(module, loader, loader)

    fit(20)  # warm-up
    timer = EpochTimer()
    (profiler.runcall if profiler else lambda f, *a, **k: f(*a, **k))(fit, None, [timer])
    # t1: the training steps end, validation starts
    return (timer.t1 - timer.t0) * 1e3 / (len(y) // batch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size", type=int, default=8, help="image side in pixels (8: compute negligible)"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA: list where an epoch of (c) syncs host and GPU",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # per-Trainer banners
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*|.*LeafSpec.*")
    device = torch.device(args.device)
    cfg = compose(["data.root=unused", "scheduler=none"])
    # the Classifier's keyword arguments (the defaults' loss, augment, tta, whiten and speed)
    module_args = {
        "model": model_config(cfg, 10),
        **{k: plain(cfg[k]) for k in ("optim", "scheduler", "loss", "augment", "tta", "whiten")},
        "speed": plain(cfg.speed),
    }
    n = args.steps * args.batch
    x = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    batches = [
        torch.tensor(b, device=device)
        for b in DirectoryBatchSampler([n], args.batch, "per_directory", 0).batches()
    ]
    shapes = (x, y, args.batch, args.size, device)
    times = {"a": [], "c": [], "c+cb": [], "c-log": []}
    for _ in range(args.rounds):  # interleaved, so a slow spell on a shared machine hits them all
        times["a"].append(plain_loop(module_args, x, y, batches, args.size, device))
        times["c"].append(lightning(Classifier, module_args, *shapes))
        times["c+cb"].append(lightning(Classifier, module_args, *shapes, train_cfg=cfg))
        times["c-log"].append(lightning(PerStepLogging, module_args, *shapes))
    a = statistics.median(times["a"])
    print(
        f"\n{args.size}x{args.size} images, batch {args.batch}, {args.steps} steps, {device}, "
        f"{torch.get_num_threads()} thread(s); median of {args.rounds} interleaved rounds"
    )
    print(f"{'loop':6}  {'ms/step':>8}  {'over a':>8}  {'a/x':>5}   per round (ms/step)")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(
            f"{name:6}  {m:8.3f}  {m - a:+8.3f}  {a / m:5.2f}   " + " ".join(f"{t:.3f}" for t in ts)
        )
    if args.sync_debug and device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                lightning(Classifier, module_args, *shapes)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sites = collections.Counter(
            f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
        )
        print(
            f"\nhost-GPU syncs in a warm-up + one epoch of (c), {args.steps} steps:",
            sum(sites.values()),
        )
        for site, count in sites.most_common(15):
            print(f"{count:8}  {site}")
    if args.profile:
        prof = cProfile.Profile()
        lightning(Classifier, module_args, *shapes, profiler=prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
