"""The whole training step (forward, loss, backward, optimizer update) as one CUDA graph.

Model S at batch 64 is about 150 small kernels a step; launched one by one from Python they cost
more host time than the GPU needs to run them (H200: 4.1 ms a step in a plain PyTorch loop, GPU 20%
busy). Captured once, a step is one replay: the host only copies the batch into the graph's input
tensors.

Rules that keep a replay the same step as an eager one:
- Warm-up: the first `warmup` steps run eagerly on a side stream (PyTorch's rule for whole-network
  capture), so optimizer state and cuDNN/cuBLAS handles exist before capture.
- Shapes: only batches of the captured size replay; another (a directory's last, partial batch) runs
  eagerly on the same parameters, optimizer state and running statistics, all updated in place.
- Learning rate: the optimizer's update reads `lr` on the host, so a capture bakes it in; when a
  schedule changes it (the plateau cut, a few times a run) the step is captured again.
- Randomness (dropout, augmentation) draws from the CUDA generator, which a replay advances.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from cifar_lightning.private_api import count_optimizer_step

log = logging.getLogger(__name__)

# What Lightning calls around manual_backward and optimizer.step, and a replayed step does not (a
# capture calls Tensor.backward itself, so the module's own `backward` is skipped too).
GRAPH_SKIPPED_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class CudaGraphSteps(L.Callback):
    """model.cuda_graph=true: at the start of each fit, give the module a GraphedStep that replays
    its `train_step`, or say in one log line why its steps stay eager."""

    graph_type = None  # GraphedStep's graph (a CUDA graph); CPU tests substitute a replayed call

    def on_train_start(self, trainer, pl_module):
        pl_module.graphed = None
        why_not = self.blocker(trainer, pl_module)
        if why_not:
            log.info(f"model.cuda_graph: eager steps, {why_not}")
            return
        optimizer = pl_module.optimizers()
        pl_module.graphed = GraphedStep(
            pl_module.train_step,
            pl_module.eager_step,
            optimizer.optimizer,
            batch_size=trainer.train_dataloader.batch_sampler.batch_size,
            graph_type=self.graph_type,
            # a replay bypasses LightningOptimizer.step, where Lightning counts global_step
            count=lambda: count_optimizer_step(optimizer),
        )

    def on_train_end(self, trainer, pl_module):
        self.last = pl_module.graphed  # what the fit did, for the benchmark's report

    def blocker(self, trainer, pl_module) -> str | None:
        """Why this fit can't replay its steps as a CUDA graph, or None."""
        if pl_module.device.type != "cuda":
            return f"the device is {pl_module.device.type}"
        return graph_blocker(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Adam's capturable flag, set for the graph, is saved as it was
        states = checkpoint.get("optimizer_states")  # none in a weights-only checkpoint
        if pl_module.graphed is None or not states:
            return
        groups = states[0]["param_groups"]  # a copy: the live optimizer keeps its own
        for group, was in zip(groups, pl_module.graphed.capturable_was):
            if was is not None:
                group["capturable"] = was


def graph_blocker(trainer, pl_module) -> str | None:
    """CudaGraphSteps.blocker's rules other than the device (CPU tests' stand-in obeys them)."""
    # A replay runs no Python, so the hooks Lightning calls around backward and the optimizer step
    # would silently skip most steps (a gradient-norm logger would see only the eager ones).
    # is_overridden also sees hooks set on an instance, as LambdaCallback(on_after_backward=...).
    watched = [(pl_module, (*GRAPH_SKIPPED_HOOKS, "backward"))]
    watched += [(c, GRAPH_SKIPPED_HOOKS) for c in trainer.callbacks]
    for obj, hooks in watched:
        hook = next((h for h in hooks if is_overridden(h, obj)), None)
        if hook:
            return f"{type(obj).__name__}.{hook} would not run on replayed steps"
    if trainer.world_size > 1:
        return "DDP's gradient all-reduce is not captured"
    if trainer.precision not in ("32-true", "bf16-mixed"):
        return f"trainer.precision={trainer.precision} (graphed steps run at 32-true or bf16-mixed)"
    if torch.is_anomaly_enabled():
        return "trainer.detect_anomaly=true (its checks read values back in backward)"
    if pl_module.compiled:
        return "model.compile=true (torch.compile's reduce-overhead mode makes its own graphs)"
    if any(c.interval == "step" for c in trainer.lr_scheduler_configs):
        return "the schedule changes the learning rate every step (a graph bakes it in)"
    if not hasattr(trainer.train_dataloader, "batch_sampler"):
        return "the train loader has no batch sampler (cifar_lightning's datamodule has)"
    return None


class CheapHookBookkeeping:
    """A LightningModule mixin. Lightning sets _current_fx_name around every hook, ~44 times a
    training step. nn.Module's __setattr__ first checks the value against Parameter, Module and
    Buffer (Python-level isinstance hooks): ~7 us a call, 0.3 ms a step, against ~1.6 ms a step
    at 40,000 images/s on a GPU. The value is a str or None, so a plain set does the same."""

    def __setattr__(self, name: str, value) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class GraphedStep:
    """`step(x, y, backward, optimizer)` updates everything in place and returns its loss,
    detached. `eager(x, y)` is the same step through Lightning (counted as an optimizer step
    there); a replay is counted by `count()`."""

    def __init__(
        self,
        step: Callable,
        eager: Callable,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        warmup: int = 3,
        graph_type=None,
        count: Callable[[], None] = lambda: None,
    ):
        self.step, self.eager, self.optimizer, self.count = step, eager, optimizer, count
        self.batch_size, self.warmup = batch_size, warmup
        # tests on the CPU pass a stand-in that replays the call
        self.graph_type = graph_type or CudaGraph
        self.graph, self.inputs, self.lrs = None, None, None
        self.loss = None  # the captured step's loss: a replay writes this same tensor
        self.eager_steps = self.captures = self.replays = 0
        # Adam & co keep their step count on the device (on a GPU; the CPU stand-in leaves them
        # as they are). capturable_was: the flags to write into checkpoints, as a plain run's.
        self.capturable_was = [group.get("capturable") for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            if "capturable" in group and group["params"] and group["params"][0].is_cuda:
                group["capturable"] = True
        for state in optimizer.state.values():  # a resumed run's counters were saved on the CPU
            if torch.is_tensor(state.get("step")) and state["step"].device.type == "cpu":
                param_device = next(
                    (v.device for v in state.values() if torch.is_tensor(v) and v.dim()), None
                )
                if param_device is not None:
                    state["step"] = state["step"].to(param_device, torch.float32)

    def _lrs(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One training step: eager while warming up or for a partial batch, else a replay.
        Returns the step's loss; a replay's is the captured output tensor, which the next replay
        overwrites."""
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            with _side_stream(x.device):
                return self.eager(x, y)
        if len(y) != self.batch_size:
            return self.eager(x, y)
        if self.graph is None or self._lrs() != self.lrs:
            self._capture(x, y)
        self.inputs[0].copy_(x, non_blocking=True)
        self.inputs[1].copy_(y, non_blocking=True)
        self.graph.replay()
        self.count()
        self.replays += 1
        return self.loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.graph = self.loss = None  # the old graph's memory goes back first
        inputs, self.lrs = (torch.empty_like(x), torch.empty_like(y)), self._lrs()
        device = x.device.type
        # Under bf16-mixed, Lightning's autocast is active here (with its cast cache already off,
        # which capture needs); re-entered so that holds whatever precision plugin opened it
        autocast = dict(
            device_type=device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        )

        def step():
            with torch.autocast(**autocast):
                # allocated in the graph's memory pool and kept: the static output of replays
                self.loss = self.step(*inputs, torch.Tensor.backward, self.optimizer)

        graph = self.graph_type()
        graph.capture(step)
        self.graph, self.inputs = graph, inputs
        self.captures += 1


class CudaGraph:
    """torch.cuda.CUDAGraph behind capture(fn) / replay(), the interface GraphedStep uses."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable) -> None:
        # thread_local: a DataLoader's pin-memory thread (data.cache=false) may allocate pinned
        # memory or query events while this thread captures; "global" would fail the capture for
        # that
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Runs the block on a fresh CUDA stream, ordered after and before the current one (no-op on
    CPU)."""
    if device.type != "cuda":
        yield
        return
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)
