"""Keras's ReduceLROnPlateau, expressed with torch's scheduler. The one place counting is converted."""
from __future__ import annotations

import torch

from cifar_lightning.errors import UserError


def reduce_on_plateau(optimizer, mode: str = "min", factor: float = 0.1, patience: int = 3,
                      min_delta: float = 1e-4, counting: str = "keras"):
    """Keras counts `wait` up each epoch without improvement and cuts when wait >= patience;
    torch cuts when num_bad_epochs > patience. So Keras patience 3 is torch patience 2.
    Keras's min_delta is absolute: improvement means val_loss < best - min_delta.
    counting="torch" gives torch's own rule: its patience, relative threshold."""
    if counting == "keras":
        torch_patience, threshold_mode = patience - 1, "abs"
    elif counting == "torch":  # PyTorch's own defaults: its counting, relative threshold
        torch_patience, threshold_mode = patience, "rel"
    else:
        raise UserError(f"scheduler.counting={counting} is not one of: keras, torch")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=factor, patience=torch_patience,
        threshold=min_delta, threshold_mode=threshold_mode, cooldown=0, min_lr=0.0)
