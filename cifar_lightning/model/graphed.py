"""The whole training step (forward, loss, backward, optimizer update) as one CUDA graph.

Model S at batch 64 is about 150 small kernels a step; launched one by one from Python they cost more
host time than the GPU needs to run them (H200: 4.1 ms a step in a plain PyTorch loop, GPU 20% busy).
Captured once, a step is one replay: the host only copies the batch into the graph's input tensors.

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
from typing import Callable

import torch


class GraphedStep:
    """`step(x, y, backward, optimizer)` updates everything in place and returns nothing. `eager(x, y)`
    is the same step through Lightning (counted as an optimizer step there); after a replay the caller
    counts the step itself."""

    def __init__(
        self,
        step: Callable,
        eager: Callable,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        warmup: int = 3,
        graph_type=None,
    ):
        self.step, self.eager, self.optimizer = step, eager, optimizer
        self.batch_size, self.warmup = batch_size, warmup
        self.graph_type = (
            graph_type or CudaGraph
        )  # tests on the CPU pass a stand-in that replays the call
        self.graph, self.inputs, self.lrs = None, None, None
        self.eager_steps = self.captures = self.replays = 0
        # Adam & co keep their step count on the device (on a GPU; the CPU stand-in leaves them as they are).
        # capturable_was: the flags to write into checkpoints, so that they load as a plain run's.
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

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One training step; True when it was a replay (not yet counted by Lightning)."""
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            with _side_stream(x.device):
                self.eager(x, y)
            return False
        if len(y) != self.batch_size:
            self.eager(x, y)
            return False
        if self.graph is None or self._lrs() != self.lrs:
            self._capture(x, y)
        self.inputs[0].copy_(x, non_blocking=True)
        self.inputs[1].copy_(y, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return True

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.graph = None  # the old graph's memory goes back first
        inputs, self.lrs = (torch.empty_like(x), torch.empty_like(y)), self._lrs()
        device = x.device.type
        # Under bf16-mixed, Lightning's autocast is active here (with its cast cache already off, which
        # capture needs); re-entered so that holds whatever precision plugin opened it
        autocast = dict(
            device_type=device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        )

        def step():
            with torch.autocast(**autocast):
                self.step(*inputs, torch.Tensor.backward, self.optimizer)

        graph = self.graph_type()
        graph.capture(step)
        self.graph, self.inputs = graph, inputs
        self.captures += 1


class CudaGraph:
    """torch.cuda.CUDAGraph behind capture(fn) / replay(), the interface GraphedStep uses."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable) -> None:
        # thread_local: a DataLoader's pin-memory thread (data.cache=false) may allocate pinned memory
        # or query events while this thread captures; "global" would fail the capture for that
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Runs the block on a fresh CUDA stream, ordered after and before the current one (no-op on CPU)."""
    if device.type != "cuda":
        yield
        return
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)
