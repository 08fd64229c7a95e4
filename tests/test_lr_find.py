"""cifar-lr-find: Lightning's learning-rate finder driving the Classifier's optimizer (Lightning's
automatic optimization). The rate it records is the rate each optimizer step ran at, growing at
every step, its schedule is stepped once per step, its losses are the steps' own, and
lr_find.png, .csv and .json are written."""

import json
import math
import re

import pytest
import torch

import cifar_lightning.build as build
from cifar_lightning.errors import UserError
from cifar_lightning.lr_find import lr_find
from cifar_lightning.model.module import Classifier
from cifar_lightning.report.files import read_csv
from cifar_lightning.schema import compose
from tests.conftest import run_cli

MIN_LR, MAX_LR, STEPS = 1e-6, 1e-2, 20


def lr_find_cfg(run_dir, data_root, *overrides):
    return compose(
        [
            f"run_dir={run_dir}",
            f"data.root={data_root}",
            "trainer=cpu",
            "callbacks.progress_bar.refresh_rate=0",
            *overrides,
        ],
        config_name="lr_find",
    )


class Recording(Classifier):
    """Records the learning rate of every optimizer step (a pre-step hook) and the loss each
    training_step returned."""

    made: list = []

    def configure_optimizers(self):
        out = super().configure_optimizers()
        optimizer = out["optimizer"] if isinstance(out, dict) else out
        self.step_lrs, self.losses = [], []
        self.initial = {k: v.clone() for k, v in self.state_dict().items()}
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.step_lrs.append([g["lr"] for g in opt.param_groups])
        )
        Recording.made.append(self)
        return out

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def test_the_finder_drives_the_optimizer_step(tiny_layout, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "Classifier", Recording)
    Recording.made = []
    result = lr_find(
        lr_find_cfg(
            tmp_path,
            tiny_layout,
            f"min_lr={MIN_LR}",
            f"max_lr={MAX_LR}",
            f"num_training={STEPS}",
            "early_stop_threshold=null",  # all 20 steps, whatever the loss does
            "data.batch_size=16",  # 8 batches an epoch: the search crosses epoch ends
        )
    )
    rows = read_csv(tmp_path / "lr_find.csv")
    lrs, losses = [float(r["lr"]) for r in rows], [float(r["loss"]) for r in rows]
    assert len(lrs) == STEPS == result["steps"]
    assert all(b > a for a, b in zip(lrs, lrs[1:])) and lrs[-1] / lrs[0] >= 1e3
    assert all(math.isfinite(x) for x in losses)
    # every optimizer step ran at the rate the finder recorded for it (one param group: Adam's
    # and RMSprop's; SGD's second group, without decay, follows the same schedule)
    (module,) = Recording.made
    assert [g[0] for g in module.step_lrs] == lrs
    assert all(len(set(g)) == 1 for g in module.step_lrs)
    # stepped once per step: Lightning's exponential schedule is min * (max/min) ** ((k+1)/n)
    # after k steps (its first step is at min); twice would skip rates, never would stay at min
    expected = [MIN_LR] + [MIN_LR * (MAX_LR / MIN_LR) ** ((k + 1) / STEPS) for k in range(1, STEPS)]
    assert lrs == pytest.approx(expected, rel=1e-9) and lrs[-1] == pytest.approx(MAX_LR)
    # the losses are the steps' own, smoothed as Lightning does (beta 0.98, bias-corrected at
    # global_step + 1, which is k + 2 after step k)
    avg, smoothed = 0.0, []
    for k, loss in enumerate(module.losses):
        avg = 0.98 * avg + 0.02 * loss
        smoothed.append(avg / (1 - 0.98 ** (k + 2)))
    assert losses == pytest.approx(smoothed, rel=1e-6)
    png = (tmp_path / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved == result and MIN_LR <= saved["suggestion"] <= MAX_LR
    # the finder restores what it trained: the weights end as they started, its file is gone
    for k, v in module.state_dict().items():
        assert torch.equal(v, module.initial[k]), k
    assert not list(tmp_path.glob(".lr_find_*.ckpt"))


@pytest.mark.slow
def test_the_finder_from_the_command_line(tiny_layout, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "cifar_lightning.lr_find",
        f"data.root={tiny_layout}",
        "num_training=15",
        "max_lr=0.01",
        "optim=adam",
        "callbacks.progress_bar.refresh_rate=0",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "suggested learning rate" in res.stdout + res.stderr
    for name in ("lr_find.png", "lr_find.csv", "lr_find.json", ".hydra/config.yaml"):
        assert (run / name).exists(), name
    assert json.loads((run / "lr_find.json").read_text())["optim"] == "torch.optim.Adam"


@pytest.mark.parametrize(
    "override,message",
    [
        ("min_lr=0", "min_lr=0.0: must be > 0"),
        ("max_lr=1e-7", "max_lr=1e-07: must be above min_lr=1e-06"),
        ("num_training=1", "num_training=1: must be >= 2"),
        ("mode=cosine", "mode=cosine: is not one of: exponential, linear"),
        ("early_stop_threshold=0.5", "early_stop_threshold=0.5: must be > 1"),
        (
            "debug=fdr",
            "trainer.fast_dev_run=True: Lightning skips the learning-rate finder under it; run "
            "without debug=fdr",
        ),
        (
            "trainer.gradient_clip_val=-1",
            "trainer.gradient_clip_val=-1: must be a number > 0 (null: no clipping)",
        ),
    ],
)
def test_a_finder_value_of_the_wrong_kind_is_named_before_anything_runs(
    override, message, tmp_path
):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        lr_find(lr_find_cfg(tmp_path / "run", tmp_path / "no_data", override))
    assert not (tmp_path / "run").exists()


def test_a_wrong_value_is_one_error_line(tmp_path):
    # a value of the wrong type is refused while the config is composed, before lr_find runs
    res = run_cli("cifar_lightning.lr_find", "data.root=nowhere", "max_lr=abc", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: max_lr: Value 'abc' of type 'str' could not be converted to Float"
    )
    assert not (tmp_path / "outputs").exists()
