"""Loading a trained network back (model/checkpoint.py): load_net on a compiled model's
checkpoint. Refused and foreign checkpoints are tested through the commands (test_cli.py)."""

import torch

from cifar_lightning.model.checkpoint import load_net
from tests.conftest import CLASSES, image_batch, make_classifier, save_ckpt


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
