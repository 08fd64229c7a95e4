"""The speed options compose with the rest: bf16-mixed precision and torch.compile."""
import pytest
import torch

from cifar_lightning.model.module import Classifier
from cifar_lightning.train import train
from omegaconf import OmegaConf
from tests.conftest import cfg_for

FAST = ["logger=none", "trainer.max_epochs=1"]


def test_bf16_mixed_trains_and_tests(tiny_layout, tmp_path):
    m = train(cfg_for(tmp_path, tiny_layout, "trainer.precision=bf16-mixed", *FAST))
    assert m["epochs_run"] == 1 and 0 <= m["test_accuracy"] <= 1 and m["test_loss"] == m["test_loss"]


def test_compile_option_builds_a_compiled_network(tmp_path):
    cfg = cfg_for(tmp_path, tmp_path, "model.compile=true")
    module = Classifier(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.optim),
                        OmegaConf.to_container(cfg.scheduler), [str(i) for i in range(10)])
    assert isinstance(module.net, torch._dynamo.eval_frame.OptimizedModule)
    # the checkpoint keys stay loadable by evaluate/predict (they strip "_orig_mod.")
    assert any("_orig_mod." in k for k in module.state_dict())


@pytest.mark.slow
def test_compiled_and_bf16_training_together(tiny_layout, tmp_path):
    m = train(cfg_for(tmp_path, tiny_layout, "model.compile=true", "trainer.precision=bf16-mixed", *FAST))
    assert m["epochs_run"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU: pytest tests/test_speed_options.py)")
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


def test_step_overhead_script_times_the_three_loops():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "scripts/step_overhead.py", "--steps", "30", "--rounds", "2"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {f[0]: f for f in (line.split() for line in res.stdout.splitlines()) if f and f[0] in ("a", "c", "c-log")}
    assert set(rows) == {"a", "c", "c-log"}
    assert all(float(f[1]) > 0 and len(f) == 6 for f in rows.values())  # median, over a, a/x, 2 rounds
    assert float(rows["a"][2]) == 0 and float(rows["c"][3]) == pytest.approx(float(rows["a"][1]) / float(rows["c"][1]), abs=0.01)
