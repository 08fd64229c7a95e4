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
