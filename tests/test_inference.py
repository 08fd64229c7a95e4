"""inference.py, what evaluate and predict share: choosing the device."""

import torch

from cifar_lightning.inference import pick_device


def test_pick_device_auto_follows_cuda_availability(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
