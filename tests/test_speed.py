"""The speed options (docs/speed.md) compose with the rest: bf16-mixed precision,
torch.compile and its mode, Lightning's profiler; and the training loop keeps off the operations
that would make the host wait for a GPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_lightning.errors import UserError
from cifar_lightning.train import train
from tests.conftest import cfg_for, image_batch, make_classifier

FAST = ["logger=none", "trainer.max_epochs=1"]


def test_bf16_mixed_trains_and_tests(tiny_layout, tmp_path):
    m = train(cfg_for(tmp_path, tiny_layout, "trainer.precision=bf16-mixed", *FAST))
    assert (
        m["epochs_run"] == 1 and 0 <= m["test_accuracy"] <= 1 and m["test_loss"] == m["test_loss"]
    )


def test_compile_option_builds_a_compiled_network(tmp_path):
    module = make_classifier(tmp_path, "speed.compile=true")
    assert isinstance(module.net, torch._dynamo.eval_frame.OptimizedModule)
    # the checkpoint keys stay loadable by evaluate/predict (they strip "_orig_mod.")
    assert any("_orig_mod." in k for k in module.state_dict())


def test_lightnings_profiler_writes_its_report_into_the_run_directory(
    tiny_layout, tmp_path, capsys, caplog
):
    train(cfg_for(tmp_path, tiny_layout, "trainer.profiler=simple", *FAST))
    fit = (tmp_path / "fit-profile.txt").read_text()
    assert (
        fit.startswith("FIT Profiler Report")
        and "run_training_batch" in fit
        and "Strategy.training_step" in fit
    )
    test = (tmp_path / "test-profile.txt").read_text()
    assert test.startswith("TEST Profiler Report") and "Strategy.test_step" in test
    assert "run_training_batch" not in test  # test's own profiler: not fit's rows again
    # files, not a few hundred lines on the console (Lightning's fallback is its logger)
    out, err = capsys.readouterr()
    assert "Profiler Report" not in out + err + caplog.text


@pytest.mark.slow
def test_compiled_and_bf16_training_together(tiny_layout, tmp_path):
    m = train(
        cfg_for(tmp_path, tiny_layout, "speed.compile=true", "trainer.precision=bf16-mixed", *FAST)
    )
    assert m["epochs_run"] == 1


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (run on a GPU: pytest tests/test_speed.py)",
)
def test_gpu_batches_are_gathered_without_a_host_sync():
    from cifar_lightning.data.datamodule import TensorImages

    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, device="cuda")
    ds = TensorImages(images, torch.arange(100, device="cuda"))
    ds.__getitems__(list(range(8)))  # the first call allocates pinned host memory
    torch.cuda.set_sync_debug_mode("error")  # any host-GPU synchronisation now raises
    try:
        x, y = ds.__getitems__([5, 3, 9])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(y.cpu(), torch.tensor([5, 3, 9])) and torch.equal(x, images[[5, 3, 9]])


# Operations whose result size or value the host must read: on a GPU each one waits for every queued
# kernel, so the host can't run ahead and queue the next step.
SYNCING_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), bool(t), `if t:`
    "aten::nonzero",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::masked_select",
    "aten::repeat_interleave",
}


class OpRecorder(TorchDispatchMode):
    """Every aten op run while it is active, and those that would make the host wait for a GPU. In a
    GPU run it knows which tensors are on the GPU; in a CPU run it counts every tensor as one that
    would be, except `cpu_scalars`, which stay on the CPU in a GPU run too."""

    def __init__(self, gpu_run: bool, cpu_scalars: set[int]):
        super().__init__()
        self.gpu_run, self.cpu_scalars = gpu_run, cpu_scalars  # cpu_scalars: data_ptrs
        self.seen, self.waits = set(), set()

    def on_gpu(self, t: torch.Tensor) -> bool:
        return t.is_cuda if self.gpu_run else t.data_ptr() not in self.cpu_scalars

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = func._schema.name, kwargs or {}
        self.seen.add(name)
        if name in SYNCING_OPS and self.on_gpu(args[0]):
            self.waits.add(name)
        elif (
            name == "aten::index"
            and self.on_gpu(args[0])
            and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.waits.add("aten::index with a bool mask")  # t[mask]: a nonzero inside, on a GPU
        elif self.gpu_run and (
            name == "aten::_to_copy"
            and args[0].is_cuda
            and kwargs.get("device") == torch.device("cpu")
            or name == "aten::copy_"
            and args[1].is_cuda
            and not args[0].is_cuda
        ):
            self.waits.add(f"{name} from the GPU to the host")
        return func(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ],
)
@pytest.mark.parametrize("recipe", ["", "experiment=next", "experiment=best"])
def test_a_steady_training_and_validation_step_never_waits_for_the_device(
    tiny_layout, tmp_path, monkeypatch, recipe, device
):
    """From the start of one batch to the start of the next: the step, the optimizer, every
    callback (the progress bar refreshed each step), the TensorBoard logger, and fetching the
    next batch from the cache. On the CPU the recorder flags what would wait on a GPU, so CI
    checks it without one."""
    from cifar_lightning.model.module import Classifier

    windows = {}

    def hook(stage):
        def on_batch_start(self, batch, batch_idx, *rest):
            if batch_idx == 1:  # batch 0 pays one-off costs (allocations, optimizer state)
                # torch's Adam reads its step counter with .item(); that counter is kept on the CPU
                # in a GPU run (not capturable, not fused), so reading it does not wait for the GPU.
                steps = {
                    s["step"].data_ptr()
                    for opt in self.trainer.optimizers
                    for s in opt.state.values()
                    if torch.is_tensor(s.get("step")) and s["step"].ndim == 0
                }
                windows[stage] = OpRecorder(self.device.type == "cuda", steps).__enter__()
            elif batch_idx == 2:
                windows[stage].__exit__(None, None, None)

        return on_batch_start

    monkeypatch.setattr(Classifier, "on_train_batch_start", hook("train"), raising=False)
    monkeypatch.setattr(Classifier, "on_validation_batch_start", hook("val"), raising=False)
    # batch 8: 3 training batches per directory and 3 validation batches, so each window is a whole
    # step; the progress bar and the logger both refresh every step
    try:
        train(
            cfg_for(
                tmp_path,
                tiny_layout,
                "trainer.max_epochs=1",
                "data.batch_size=8",
                "trainer.log_every_n_steps=1",
                "callbacks.progress_bar.refresh_rate=1",
                f"trainer={device}",
                *([recipe] if recipe else []),
            )
        )
    except UserError as exc:
        # experiment=best (peak lr 0.1) on 8-image batches diverged on an H200: its one epoch had
        # no finite val/loss; the steps were recorded all the same
        assert "training diverged" in str(exc)
    assert (
        "aten::convolution_backward" in windows["train"].seen
        and "aten::convolution" in windows["val"].seen
    )
    for stage, rec in windows.items():
        assert not rec.waits, f"a {stage} step waits for the device at: {sorted(rec.waits)}"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_model_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, mode):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: seen.append(mode) or net)
    make_classifier(tmp_path, "speed.compile=true", f"speed.compile_mode={mode}")
    assert seen == [mode]
    make_classifier(tmp_path, f"speed.compile_mode={mode}")  # speed.compile=false: not compiled
    assert seen == [mode]


def test_speed_channels_last_sets_the_memory_layout_not_the_result(tmp_path):
    nhwc = make_classifier(tmp_path, "speed.channels_last=true")
    nchw = make_classifier(tmp_path, "speed.channels_last=false")
    kernels = {m: [p for p in m.net.parameters() if p.ndim == 4] for m in (nhwc, nchw)}
    assert len(kernels[nhwc]) == 6
    assert all(
        k.is_contiguous(memory_format=torch.channels_last) and not k.is_contiguous()
        for k in kernels[nhwc]
    )
    assert all(
        k.is_contiguous() and not k.is_contiguous(memory_format=torch.channels_last)
        for k in kernels[nchw]
    )
    x, _ = image_batch()
    with torch.no_grad():  # the same seeded weights: the same logits up to float rounding
        assert torch.allclose(nhwc.eval()(x), nchw.eval()(x), rtol=1e-4, atol=1e-5)
