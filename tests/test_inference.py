"""inference.py, what evaluate and predict share: choosing the device, and running at the
precision the checkpoint trained at."""

import torch

from cifar_lightning.inference import pick_device


def test_pick_device_auto_follows_cuda_availability(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_autocast_follows_the_precision_the_checkpoint_trained_at():
    from cifar_lightning.inference import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("bf16-mixed", cpu) is autocast_dtype("bf16", cuda) is torch.bfloat16
    assert autocast_dtype("16-mixed", cuda) is torch.float16
    # fp32: fp16 autocast is a GPU's, and checkpoints from before the precision was stored
    for precision, device in [("16-mixed", cpu), ("32-true", cpu), ("32-true", cuda), (None, cpu)]:
        assert autocast_dtype(precision, device) is None


def test_a_bf16_mixed_checkpoint_predicts_its_modules_own_bf16_autocast_logits(tmp_path):
    from cifar_lightning.inference import predict_logits
    from cifar_lightning.model.checkpoint import load_net
    from tests.conftest import image_batch, make_classifier, save_ckpt

    # the default channels_last layout, and the test phase's 6 views
    module = make_classifier(tmp_path, "tta.flip=true", "tta.shift=1", precision="bf16-mixed")
    net, _, hp = load_net(save_ckpt(module, tmp_path / "bf16.ckpt"))
    assert hp["precision"] == "bf16-mixed"
    x, y = image_batch(12)
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's bf16-mixed
        own = module.test_step((x, y), 0).float()
    cpu = torch.device("cpu")
    assert torch.equal(predict_logits(net, x, 5, cpu, hp["precision"]), own)
    # the check can fail: in fp32 the logits differ by about a bf16 step
    assert not torch.allclose(predict_logits(net, x, 5, cpu), own, atol=1e-3)
