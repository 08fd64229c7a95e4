"""Keras's ReduceLROnPlateau, expressed with torch's scheduler: the one place where its counting
is converted; and the one-cycle schedule."""

from __future__ import annotations

import inspect

import torch

from cifar_lightning.errors import UserError
from cifar_lightning.targets import complete, instantiate

COUNTINGS = ("keras", "torch")  # scheduler.counting: whose plateau patience and threshold rules
# scheduler.anneal_strategy: one-cycle's curve in both phases, the warm-up and the decay
ANNEALS = ("cos", "linear")


def build_scheduler(cfg: dict, optimizer, total_steps) -> tuple[object, str]:
    """(scheduler, Lightning interval) from a scheduler config. A schedule that takes
    `total_steps` (one-cycle) is planned over the whole fit, total_steps() optimizer steps, and
    stepped after each of them; any other after each epoch."""
    partial = instantiate(cfg, "scheduler")
    if "total_steps" not in inspect.signature(partial.func).parameters:
        return complete(partial, "scheduler", optimizer), "epoch"
    return complete(partial, "scheduler", optimizer, total_steps=int(total_steps())), "step"


def reduce_on_plateau(
    optimizer,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 3,
    min_delta: float = 1e-4,
    counting: str = "keras",
):
    """Keras counts `wait` up each epoch without improvement and cuts when wait >= patience;
    torch cuts when num_bad_epochs > patience. So Keras patience 3 is torch patience 2. Keras
    patience 0 cuts, like 1, on each epoch without improvement (wait 1 >= 0), never on an improving
    one: torch patience 0, not -1 (which would cut every epoch).
    Keras's min_delta is absolute: improvement means val_loss < best - min_delta.
    counting="torch" gives torch's own rule: its patience, relative threshold."""
    # eps=0: Keras cuts however small the LR; torch stops below a 1e-8 change
    if counting == "keras":
        torch_patience, threshold_mode, eps = max(patience - 1, 0), "abs", 0.0
    elif counting == "torch":  # PyTorch's own defaults: its counting, relative threshold
        torch_patience, threshold_mode, eps = patience, "rel", 1e-8
    else:
        raise UserError(f"scheduler.counting={counting} is not one of: {', '.join(COUNTINGS)}")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode=mode,
        factor=factor,
        patience=torch_patience,
        threshold=min_delta,
        threshold_mode=threshold_mode,
        cooldown=0,
        min_lr=0.0,
        eps=eps,
    )


def one_cycle(
    optimizer,
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    cycle_momentum: bool = False,
    anneal_strategy: str = "cos",
):
    """Warm up from max_lr / div_factor to max_lr for pct_start of the steps, then decay to
    max_lr / div_factor / final_div_factor; stepped every batch. anneal_strategy (cos or linear)
    shapes both: torch's OneCycleLR interpolates each phase with it."""
    # torch divides by the warm-up's length, pct_start * total_steps - 1: a run that short
    # (a tiny dataset, one epoch) would die in the first step with ZeroDivisionError.
    if not 0 < pct_start < 1 or pct_start * total_steps <= 1:
        raise UserError(
            f"scheduler.pct_start={pct_start} leaves no warm-up in {total_steps} steps: one-cycle "
            "needs 0 < pct_start < 1 and pct_start x steps > 1 (more epochs or a smaller "
            "data.batch_size)"
        )
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
        anneal_strategy=anneal_strategy,
    )
