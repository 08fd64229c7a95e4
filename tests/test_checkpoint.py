"""Loading a trained network back (model/checkpoint.py): load_net on a compiled model's
checkpoint. Refused and foreign checkpoints are tested through the commands (test_cli.py)."""

import subprocess
import sys
from pathlib import Path

import torch

from cifar_lightning.model.checkpoint import load_net
from tests.conftest import CLASSES, image_batch, make_classifier, save_ckpt

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_of_a_compiled_model_loads_with_the_same_outputs(tmp_path):
    # torch.compile wraps the network, so its keys read net._orig_mod.*: load_net must still fit
    # the plain net.
    module = make_classifier(tmp_path, compile=True)
    # constructing it is enough; nothing compiles
    assert any("._orig_mod." in k for k in module.state_dict())
    net, names, _ = load_net(save_ckpt(module, tmp_path / "compiled.ckpt"))
    x, _ = image_batch()
    # same weights; only the memory layout (channels_last in training) differs
    with torch.no_grad():
        assert torch.allclose(net(x), module.net._orig_mod.eval()(x), rtol=1e-5, atol=1e-6)
    assert names == CLASSES


def test_an_inference_copy_scores_as_the_original_and_is_about_half_its_size(tmp_path):
    from cifar_lightning.model.checkpoint import load_checkpoint

    module = make_classifier(tmp_path, tta_flip=True, tta_shift=1)
    full = save_ckpt(module, tmp_path / "full.ckpt")
    ckpt = torch.load(full, weights_only=True)
    # what a fitted SGD checkpoint also holds: momentum buffers as large as the weights
    ckpt["optimizer_states"] = [
        {
            "state": {
                i: {"momentum_buffer": p.detach().clone()}
                for i, p in enumerate(module.parameters())
            }
        }
    ]
    ckpt["callbacks"] = {"History": {"rows": []}}
    # how the run decoded its images, which evaluate and predict decode theirs by
    ckpt["datamodule_hyper_parameters"] = {"image_size": 32, "resize": "pil_bilinear"}
    torch.save(ckpt, full)
    slim = tmp_path / "slim.ckpt"
    r = subprocess.run(
        [sys.executable, "scripts/slim_checkpoint.py", str(full), str(slim)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    kept = load_checkpoint(slim)
    assert set(kept) == {"hyper_parameters", "datamodule_hyper_parameters", "state_dict"}
    assert kept["datamodule_hyper_parameters"] == {"image_size": 32, "resize": "pil_bilinear"}
    assert load_net(slim)[2]["resize"] == "pil_bilinear"
    assert slim.stat().st_size < 0.6 * full.stat().st_size
    x, _ = image_batch()
    (a, *_), (b, *_) = load_net(full), load_net(slim)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    bad = subprocess.run(
        [sys.executable, "scripts/slim_checkpoint.py", str(tmp_path / "none.ckpt"), str(slim)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: ckpt_path={tmp_path / 'none.ckpt'}: no such file"
    ]
