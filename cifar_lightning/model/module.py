"""The LightningModule: loss, torchmetrics, optimizer and plateau schedule around Model S.

Hyperparameters are stored as plain dicts and lists, so checkpoints load with weights_only=True."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.config import complete, instantiate
from cifar_lightning.model.augment import Augment
from cifar_lightning.model.net import build_net, flip_average
from cifar_lightning.model.schedule import build_scheduler


class Classifier(L.LightningModule):
    def __init__(self, model: dict, optim: dict, scheduler: dict | None, class_names: list[str],
                 monitor: str = "val/loss", image_size: int = 32, resize: str = "tf_bilinear"):
        # resize (fidelity.resize) is not used here: it is kept in the checkpoint, so that evaluate and
        # predict decode images as training did
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(model, image_size)
        self.channels_last = bool(model.get("channels_last"))
        self.l2 = float(model.get("l2", 0.0))
        self.label_smoothing = float(model.get("label_smoothing", 0.0))
        self.tta_flip = bool(model.get("tta_flip", False))
        self.augment = Augment(**model["augment"]) if model.get("augment") else None
        if model.get("compile"):
            self.net = torch.compile(self.net, mode=model.get("compile_mode", "default"))
        n = len(class_names)
        # Keras's "accuracy" is the fraction correct: micro averaging (torchmetrics defaults to macro).
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(n, average="micro") for _ in range(3))
        # nan_strategy="disable": no per-step NaN check, which would sync with the GPU; a NaN loss
        # then shows in the epoch mean, where History stops the run.
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets _current_fx_name around every hook, ~44 times a training step. nn.Module's
        # __setattr__ first checks the value against Parameter, Module and Buffer (Python-level
        # isinstance hooks): ~7 us a call here, 0.3 ms a step, against ~1.6 ms a step at 40,000
        # images/s on a GPU. The value is a str or None, so a plain set does the same.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch, stage: str):
        x, y = batch
        if stage == "train" and self.augment is not None:
            x = self.augment(x)
        # test-time augmentation: the mean probability with the mirror image
        logits = flip_average(self, x) if stage != "train" and self.tta_flip else self(x)
        # = Keras sparse CE on the softmax, computed from logits
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        if stage == "train" and self.l2:  # Keras kernel_regularizer: part of the loss and of the reported loss
            loss = loss + self.l2 * sum(p.pow(2).sum() for p in self.net.parameters() if p.ndim > 1)
        # Epoch means accumulate on the device, with no per-step .item() sync. The loss counts once per
        # image, so the epoch loss is the per-image mean, as Keras reports it. (MeanMetric's weight=
        # would be dropped under nan_strategy="disable": torchmetrics issue 3434.)
        getattr(self, f"{stage}_loss").update(loss.detach().expand(y.numel()))
        getattr(self, f"{stage}_acc").update(logits, y)
        if stage == "train" and self.trainer.is_last_batch:
            self._log_epoch("train")
        return loss, logits

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's metric objects once, not per step: two self.log calls per step cost about
        1.2-1.8 ms of Python on this project's 2-core CPU (scripts/step_overhead.py), on a GPU as much as
        the step's own kernels. Lightning computes them at the epoch's end (synced over DDP ranks)
        and resets them."""
        for name in ("loss", "acc"):  # on_epoch: the default in training_step is per step
            self.log(f"{stage}/{name}", getattr(self, f"{stage}_{name}"), on_step=False, on_epoch=True,
                     prog_bar=stage == "val")

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")[0]

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        _, logits = self._step(batch, "test")
        self.test_outputs.append((logits.float().cpu(), batch[1].cpu()))

    def on_train_epoch_start(self):
        # An epoch cut short (max_steps) logged nothing, so Lightning did not reset these.
        self.train_loss.reset()
        self.train_acc.reset()

    def on_test_epoch_start(self):
        self.test_outputs = []

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def on_validation_epoch_end(self):
        self._log_epoch("val")
        # Step the plateau schedule here, not where Lightning would (after the epoch-end hooks, when
        # last.ckpt is already written): then every checkpoint holds the post-step schedule, and a
        # resumed run cuts the learning rate on the same epochs as an uninterrupted one.
        if self.trainer.sanity_checking:
            return
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ReduceLROnPlateau):
                config.scheduler.step(self.trainer.callback_metrics[config.monitor])

    def lr_scheduler_step(self, scheduler, metric):
        if not isinstance(scheduler, ReduceLROnPlateau):  # plateau: stepped in on_validation_epoch_end
            scheduler.step()

    def configure_optimizers(self):
        optimizer = complete(instantiate(self.hparams.optim, "optim"), "optim", params=self.parameters())
        scheduler_cfg = self.hparams.scheduler
        if not scheduler_cfg or scheduler_cfg.get("_target_") is None:
            return optimizer
        scheduler, interval = build_scheduler(scheduler_cfg, optimizer, lambda: self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor, "interval": interval}}

