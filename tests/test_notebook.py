"""The notebook comparison: one figure per run, and test metrics as mean ± sample std over runs."""

import json

import numpy as np
from PIL import Image

from cifar_lightning.callbacks import HISTORY_COLUMNS
from cifar_lightning.notebook import compare
from cifar_lightning.report.files import write_csv


def fake_run(path, test_accuracy, epochs=3):
    path.mkdir()
    rows = [
        {
            "epoch": e,
            "train_loss": 2 - e / 10,
            "train_acc": e / 10,
            "val_loss": 1.5 - e / 10,
            "val_acc": e / 8,
            "lr": 1e-3 if e < 3 else 1e-4,
            "epoch_seconds": 1.0,
        }
        for e in range(1, epochs + 1)
    ]
    write_csv(path / "history.csv", rows, HISTORY_COLUMNS)
    metrics = {
        "test_accuracy": test_accuracy,
        "precision_macro": 0.7,
        "recall_macro": test_accuracy,
        "f1_macro": 0.7,
        "best_epoch": epochs,
        "epochs_run": epochs,
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_compare_writes_a_figure_per_run_and_the_mean_and_std(tmp_path):
    runs = [fake_run(tmp_path / "s0", 0.80), fake_run(tmp_path / "s1", 0.81, epochs=4)]
    text = compare(runs, tmp_path / "out" / "reproduction")
    for png in ("reproduction.png", "reproduction_s1.png"):
        Image.open(tmp_path / "out" / png).verify()
    std = np.std([0.80, 0.81], ddof=1)
    assert f"| test_accuracy | 0.8155 | 0.8050 ± {std:.4f} |" in text
    assert (
        "| epochs run | 19 | 3, 4 |" in text
        and (tmp_path / "out" / "reproduction.md").read_text() == text
    )
