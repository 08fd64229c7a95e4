"""The LightningModule: Model S with the notebook's loss, metrics, optimizer and schedule.

Lightning's automatic optimization: training_step returns the loss and the Trainer runs backward,
gradient accumulation, clipping and the optimizer step. Hyperparameters are stored as plain dicts
and lists, so checkpoints load with weights_only=True."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.model.augment import Augment
from cifar_lightning.model.checkpoint import load_teacher
from cifar_lightning.model.init import whiten_first_conv
from cifar_lightning.model.net import build_net, tta_average
from cifar_lightning.model.optim import build_optimizer
from cifar_lightning.model.schedule import build_scheduler
from cifar_lightning.schema import (
    AugmentConfig,
    DistillConfig,
    LossConfig,
    SpeedConfig,
    TestTimeConfig,
    WhitenConfig,
)

STAGES = ("train", "val", "test")


class Classifier(L.LightningModule):
    """Model S (`model`: its constructor's keys) trained with `loss`, `augment`, `optim` and
    `scheduler`, validated and tested on the `tta` views. Each dict holds the keys of its
    schema.py dataclass."""

    def __init__(
        self,
        model: dict,
        optim: dict,
        scheduler: dict,
        class_names: list[str],
        loss: dict,
        augment: dict,
        tta: dict,
        whiten: dict,
        speed: dict,
        monitor: str = "val/loss",
        image_size: int = 32,
        precision: str = "32-true",  # the run's, resolved: evaluate and predict run at it too
        distill: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # loggers get the recipe (loggers.py)
        self.loss_cfg = LossConfig(**loss)
        self.tta = TestTimeConfig(**tta)
        self.whiten = WhitenConfig(**whiten)
        self.speed = SpeedConfig(**speed)
        self.distill = DistillConfig(**(distill or {}))
        # Loaded in setup("fit") and held in a tuple, which nn.Module does not register: the
        # teacher stays out of the student's state_dict, checkpoints, train()/eval() switches and
        # weight averages, and evaluate, predict and export never need its file.
        self.teacher: tuple[torch.nn.Module, ...] = ()
        augment_cfg = AugmentConfig(**augment)
        # alternating_flip: the batch sampler mirrors the images (data/sampler.py), not Augment
        random_flip = augment_cfg.flip and not augment_cfg.alternating_flip
        self.augment = (
            Augment(
                flip=random_flip,
                rotation_deg=augment_cfg.rotation_deg,
                zoom=augment_cfg.zoom,
                translate=augment_cfg.translate,
                crop_pad=augment_cfg.crop_pad,
                cutout=augment_cfg.cutout,
            )
            if augment_cfg.active
            else None
        )
        self.net = build_net(model, image_size, self.speed.channels_last)
        if self.speed.compile:
            self.net = torch.compile(self.net, mode=self.speed.compile_mode)
        n = len(class_names)
        # Keras's "accuracy" is the fraction correct: micro averaging (torchmetrics: macro).
        for stage in STAGES:
            setattr(self, f"{stage}_acc", MulticlassAccuracy(n, average="micro"))
            # nan_strategy="disable": no per-step NaN check, which would sync with the GPU; a NaN
            # loss then shows in the epoch mean, where History stops the run.
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment is not None:
            x = self.augment(x)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.loss_cfg.label_smoothing)
        if self.teacher:
            loss = self.distilled(loss, logits, x)
        if self.loss_cfg.l2:  # Keras kernel_regularizer: part of the loss and of the reported loss
            kernels = (p for p in self.net.parameters() if p.ndim > 1)
            loss = loss + self.loss_cfg.l2 * sum(p.pow(2).sum() for p in kernels)
        self.update_metrics("train", loss.detach(), logits.detach(), y)
        # Logged at the epoch's last batch rather than in on_train_epoch_end, which Lightning
        # calls after the callbacks' (History writes the epoch's row there).
        if self.trainer.is_last_batch:
            self.log_epoch("train")
        return loss

    def distilled(self, label_loss, logits, x) -> torch.Tensor:
        """(1 - w) x the label loss + w x T^2 x KL(teacher || student) at temperature T (Hinton
        et al., arXiv:1503.02531); T^2 keeps the soft term's gradients at the label term's scale.
        The teacher scores the same augmented view as the student, at the run's precision."""
        with torch.no_grad():
            teacher_logits = self.teacher[0](x)
        t, w = self.distill.temperature, self.distill.weight
        soft = F.kl_div(
            F.log_softmax(logits.float() / t, -1),
            F.log_softmax(teacher_logits.float() / t, -1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - w) * label_loss + w * t * t * soft

    def evaluation_step(self, batch, stage: str) -> torch.Tensor:
        """Validation and test: the batch's loss and accuracy into the stage's metrics."""
        x, y = batch
        logits = self.evaluation_logits(x)
        loss = F.cross_entropy(logits, y)  # = Keras sparse CE on the softmax, computed from logits
        self.update_metrics(stage, loss, logits, y)
        return logits

    def evaluation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """What validation and test score: the log of the mean probability over the `tta` views
        (mirrored, shifted), or the plain logits without test-time views."""
        if self.tta.flip or self.tta.shift:
            return tta_average(self, x, self.tta.flip, self.tta.shift, self.tta.shift_along)
        return self(x)

    def validation_step(self, batch, batch_idx):
        self.evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self.evaluation_step(batch, "test")  # callbacks.RunReport keeps the logits

    def update_metrics(self, stage: str, loss, logits, y) -> None:
        # The loss counts once per image, so the epoch loss is the per-image mean, as Keras
        # reports it. (MeanMetric's weight= would be dropped under nan_strategy="disable":
        # torchmetrics issue 3434.) Nothing is read back: no per-step sync with a GPU.
        getattr(self, f"{stage}_loss").update(loss.expand(y.numel()))
        getattr(self, f"{stage}_acc").update(logits, y)

    def log_epoch(self, stage: str) -> None:
        """Log the epoch's metric objects once, not per step: two self.log calls a step cost about
        1.2-1.8 ms of Python on a 2-vCPU AMD EPYC (benchmarks/step_overhead.py), on a GPU as much
        as the step's own kernels. Lightning computes them at the epoch's end (synced over DDP
        ranks) and resets them."""
        for name in ("loss", "acc"):
            metric = getattr(self, f"{stage}_{name}")
            self.log(
                f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=stage == "val"
            )

    def on_fit_start(self):
        if self.teacher:  # the Trainer has moved the student to its device by now
            self.teacher[0].to(self.device)

    def on_train_epoch_start(self):
        # An epoch cut short (max_steps) logged nothing, so Lightning did not reset these.
        self.train_loss.reset()
        self.train_acc.reset()

    def on_test_epoch_end(self):
        self.log_epoch("test")

    def on_validation_epoch_end(self):
        self.log_epoch("val")
        # Lightning would step the plateau schedule after the epoch-end hooks, when last.ckpt is
        # already written; stepped here, every checkpoint holds the post-step schedule and a
        # resumed run cuts the learning rate on the same epochs as an uninterrupted one.
        if self.trainer.sanity_checking:
            return
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ReduceLROnPlateau):
                config.scheduler.step(self.trainer.callback_metrics[self.hparams.monitor])

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not isinstance(scheduler, ReduceLROnPlateau):  # stepped in on_validation_epoch_end
            scheduler.step()

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.distill.teacher and not self.teacher:
            self.teacher = (load_teacher(self.distill.teacher, self.hparams.class_names),)
        # Before Lightning restores a checkpoint (which then replaces these weights on resume),
        # and with no random numbers drawn, so a resumed run's random streams stay aligned.
        if stage == "fit" and self.whiten.enabled:
            images = self.trainer.datamodule.first_train_images(self.whiten.images)
            whiten_first_conv(self.net.features[0], images.to(self.device))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optim, self.net)
        if self.hparams.scheduler.get("_target_") is None:
            return optimizer
        scheduler, interval = build_scheduler(
            self.hparams.scheduler, optimizer, lambda: self.trainer.estimated_stepping_batches
        )
        lr_scheduler = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            # Lightning requires the monitor; strict=False: an epoch without validation
            # (trainer.check_val_every_n_epoch) has none yet, and lr_scheduler_step skips it anyway
            lr_scheduler.update(monitor=self.hparams.monitor, strict=False)
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
