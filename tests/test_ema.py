"""callbacks=ema (Lightning's EMAWeightAveraging): validation, best.ckpt, the test phase and
evaluate all use the averaged weights, and the checkpoint keeps the raw ones for resume. Resume
parity with EMA is in test_resume.py."""

import pytest
import torch

from cifar_lightning.evaluate import evaluate
from cifar_lightning.model.checkpoint import load_checkpoint
from cifar_lightning.schema import compose
from cifar_lightning.train import train
from tests.conftest import cfg_for

FAST = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "trainer=cpu"]


def _evaluate(ckpt_path, eval_dir, run_dir) -> dict:
    overrides = [f"ckpt_path={ckpt_path}", f"eval_dir={eval_dir}", f"run_dir={run_dir}"]
    return evaluate(compose([*overrides, "device=cpu"], config_name="evaluate"))


def test_the_test_phase_scores_the_average_that_best_ckpt_holds(tiny_layout, tmp_path):
    run = tmp_path / "run"
    ema = ["callbacks=ema", "callbacks.ema.decay=0.9"]
    metrics = train(cfg_for(run, tiny_layout, "trainer.max_epochs=4", "seed=2", *ema, *FAST))
    best = run / "checkpoints" / "best.ckpt"
    ckpt = load_checkpoint(best)
    average, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert [k for k in average if k.endswith("weight") and not torch.equal(average[k], raw[k])]

    evaluated = _evaluate(best, tiny_layout / "test", tmp_path / "eval")
    for key in ("test_accuracy", "test_loss", "f1_macro", "auroc_macro"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key

    # the same checkpoint with the raw weights in place of the average scores otherwise: the
    # test phase above did not score the raw weights (what test(ckpt_path=best) would restore)
    ckpt["state_dict"] = raw
    torch.save(ckpt, tmp_path / "raw.ckpt")
    raw_metrics = _evaluate(tmp_path / "raw.ckpt", tiny_layout / "test", tmp_path / "eval_raw")
    assert raw_metrics["test_loss"] != pytest.approx(metrics["test_loss"], abs=1e-4)
