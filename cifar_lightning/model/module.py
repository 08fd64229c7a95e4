"""The LightningModule: loss, torchmetrics, optimizer and plateau schedule around Model S.

Hyperparameters are stored as plain dicts and lists, so checkpoints load with weights_only=True."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.config import complete, instantiate
from cifar_lightning.model.augment import Augment
from cifar_lightning.model.graphed import GraphedStep
from cifar_lightning.model.net import build_net, flip_average
from cifar_lightning.model.schedule import build_scheduler

log = logging.getLogger(__name__)

# what Lightning calls around manual_backward and optimizer.step, and a replayed step does not (a
# capture calls Tensor.backward itself, so the module's own `backward` is skipped too)
GRAPH_SKIPPED_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class Classifier(L.LightningModule):
    graph_type = (
        None  # GraphedStep's graph (a CUDA graph); tests on the CPU substitute a replayed call
    )

    def __init__(
        self,
        model: dict,
        optim: dict,
        scheduler: dict | None,
        class_names: list[str],
        monitor: str = "val/loss",
        image_size: int = 32,
        resize: str = "tf_bilinear",
    ):
        # resize (fidelity.resize) is not used here: it is kept in the checkpoint, so that evaluate and
        # predict decode images as training did
        super().__init__()
        self.save_hyperparameters()
        # The training step is ours (training_step): eager, or one CUDA graph replay (model.cuda_graph).
        self.automatic_optimization = False
        self.net = build_net(model, image_size)
        self.channels_last = bool(model.get("channels_last"))
        self.l2 = float(model.get("l2", 0.0))
        self.label_smoothing = float(model.get("label_smoothing", 0.0))
        self.tta_flip = bool(model.get("tta_flip", False))
        self.augment = Augment(**model["augment"]) if model.get("augment") else None
        self.compiled = bool(model.get("compile"))
        if self.compiled:
            self.net = torch.compile(self.net, mode=model.get("compile_mode", "default"))
        self.cuda_graph = bool(model.get("cuda_graph", False))
        self.graphed: GraphedStep | None = None  # set up per fit, in on_train_start
        n = len(class_names)
        # Keras's "accuracy" is the fraction correct: micro averaging (torchmetrics defaults to macro).
        self.val_acc, self.test_acc = (MulticlassAccuracy(n, average="micro") for _ in range(2))
        # nan_strategy="disable": no per-step NaN check, which would sync with the GPU; a NaN loss
        # then shows in the epoch mean, where History stops the run.
        self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(2))
        # Training sums loss x images and correct images on the device, in place (a captured step adds to
        # the same tensor), and hands the epoch's means to these two at its last batch.
        self.train_loss, self.train_acc = (
            MeanMetric(nan_strategy="disable"),
            MeanMetric(nan_strategy="disable"),
        )
        self.train_sums: torch.Tensor | None = None
        self.train_images = 0
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
        """Validation and test: loss and accuracy of one batch into the stage's metrics."""
        x, y = batch
        # test-time augmentation: the mean probability with the mirror image
        logits = flip_average(self, x) if self.tta_flip else self(x)
        loss = F.cross_entropy(logits, y)  # = Keras sparse CE on the softmax, computed from logits
        # Epoch means accumulate on the device, with no per-step .item() sync. The loss counts once per
        # image, so the epoch loss is the per-image mean, as Keras reports it. (MeanMetric's weight=
        # would be dropped under nan_strategy="disable": torchmetrics issue 3434.)
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor, backward, optimizer) -> None:
        """One optimizer step, everything in place and nothing read back: what a CUDA graph captures."""
        optimizer.zero_grad(set_to_none=True)
        loss, logits = self.train_loss_and_logits(x, y)
        backward(loss)
        optimizer.step()
        self.train_sums.add_(
            torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        )

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.train_step(
            x, y, self.manual_backward, self.optimizers()
        )  # Lightning's: counted, precision-aware

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.graphed is None:
            self._eager_step(x, y)
        elif self.graphed(
            x, y
        ):  # a replay bypasses LightningOptimizer.step, where Lightning counts global_step
            optimizer = self.optimizers()
            optimizer._on_before_step()
            optimizer._on_after_step()
        self.train_images += len(y)
        for (
            config
        ) in self.trainer.lr_scheduler_configs:  # manual optimization: Lightning steps none
            if config.interval == "step":
                config.scheduler.step()
        if self.trainer.is_last_batch:
            means = self.train_sums / self.train_images
            self.train_loss.update(means[0])
            self.train_acc.update(means[1])
            self._log_epoch("train")

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's metric objects once, not per step: two self.log calls per step cost about
        1.2-1.8 ms of Python on this project's 2-core CPU (scripts/step_overhead.py), on a GPU as much as
        the step's own kernels. Lightning computes them at the epoch's end (synced over DDP ranks)
        and resets them."""
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
        self.test_outputs.append((logits.float().cpu(), batch[1].cpu()))

    def on_train_start(self):
        self.graphed = None
        why_not = self.cuda_graph_blocker()
        if self.cuda_graph and why_not:
            log.info(f"model.cuda_graph: eager steps, {why_not}")
        elif self.cuda_graph:
            self.graphed = GraphedStep(
                self.train_step,
                self._eager_step,
                self.optimizers().optimizer,
                batch_size=self.trainer.train_dataloader.batch_sampler.batch_size,
                graph_type=self.graph_type,
            )

    def cuda_graph_blocker(self) -> str | None:
        """Why this fit can't replay its steps as a CUDA graph, or None."""
        if self.device.type != "cuda":
            return f"the device is {self.device.type}"
        return self.graph_blocker()

    def graph_blocker(self) -> str | None:
        """cuda_graph_blocker's rules other than the device (the CPU tests' stand-in graph obeys them)."""
        trainer = self.trainer
        # A replay runs no Python, so the hooks Lightning calls around backward and the optimizer step
        # would silently skip most steps (a gradient-norm logger would see only the eager ones).
        # is_overridden also sees hooks set on an instance, as LambdaCallback(on_after_backward=...) does.
        watched = [(self, (*GRAPH_SKIPPED_HOOKS, "backward"))] + [
            (c, GRAPH_SKIPPED_HOOKS) for c in trainer.callbacks
        ]
        for obj, hooks in watched:
            hook = next((h for h in hooks if is_overridden(h, obj)), None)
            if hook:
                return f"{type(obj).__name__}.{hook} would not run on replayed steps"
        if trainer.world_size > 1:
            return "DDP's gradient all-reduce is not captured"
        if trainer.precision not in ("32-true", "bf16-mixed"):
            return f"trainer.precision={trainer.precision} (graphed steps run at 32-true or bf16-mixed)"
        if torch.is_anomaly_enabled():
            return "trainer.detect_anomaly=true (its checks read values back in backward)"
        if self.compiled:
            return "model.compile=true (torch.compile's reduce-overhead mode makes its own graphs)"
        if any(c.interval == "step" for c in trainer.lr_scheduler_configs):
            return "the schedule changes the learning rate every step (a graph bakes it in)"
        if not hasattr(trainer.train_dataloader, "batch_sampler"):
            return "the train loader has no batch sampler (cifar_lightning's datamodule has)"
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("optimizer_states")  # none in a weights-only checkpoint
        if (
            self.graphed is not None and states
        ):  # Adam's capturable flag, set for the graph, is saved as it was
            groups = states[0]["param_groups"]  # a copy: the live optimizer keeps its own
            for group, was in zip(groups, self.graphed.capturable_was):
                if was is not None:
                    group["capturable"] = was

    def on_train_epoch_start(self):
        # An epoch cut short (max_steps) logged nothing, so Lightning did not reset these.
        self.train_loss.reset()
        self.train_acc.reset()
        if self.train_sums is None or self.train_sums.device != self.device:
            self.train_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        else:
            self.train_sums.zero_()  # in place: a captured step adds to this very tensor
        self.train_images = 0

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
                config.scheduler.step(self.trainer.callback_metrics[self.hparams.monitor])

    def on_train_epoch_end(self):
        for (
            config
        ) in self.trainer.lr_scheduler_configs:  # plateau: stepped in on_validation_epoch_end
            if config.interval == "epoch" and not isinstance(config.scheduler, ReduceLROnPlateau):
                config.scheduler.step()

    def configure_optimizers(self):
        optimizer = complete(
            instantiate(self.hparams.optim, "optim"), "optim", params=self.parameters()
        )
        scheduler_cfg = self.hparams.scheduler
        if not scheduler_cfg or scheduler_cfg.get("_target_") is None:
            return optimizer
        scheduler, interval = build_scheduler(
            scheduler_cfg, optimizer, lambda: self.trainer.estimated_stepping_batches
        )
        # interval: when training_step or the epoch's end steps it (and when LearningRateMonitor logs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }
