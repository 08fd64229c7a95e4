"""report/: the metrics against a plain numpy computation, the figures as real PNG files and
what the history plot draws, predictions.csv, atomic and readable writes, the best epoch, and the
sweep summary."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_lightning.notebook import BEST_EPOCH
from cifar_lightning.notebook import VAL_LOSS as NOTEBOOK_VAL_LOSS
from cifar_lightning.report import files
from cifar_lightning.report.figures import plot_confusion, plot_history, plot_roc
from cifar_lightning.report.files import read_csv, save_figure, write_csv, write_json
from cifar_lightning.report.metrics import best_epoch, classification_metrics, write_predictions
from cifar_lightning.report.sweep import write_summary

CLASSES = ["000_a", "001_b", "002_c"]


def _numpy_metrics(probs, y, k):
    pred = probs.argmax(1)
    cm = np.array([[np.sum((y == t) & (pred == p)) for p in range(k)] for t in range(k)])
    tp = np.diag(cm).astype(float)
    precision, recall = tp / cm.sum(0), tp / cm.sum(1)
    f1 = 2 * precision * recall / (precision + recall)
    support = cm.sum(1)

    def auc(scores, positive):  # probability that a positive outranks a negative (ties count 1/2)
        pos, neg = scores[positive], scores[~positive]
        return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
            len(pos) * len(neg)
        )

    aucs = np.array([auc(probs[:, c], y == c) for c in range(k)])
    return dict(
        acc=(pred == y).mean(),
        cm=cm,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        auc=aucs,
        loss=-np.log(probs[np.arange(len(y)), y]).mean(),
    )


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 3)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    logits[np.arange(60), y] += rng.random(60) * 2  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = _numpy_metrics(probs, y, 3)
    m = classification_metrics(torch.from_numpy(logits), torch.from_numpy(y), CLASSES)
    w = ref["support"] / ref["support"].sum()
    assert m["test_accuracy"] == pytest.approx(ref["acc"], abs=1e-6)
    assert m["test_loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert m["confusion_matrix"] == ref["cm"].tolist()
    for name in ("precision", "recall", "f1"):
        assert m[f"{name}_macro"] == pytest.approx(ref[name].mean(), abs=1e-6)
        assert m[f"{name}_weighted"] == pytest.approx((ref[name] * w).sum(), abs=1e-6)
    assert m["auroc_macro"] == pytest.approx(ref["auc"].mean(), abs=1e-5)
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["auroc"] == pytest.approx(ref["auc"][i], abs=1e-5)
        assert m["per_class"][c]["support"] == ref["support"][i]
        assert m["per_class"][c]["f1"] == pytest.approx(ref["f1"][i], abs=1e-6)


def test_auroc_of_a_class_missing_from_the_test_set_is_undefined_not_zero():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.integers(0, 2, 40)  # class 2 never occurs: it has no positives
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with np.errstate(invalid="ignore"):  # the reference divides by class 2's zero count too
        ref = _numpy_metrics(probs, y, 3)
    m = classification_metrics(torch.from_numpy(logits), torch.from_numpy(y), CLASSES)
    assert np.isnan(m["per_class"][CLASSES[2]]["auroc"])
    assert m["per_class"][CLASSES[0]]["auroc"] == pytest.approx(ref["auc"][0], abs=1e-5)
    # over the defined classes
    assert m["auroc_macro"] == pytest.approx(ref["auc"][:2].mean(), abs=1e-5)


def test_figures_are_valid_pngs(tmp_path):
    logits, y = torch.randn(40, 3), torch.arange(40) % 3
    rows = [
        {
            "epoch": e,
            "train_loss": 2 / e,
            "val_loss": 2.2 / e + (e > 3) * 0.1,
            "train_acc": e / 10,
            "val_acc": e / 11,
            "lr": 1e-3 if e < 3 else 1e-4,
        }
        for e in range(1, 6)
    ]
    for name, fig in (
        ("cm", plot_confusion(logits, y, CLASSES)),
        ("roc", plot_roc(logits, y, CLASSES)),
        ("curves", plot_history(rows)),
    ):
        save_figure(fig, tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 400


def test_sweep_summary_averages_each_recipe_over_its_seeds(tmp_path):
    jobs = [
        ("optim=adam seed=0", "optim=adam", 0, 0.80),
        ("optim=adam seed=1", "optim=adam", 1, 0.84),
        ("optim=sgd seed=0", "optim=sgd", 0, 0.70),
        ("optim=sgd seed=1", "optim=sgd", 1, None),
    ]
    for i, (overrides, recipe, seed, acc) in enumerate(jobs):
        (tmp_path / str(i)).mkdir()
        row = {
            "job": str(i),
            "overrides": overrides,
            "recipe": recipe,
            "seed": seed,
            "status": "completed" if acc else "failed",
            "best_val_loss": 1.0 - (acc or 0),
            "test_accuracy": acc,
        }
        (tmp_path / str(i) / "summary_row.json").write_text(json.dumps(row))
    write_summary(tmp_path)
    with open(tmp_path / "seeds.csv") as f:
        stats = {r["recipe"]: r for r in csv.DictReader(f)}
    assert stats["optim=adam"]["seeds"] == "0 1"
    assert float(stats["optim=adam"]["test_accuracy"]) == pytest.approx(0.82)
    assert float(stats["optim=adam"]["test_accuracy_std"]) == pytest.approx(
        np.std([0.80, 0.84], ddof=1)
    )
    # the failed seed is left out, and one seed has no spread
    assert stats["optim=sgd"]["seeds"] == "0" and stats["optim=sgd"]["test_accuracy_std"] == ""
    assert "| optim=adam | 0 1 | 0.8200 ± 0.0283 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "monitor, mode, order",
    [
        ("val/loss", "min", ["1", "0", "2"]),
        ("val/acc", "max", ["0", "2", "1"]),
    ],
)
def test_sweep_summary_puts_the_best_job_by_its_monitor_first(tmp_path, monitor, mode, order):
    # job 1 has the lowest val loss, job 0 the highest val accuracy
    for job, (loss, acc) in enumerate([(0.7, 0.83), (0.6, 0.80), (0.8, 0.82)]):
        (tmp_path / str(job)).mkdir()
        row = {
            "job": str(job),
            "overrides": f"seed={job}",
            "recipe": "(defaults)",
            "seed": job,
            "status": "completed",
            "best_val_loss": loss,
            "best_val_acc": acc,
            "monitor": monitor,
            "monitor_mode": mode,
        }
        (tmp_path / str(job) / "summary_row.json").write_text(json.dumps(row))
    write_summary(tmp_path)
    assert [r["job"] for r in read_csv(tmp_path / "summary.csv")] == order


def test_a_sweep_over_the_monitor_itself_keeps_job_order(tmp_path):
    for job, monitor, mode in [
        (0, "val/acc", "max"),
        (1, "val/loss", "min"),
        (10, "val/loss", "min"),
        (2, "val/acc", "max"),
    ]:
        (tmp_path / str(job)).mkdir()
        row = {
            "job": str(job),
            "overrides": f"monitor={monitor}",
            "recipe": f"monitor={monitor}",
            "seed": 42,
            "status": "completed",
            "best_val_loss": 1 / (job + 1),
            "best_val_acc": 0.5,
            "monitor": monitor,
            "monitor_mode": mode,
        }
        (tmp_path / str(job) / "summary_row.json").write_text(json.dumps(row))
    write_summary(tmp_path)
    # 10 after 2: numeric
    assert [r["job"] for r in read_csv(tmp_path / "summary.csv")] == ["0", "1", "2", "10"]


@pytest.mark.parametrize(
    "broken",
    [b'{"job": "1", "overrides": "se', b"", b"\x93\xfe\x00 not json", b"[1, 2]", b'{"job": "1"}'],
    ids=["truncated", "empty", "garbage", "not-an-object", "not-a-row"],
)
def test_a_broken_summary_row_is_named_once_and_the_other_jobs_are_summarised(
    tmp_path, caplog, broken
):
    # a full disk or a copy cut short: one warning line naming the file, the rest of the summary
    # written, and the file itself left as it is
    for job in ("0", "1", "2"):
        (tmp_path / job).mkdir()
        row = {"job": job, "overrides": f"seed={job}", "recipe": "(defaults)", "seed": int(job)}
        row |= {"status": "completed", "best_val_loss": 0.5, "monitor": "val/loss"}
        (tmp_path / job / "summary_row.json").write_text(json.dumps(row | {"monitor_mode": "min"}))
    (tmp_path / "1" / "summary_row.json").write_bytes(broken)
    write_summary(tmp_path)
    write_summary(tmp_path)  # every job's end rewrites the summary: the file is named once
    assert [r["job"] for r in read_csv(tmp_path / "summary.csv")] == ["0", "2"]
    assert "| (defaults) | 0 2 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").exists()
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(f"{tmp_path / '1' / 'summary_row.json'}: unreadable")
    assert "job 1 is left out of the sweep's summary" in warning.getMessage()
    assert "\n" not in warning.getMessage()
    assert (tmp_path / "1" / "summary_row.json").read_bytes() == broken


def test_best_epoch_keeps_the_first_of_tied_val_losses():
    # Keras's checkpoint and restore-best count only strict improvements, so a tie keeps the earlier
    # epoch.
    # as read from history.csv
    rows = [{"epoch": "1", "val_loss": "1.0"}, {"epoch": "2", "val_loss": "1.0"}]
    assert best_epoch(rows) == 1
    # as History keeps them
    assert best_epoch([{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 1.0}]) == 1


def test_best_epoch_follows_the_monitor_and_its_mode():
    rows = [
        {"epoch": 1, "val_loss": 1.0, "val_acc": 0.5},
        {"epoch": 2, "val_loss": 0.9, "val_acc": 0.4},
        {"epoch": 3, "val_loss": 1.1, "val_acc": 0.6},
        {"epoch": 4, "val_loss": 1.2, "val_acc": 0.6},
    ]
    assert best_epoch(rows) == 2
    assert best_epoch(rows, "val/acc", "max") == 3  # the first of the tied best
    assert best_epoch(rows, "val/acc", "min") == 2


def test_best_epoch_of_the_notebook_log_is_13():
    # metrics.best_epoch itself, on the notebook's val_loss log (test_schedule checks it by hand).
    rows = [{"epoch": e, "val_loss": v} for e, v in enumerate(NOTEBOOK_VAL_LOSS, start=1)]
    assert best_epoch(rows) == BEST_EPOCH == 13


@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")
def test_auroc_of_a_class_that_is_every_label_is_undefined_and_so_is_the_macro():
    # One-vs-rest AUROC needs negatives too: with every label class 0, no class has both positives
    # and negatives, so each AUROC is NaN and the macro mean has nothing to average.
    logits = torch.from_numpy(np.random.default_rng(2).normal(size=(12, 3)).astype(np.float32))
    m = classification_metrics(logits, torch.zeros(12, dtype=torch.long), CLASSES)
    assert math.isnan(m["per_class"][CLASSES[0]]["auroc"])
    assert all(math.isnan(m["per_class"][c]["auroc"]) for c in CLASSES)
    assert math.isnan(m["auroc_macro"])


def test_predictions_csv_has_label_argmax_and_probabilities_in_path_order(tmp_path):
    # label is the truth and prediction the argmax (a swap reads as perfect or nonsense accuracy);
    # rows follow `paths` so a row can be traced to its file.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(9, 3)).astype(np.float32)
    y = (logits.argmax(1) + np.arange(9)) % 3  # right on some rows, wrong on others
    paths = [f"img/{name}.png" for name in "zyxwvutsr"]  # not sorted: the order must be kept
    write_predictions(
        tmp_path / "p.csv", paths, torch.from_numpy(y), torch.from_numpy(logits), CLASSES
    )
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert [r["path"] for r in rows] == paths
    assert [int(r["label"]) for r in rows] == y.tolist()
    assert [int(r["prediction"]) for r in rows] == probs.argmax(1).tolist()
    for r, p in zip(rows, probs):
        assert [float(r[c]) for c in CLASSES] == pytest.approx(p.tolist(), abs=1e-6)
        assert sum(float(r[c]) for c in CLASSES) == pytest.approx(1, abs=1e-5)


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    # metrics.json is replaced in one step: a crash while writing leaves the previous file whole.
    target = tmp_path / "metrics.json"
    write_json(target, {"test_accuracy": 0.5})
    before = target.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json(target, {"test_accuracy": 0.9})
    assert target.read_bytes() == before


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    # A failed write should not leave .metrics.json.*.tmp files piling up in the run directory.
    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError):
        write_json(tmp_path / "metrics.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_written_artefacts_are_readable_by_others(tmp_path):
    # mkstemp creates 0600 files; artefacts are meant to be read by other users, whatever the umask.
    old = os.umask(0o077)
    try:
        write_csv(tmp_path / "s.csv", [{"a": 1}], ["a"])
    finally:
        os.umask(old)
    assert (tmp_path / "s.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "s.csv").read_text() == "a\n1\n"


def test_history_plot_draws_train_and_val_with_best_epoch_and_lr_cuts():
    # The curves must show what history.csv says: val is not train, acc left and loss right,
    # the best epoch (first lowest val_loss) and a dotted line after each epoch whose LR was cut.
    lrs = [1e-3, 1e-3, 1e-4, 1e-4, 1e-5]
    val_loss = [1.0, 0.8, 0.9, 0.8, 1.1]  # a tie: Keras keeps the first
    rows = [
        {
            "epoch": e,
            "train_acc": 0.1 * e,
            "val_acc": 0.05 * e + 0.02,
            "train_loss": 2.0 / e,
            "val_loss": val_loss[e - 1],
            "lr": lrs[e - 1],
        }
        for e in range(1, 6)
    ]
    best = 1 + val_loss.index(min(val_loss))
    cuts = [rows[i - 1]["epoch"] + 0.5 for i in range(1, 5) if lrs[i] < lrs[i - 1]]
    fig = plot_history(rows, best=best_epoch(rows))
    try:
        for ax, what in zip(fig.axes, ("acc", "loss")):
            lines = {ln.get_label(): ln for ln in ax.lines}
            for split in ("train", "val"):
                ln = lines[f"{split} {what}"]
                assert list(ln.get_xdata()) == [1, 2, 3, 4, 5]
                assert list(ln.get_ydata()) == pytest.approx([r[f"{split}_{what}"] for r in rows])
            assert ax.get_ylabel() == what
            assert list(lines[f"best epoch {best}"].get_xdata()) == [best, best]
            dotted = [ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == ":"]
            assert dotted == cuts
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_the_curves_join_the_validated_epochs_when_some_epochs_skip_validation():
    # trainer.check_val_every_n_epoch=2: history.csv leaves epochs 1 and 3 without val metrics
    nan = float("nan")
    rows = [
        {"epoch": e, "train_acc": 0.1 * e, "train_loss": 2.0 / e, "lr": 0.1}
        | (
            {"val_acc": 0.2 * e, "val_loss": 1.0 / e}
            if e % 2 == 0
            else {"val_acc": nan, "val_loss": nan}
        )
        for e in range(1, 5)
    ]
    fig = plot_history(rows, best=best_epoch(rows))
    try:
        for ax, what in zip(fig.axes, ("acc", "loss")):
            val = next(ln for ln in ax.lines if ln.get_label() == f"val {what}")
            assert list(val.get_xdata()) == [2, 4]
            assert list(val.get_ydata()) == pytest.approx(
                [rows[1][f"val_{what}"], rows[3][f"val_{what}"]]
            )
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
