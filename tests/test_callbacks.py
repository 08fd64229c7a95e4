"""The training callbacks (callbacks.py): History's rows on a resumed run and on epochs without
validation, when InterruptCheckpoint saves, and gathering DDP ranks' test outputs back into file
order."""

import csv
import math
from types import SimpleNamespace

import pytest
import torch

from cifar_lightning.callbacks import History, InterruptCheckpoint, gather_test_outputs
from cifar_lightning.data.sampler import DirectoryBatchSampler
from cifar_lightning.errors import UserError
from cifar_lightning.report.metrics import best_epoch


def test_history_adds_no_second_row_for_an_epoch_it_has(tmp_path):
    # A resumed run replays the end of its last epoch; its row is already in the restored history.
    history = History(tmp_path / "history.csv")
    history.load_state_dict({"rows": [{"epoch": e, "val_loss": 1.0 / e} for e in (1, 2)]})
    metrics = {
        "train/loss": torch.tensor(0.9),
        "train/acc": torch.tensor(0.5),
        "val/loss": torch.tensor(0.3),
        "val/acc": torch.tensor(0.6),
    }
    # epoch 2, 0-based
    trainer = SimpleNamespace(
        callback_metrics=metrics, current_epoch=1, is_global_zero=True, sanity_checking=False
    )
    history.on_train_epoch_end(trainer, None)
    assert [r["epoch"] for r in history.rows] == [1, 2] and history.rows[1]["val_loss"] == 0.5
    trainer.current_epoch = 2
    history.on_validation_epoch_end(trainer, None)
    history.on_train_epoch_end(trainer, None)
    assert [r["epoch"] for r in history.rows] == [1, 2, 3]
    assert history.rows[2]["val_loss"] == pytest.approx(0.3)


def test_an_epoch_without_validation_leaves_its_val_columns_empty(tmp_path):
    # trainer.check_val_every_n_epoch=2: epoch 2's callback_metrics still hold epoch 1's val/*
    history = History(tmp_path / "history.csv")
    metrics = {"train/loss": torch.tensor(0.9), "val/loss": torch.tensor(0.3)}
    trainer = SimpleNamespace(
        callback_metrics=metrics, current_epoch=0, is_global_zero=True, sanity_checking=True
    )
    history.on_validation_epoch_end(trainer, None)  # a sanity check is not the epoch's validation
    history.on_train_epoch_end(trainer, None)
    trainer.sanity_checking = False
    for epoch, validated in ((1, True), (2, False), (3, True)):
        trainer.current_epoch = epoch
        if validated:
            history.on_validation_epoch_end(trainer, None)
        history.on_train_epoch_end(trainer, None)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([0.9] * 4)
    assert [math.isnan(float(r["val_loss"])) for r in rows] == [True, False, True, False]
    assert best_epoch(rows) == 2


def test_interrupt_checkpoint_ignores_a_user_error_even_after_training(tmp_path):
    # A config or data mistake has its own error line: no interrupted.ckpt, however far it trained.
    saved = []
    trainer = SimpleNamespace(save_checkpoint=lambda path, **k: saved.append(path))
    callback = InterruptCheckpoint(tmp_path / "interrupted.ckpt")
    callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_exception(trainer, None, UserError("data.root: bad"))
    assert saved == []
    # the check can fail: other errors save
    callback.on_exception(trainer, None, RuntimeError("crash"))
    assert saved == [tmp_path / "interrupted.ckpt"]


def test_a_crash_before_any_training_step_keeps_the_old_interrupted_checkpoint(tmp_path):
    from cifar_lightning.callbacks import InterruptCheckpoint

    saved = []
    trainer = type(
        "Trainer", (), {"save_checkpoint": lambda self, path, **kw: saved.append(path)}
    )()
    callback = InterruptCheckpoint(tmp_path / "interrupted.ckpt")
    callback.on_exception(trainer, None, RuntimeError("size mismatch"))  # e.g. in setup or loading
    assert saved == []
    callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == [tmp_path / "interrupted.ckpt"]


@pytest.mark.parametrize(
    "n_images,batch_size,world_size", [(30, 8, 2), (17, 8, 2), (33, 8, 4), (9, 4, 3), (5, 64, 8)]
)
def test_ddp_test_outputs_gather_into_file_order_once_each(
    monkeypatch, n_images, batch_size, world_size
):
    """Under DDP each rank tests its chunk of every sequential batch; gathered, the outputs must be
    the test split in file order, each image once: predictions.csv pairs rows with paths by
    position. Includes last batches smaller than world_size (17 % 8 = 1 image for 2 ranks), where
    some rank has no image of its own and repeats one. Each fake output holds its image's index."""
    per_rank = [
        [
            (torch.tensor(b, dtype=torch.float32)[:, None], torch.tensor(b))
            for b in DirectoryBatchSampler(
                [n_images], batch_size, "sequential", rank=r, world_size=world_size
            )
        ]
        for r in range(world_size)
    ]
    monkeypatch.setattr(
        torch.distributed,
        "all_gather_object",
        lambda out, _: out.__setitem__(slice(None), per_rank),
    )
    logits, labels = gather_test_outputs(per_rank[0], world_size, n_images)
    assert labels.tolist() == logits[:, 0].long().tolist() == list(range(n_images))
