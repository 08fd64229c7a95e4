"""The LightningModule: loss, torchmetrics, optimizer and plateau schedule around Model S.

Hyperparameters are stored as plain dicts and lists, so checkpoints load with weights_only=True."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.errors import UserError
from cifar_lightning.model.augment import Augment
from cifar_lightning.model.graphed import CheapHookBookkeeping, GraphedStep
from cifar_lightning.model.init import whiten_first_conv
from cifar_lightning.model.net import build_net, tta_average
from cifar_lightning.model.optim import build_optimizer
from cifar_lightning.model.schedule import build_scheduler


class Classifier(CheapHookBookkeeping, L.LightningModule):
    """Model S with the notebook's loss and metrics. `training_step` is ours (manual
    optimization): one optimizer step, eager, or replayed as one CUDA graph when
    graphed.CudaGraphSteps has set `graphed` for the fit (model.cuda_graph=true)."""

    def __init__(
        self,
        model: dict,
        optim: dict,
        scheduler: dict | None,
        class_names: list[str],
        monitor: str = "val/loss",
        image_size: int = 32,
        # trainer.precision the run trains at (build_module), for evaluate and predict; None in
        # checkpoints from before it was stored
        precision: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # loggers get the recipe (loggers.py)
        self.automatic_optimization = False
        self.net = build_net(model, image_size)
        self.channels_last = bool(model.get("channels_last"))
        self.l2 = float(model.get("l2", 0.0))
        self.label_smoothing = float(model.get("label_smoothing", 0.0))
        self.tta_flip = bool(model.get("tta_flip", False))
        self.tta_shift = int(model.get("tta_shift") or 0)  # pixels
        self.augment = Augment(**model["augment"]) if model.get("augment") else None
        self.compiled = bool(model.get("compile"))
        if self.compiled:
            self.net = torch.compile(self.net, mode=model.get("compile_mode", "default"))
        self.graphed: GraphedStep | None = None  # set per fit by CudaGraphSteps
        n = len(class_names)
        # Keras's "accuracy" is the fraction correct: micro averaging (torchmetrics: macro).
        self.val_acc, self.test_acc = (MulticlassAccuracy(n, average="micro") for _ in range(2))
        # nan_strategy="disable": no per-step NaN check, which would sync with the GPU; a NaN loss
        # then shows in the epoch mean, where History stops the run.
        self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(2))
        # Training sums loss x images and correct images on the device, in place (a captured step
        # adds to the same tensor), and hands the epoch's means to these two at its last batch.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MeanMetric(nan_strategy="disable")
        self.train_sums: torch.Tensor | None = None
        self.train_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch, stage: str):
        """Validation and test: loss and accuracy of one batch into the stage's metrics."""
        x, y = batch
        # test-time augmentation: the mean probability over mirrored and shifted views
        if self.tta_flip or self.tta_shift:
            logits = tta_average(self, x, self.tta_flip, self.tta_shift)
        else:
            logits = self(x)
        loss = F.cross_entropy(logits, y)  # = Keras sparse CE on the softmax, computed from logits
        # Epoch means accumulate on the device, with no per-step .item() sync. The loss counts once
        # per image, so the epoch loss is the per-image mean, as Keras reports it. (MeanMetric's
        # weight= would be dropped under nan_strategy="disable": torchmetrics issue 3434.)
        getattr(self, f"{stage}_loss").update(loss.detach().expand(y.numel()))
        getattr(self, f"{stage}_acc").update(logits, y)
        return loss, logits

    def train_loss_and_logits(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is not None:
            x = self.augment(x)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.l2:  # Keras kernel_regularizer: part of the loss and of the reported loss
            loss = loss + self.l2 * sum(p.pow(2).sum() for p in self.net.parameters() if p.ndim > 1)
        return loss, logits

    def train_step(self, x: torch.Tensor, y: torch.Tensor, backward, optimizer) -> torch.Tensor:
        """One optimizer step, all in place and nothing read back: what a CUDA graph captures.
        Returns the step's loss, detached (a device tensor: reading it is the caller's sync)."""
        optimizer.zero_grad(set_to_none=True)
        loss, logits = self.train_loss_and_logits(x, y)
        backward(loss)
        self.clip(optimizer)
        optimizer.step()
        loss = loss.detach()
        correct = (logits.argmax(1) == y).sum().double()
        self.train_sums.add_(torch.stack([loss.double() * len(y), correct]))
        return loss

    def clip(self, optimizer) -> None:
        """model.grad_clip: clip the gradients between backward and the optimizer step, by their
        total norm (grad_clip_algorithm=norm) or each value (value), through Lightning's precision
        plugin. Manual optimization has no Trainer(gradient_clip_val). Both torch functions run
        on the device with nothing read back (the norm's clip factor is a tensor, no
        error_if_nonfinite check), so a CUDA graph captures them as part of the step."""
        limit = self.hparams.model.get("grad_clip")
        if limit:
            algorithm = self.hparams.model.get("grad_clip_algorithm") or "norm"
            self.clip_gradients(
                optimizer, gradient_clip_val=limit, gradient_clip_algorithm=algorithm
            )

    def on_train_start(self) -> None:
        # (on_train_start, not on_fit_start: Lightning's learning-rate finder runs from a
        # callback's on_fit_start and then calls this one, not the module's on_fit_start.)
        # 16-mixed's GradScaler unscales the gradients inside optimizer.step, after clip(), and
        # refuses a second unscale_: clipping here would cut the loss-scaled gradients.
        limit = self.hparams.model.get("grad_clip")
        if limit and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise UserError(
                f"model.grad_clip={limit} with trainer.precision={self.trainer.precision}: the "
                "gradients are still loss-scaled where the Classifier clips them; use "
                "trainer.precision=bf16-mixed or 32-true, or model.grad_clip=null"
            )

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """train_step through Lightning's backward and optimizer: counted, precision-aware."""
        return self.train_step(x, y, self.manual_backward, self.optimizers())

    def training_step(self, batch, batch_idx):
        """One optimizer step; returns its loss, detached and not read back, for Lightning's
        `outputs` (callbacks' on_train_batch_end, the learning-rate finder). A replayed CUDA
        graph returns the tensor it writes: the next replay overwrites it (clone to keep it)."""
        x, y = batch
        loss = (self.graphed or self.eager_step)(x, y)
        self.train_images += len(y)
        # manual optimization: Lightning steps none
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "step":
                config.scheduler.step()
        if self.trainer.is_last_batch:
            means = self.train_sums / self.train_images
            self.train_loss.update(means[0])
            self.train_acc.update(means[1])
            self._log_epoch("train")
        return loss

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's metric objects once, not per step: two self.log calls a step cost about
        1.2-1.8 ms of Python on a 2-vCPU AMD EPYC (scripts/step_overhead.py), on a GPU as much as
        the step's own kernels. Lightning computes them at the epoch's end (synced over DDP
        ranks) and resets them."""
        for name in ("loss", "acc"):  # on_epoch: the default in training_step is per step
            self.log(
                f"{stage}/{name}",
                getattr(self, f"{stage}_{name}"),
                on_step=False,
                on_epoch=True,
                prog_bar=stage == "val",
            )

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        _, logits = self._step(batch, "test")
        return logits  # for callbacks.RunReport: predictions.csv and the figures

    def on_train_epoch_start(self):
        # An epoch cut short (max_steps) logged nothing, so Lightning did not reset these.
        self.train_loss.reset()
        self.train_acc.reset()
        if self.train_sums is None or self.train_sums.device != self.device:
            self.train_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        else:
            self.train_sums.zero_()  # in place: a captured step adds to this very tensor
        self.train_images = 0

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
                config.scheduler.step(self.trainer.callback_metrics[self.hparams.monitor])

    def on_train_epoch_end(self):
        # the plateau schedule is stepped in on_validation_epoch_end
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and not isinstance(config.scheduler, ReduceLROnPlateau):
                config.scheduler.step()

    def setup(self, stage: str) -> None:
        # Before Lightning restores a checkpoint (which then replaces these weights on resume),
        # and with no random numbers drawn, so a resumed run's random streams stay aligned.
        if stage == "fit" and self.hparams.model.get("whiten"):
            count = int(self.hparams.model.get("whiten_images") or 5000)
            images = self.trainer.datamodule.first_train_images(count)
            whiten_first_conv(self.net.features[0], images.to(self.device))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optim, self.net)
        scheduler_cfg = self.hparams.scheduler
        if not scheduler_cfg or scheduler_cfg.get("_target_") is None:
            return optimizer
        scheduler, interval = build_scheduler(
            scheduler_cfg, optimizer, lambda: self.trainer.estimated_stepping_batches
        )
        # interval: when training_step or the epoch end steps it (and LearningRateMonitor logs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }
