"""The learning-rate schedules (model/schedule.py): the notebook's val_loss log replayed through
the configured plateau schedule and early stopping, Keras's counting and absolute min_delta against
torch's, a one-cycle schedule too short to warm up, how a cut is announced, and the plateau
schedule in whole training runs (validating every epoch or every 2, resumed or not)."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import OmegaConf
from torch import nn

from cifar_lightning.errors import UserError
from cifar_lightning.model.schedule import build_scheduler
from cifar_lightning.notebook import VAL_LOSS as NOTEBOOK_VAL_LOSS
from cifar_lightning.report.files import read_csv
from cifar_lightning.train import train
from tests.conftest import cfg_for


def replay(cfg):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, _ = build_scheduler(OmegaConf.to_container(cfg.scheduler, resolve=True), opt, None)
    es_cfg = {k: v for k, v in cfg.callbacks.early_stopping.items() if k != "_target_"}
    stop = EarlyStopping(**es_cfg)
    cuts, lrs, stopped_after = [], [], None
    for epoch, loss in enumerate(NOTEBOOK_VAL_LOSS, start=1):
        before = opt.param_groups[0]["lr"]
        sched.step(loss)
        if opt.param_groups[0]["lr"] < before:
            cuts.append(epoch)
            lrs.append(opt.param_groups[0]["lr"])
        should_stop, _ = stop._evaluate_stopping_criteria(torch.tensor(loss))
        if should_stop and stopped_after is None:
            stopped_after = epoch
    return cuts, lrs, stopped_after


def test_keras_counting_reproduces_the_notebook(tmp_path):
    cuts, lrs, stopped_after = replay(cfg_for(tmp_path, tmp_path))
    assert cuts == [8, 12, 16, 19]
    assert [round(lr, 12) for lr in lrs] == [1e-4, 1e-5, 1e-6, 1e-7]
    assert stopped_after == 19


def keras_cuts(losses: list[float], patience: int, min_delta: float = 1e-4) -> list[int]:
    """Keras's ReduceLROnPlateau.on_epoch_end (cooldown 0): the epochs after which it cuts."""
    best, wait, cuts = float("inf"), 0, []
    for epoch, loss in enumerate(losses, start=1):
        if loss < best - min_delta:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                cuts.append(epoch)
                wait = 0
    return cuts


@pytest.mark.parametrize("patience", [0, 1, 2, 3, 5])
def test_keras_counting_matches_keras_for_every_patience(patience, tmp_path):
    # patience 0 must not become torch patience -1, which cuts on every epoch, improving ones too
    cuts, _, _ = replay(cfg_for(tmp_path, tmp_path, f"scheduler.patience={patience}"))
    assert cuts == keras_cuts(NOTEBOOK_VAL_LOSS, patience)
    assert 1 not in cuts  # the first epoch always improves


def test_torch_counting_differs(tmp_path):
    # torch cuts when bad epochs > patience, i.e. after 4 bad epochs in a row, not 3: the runs of
    # 3 after epochs 5 and 9 (each ended by an improvement at 9 and 13) cut nothing; 14-17 cut
    # after 17.
    cuts, _, _ = replay(cfg_for(tmp_path, tmp_path, "fidelity=torch"))
    assert cuts == [17]


def test_one_cycle_too_short_is_a_user_error_not_a_zero_division(tmp_path):
    cfg = OmegaConf.to_container(
        cfg_for(tmp_path, tmp_path, "experiment=best").scheduler, resolve=True
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match=r"scheduler.pct_start=0.25 leaves no warm-up in 4 steps"):
        build_scheduler(cfg, opt, lambda: 4)  # tiny data, one epoch: torch would divide by zero
    sched, interval = build_scheduler(cfg, opt, lambda: 12)
    lrs = []
    for _ in range(12):  # the LR each of the 12 steps trains with
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert interval == "step" and max(lrs) == pytest.approx(0.1) and lrs[-1] < 1e-4


@pytest.mark.parametrize("scheduler,printed", [("plateau", True), ("onecycle", False)])
def test_a_cut_is_announced_as_keras_did_only_for_the_plateau_schedule(
    scheduler, printed, tmp_path, caplog
):
    # One-cycle lowers the learning rate every step of its second half: that is not a plateau cut.
    from types import SimpleNamespace

    from lightning.pytorch.utilities.types import LRSchedulerConfig

    from cifar_lightning.callbacks import History

    cfg = cfg_for(tmp_path, tmp_path, f"scheduler={scheduler}")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, _ = build_scheduler(
        OmegaConf.to_container(cfg.scheduler, resolve=True), opt, lambda: 100
    )
    trainer = SimpleNamespace(
        optimizers=[opt], lr_scheduler_configs=[LRSchedulerConfig(sched)], current_epoch=0
    )
    caplog.set_level("INFO", logger="cifar_lightning")
    history = History(tmp_path / "history.csv")
    history.on_train_epoch_start(trainer, None)
    opt.param_groups[0]["lr"] /= 10
    trainer.current_epoch = 1
    history.on_train_epoch_start(trainer, None)
    assert ("ReduceLROnPlateau reducing learning rate" in caplog.text) is printed


def _container(node):
    return OmegaConf.to_container(node, resolve=True)


def _plateau_cuts(cfg, losses):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched, _ = build_scheduler(_container(cfg.scheduler), opt, None)
    cuts = []
    for epoch, loss in enumerate(losses, start=1):
        before = opt.param_groups[0]["lr"]
        sched.step(loss)
        if opt.param_groups[0]["lr"] < before:
            cuts.append(epoch)
    return cuts


def test_plateau_min_delta_is_absolute_1e4(tmp_path):
    # Keras: improvement means val_loss < best - 1e-4 (absolute). A loss near 0.1 falling 3e-5 an
    # epoch never gets 1e-4 below its best within 3 epochs, so Keras cuts after epoch 4. A relative
    # threshold (1e-4 x 0.1 = 1e-5) or none at all would count every epoch as an improvement. (Near
    # a loss of 1.0 relative and absolute thresholds coincide, hence 0.1.)
    losses = [0.1 - 3e-5 * i for i in range(5)]
    assert _plateau_cuts(cfg_for(tmp_path, tmp_path), losses) == [4]
    assert _plateau_cuts(cfg_for(tmp_path, tmp_path, "scheduler.min_delta=0"), losses) == []


def test_one_cycle_linear_anneals_in_a_straight_line_after_the_peak():
    from cifar_lightning.model.schedule import one_cycle

    def decay_steps(anneal_strategy: str) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        schedule = one_cycle(optimizer, 1.0, 101, pct_start=0.2, anneal_strategy=anneal_strategy)
        lrs = []
        for _ in range(100):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        assert max(lrs) == pytest.approx(1.0, rel=0.01) and lrs[-1] == pytest.approx(1e-4 / 25)
        return [b - a for a, b in zip(lrs[20:], lrs[21:])]  # after the peak at step 19.2

    linear = decay_steps("linear")
    assert max(linear) - min(linear) < 1e-9 and max(linear) < 0
    cosine = decay_steps("cos")  # the default bends
    assert max(cosine) - min(cosine) > 1e-3


def test_one_cycle_anneal_strategy_shapes_the_warm_up_too():
    from cifar_lightning.model.schedule import one_cycle

    def warm_up_steps(anneal_strategy: str) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        schedule = one_cycle(optimizer, 1.0, 101, pct_start=0.2, anneal_strategy=anneal_strategy)
        lrs = []
        for _ in range(20):  # the warm-up ends at step 19.2
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert lrs[0] == pytest.approx(1.0 / 25)
        return [b - a for a, b in zip(lrs, lrs[1:])]

    linear = warm_up_steps("linear")
    assert max(linear) - min(linear) < 1e-9 and min(linear) > 0
    cosine = warm_up_steps("cos")
    assert max(cosine) - min(cosine) > 1e-3 and min(cosine) > 0


# A whole run whose val/loss plateaus: no change of val/loss can meet min_delta=100, so every
# validation after the first is one without improvement, whatever the tiny data does. A narrow
# Model S: the schedule does not depend on the width, and each step costs a fraction.
PLATEAU_RUN = [
    "seed=3",
    "trainer.deterministic=true",
    "model.widths=[8,16,16]",
    "model.hidden=32",
    "scheduler.patience=2",
    "scheduler.min_delta=100",
    "test=false",
    "logger=none",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer=cpu",
]


def _rows(run_dir) -> list[dict]:
    """history.csv without the timings."""
    rows = read_csv(run_dir / "history.csv")
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]


def _cut_after(rows: list[dict]) -> list[int]:
    """The epochs after which the learning rate fell: history.csv's lr is each epoch's rate."""
    lrs = [float(r["lr"]) for r in rows]
    return [epoch for epoch, (a, b) in enumerate(zip(lrs, lrs[1:]), start=1) if b < a]


@pytest.mark.slow
@pytest.mark.parametrize("every, epochs, cut_after", [(1, 6, [3, 5]), (2, 7, [6])])
def test_a_training_run_cuts_where_keras_would_counting_validations(
    every, epochs, cut_after, tiny_layout, tmp_path
):
    # Keras's rule (keras_cuts) applied to the validations that ran gives the epochs of the cuts:
    # with validation every 2 epochs, patience counts validations, not epochs.
    train(
        cfg_for(
            tmp_path,
            tiny_layout,
            f"trainer.max_epochs={epochs}",
            f"trainer.check_val_every_n_epoch={every}",
            *PLATEAU_RUN,
        )
    )
    rows = _rows(tmp_path)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    validated = [r for r in rows if not math.isnan(float(r["val_loss"]))]
    assert [int(r["epoch"]) for r in validated] == list(range(every, epochs + 1, every))
    losses = [float(r["val_loss"]) for r in validated]
    expected = [int(validated[k - 1]["epoch"]) for k in keras_cuts(losses, 2, min_delta=100)]
    assert _cut_after(rows) == expected == cut_after
    assert [float(r["lr"]) for r in rows[cut_after[0] - 1 : cut_after[0] + 1]] == pytest.approx(
        [1e-3, 1e-4]
    )


def _interrupted_and_whole(tiny_layout, tmp_path) -> tuple[list[dict], list[dict]]:
    """history.csv of a run validating every 2 epochs: stopped after epoch 5 and resumed from its
    last.ckpt up to epoch 7, and uninterrupted. Validations after epochs 2, 4 and 6: the first
    improves, 4 and 6 don't, so the cut after epoch 6 comes after the resume, and only if the
    resumed schedule kept its count from epoch 4."""
    every_2 = ["trainer.check_val_every_n_epoch=2", *PLATEAU_RUN]
    train(cfg_for(tmp_path / "whole", tiny_layout, "trainer.max_epochs=7", *every_2))
    train(cfg_for(tmp_path / "parts", tiny_layout, "trainer.max_epochs=5", *every_2))
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    resume = [f"resume={last}", "trainer.max_epochs=7", *every_2]
    train(cfg_for(tmp_path / "ignored", tiny_layout, *resume))
    return _rows(tmp_path / "parts"), _rows(tmp_path / "whole")


@pytest.mark.slow
def test_a_resumed_run_cuts_on_the_same_epoch_with_validation_every_2_epochs(tiny_layout, tmp_path):
    resumed, whole = _interrupted_and_whole(tiny_layout, tmp_path)
    assert len(resumed) == len(whole) == 7 and _cut_after(whole) == [6]
    # the rate each epoch after the resume trained at (epochs 5 to 7): the cut after epoch 6
    after_resume = [[float(r["lr"]) for r in rows[4:]] for rows in (resumed, whole)]
    assert after_resume[0] == after_resume[1] == pytest.approx([1e-3, 1e-3, 1e-4])


@pytest.mark.slow
def test_a_resumed_run_trains_as_an_uninterrupted_one_with_validation_every_2_epochs(
    tiny_layout, tmp_path
):
    """last.ckpt is written after History's row (save_on_train_epoch_end), also on an epoch with
    validation, so the resumed history and training match the whole run's."""
    resumed, whole = _interrupted_and_whole(tiny_layout, tmp_path)
    assert resumed == whole
