"""Details of the artefacts, inputs and data plumbing that the broader tests let slip: report files,
figure contents, predict's input search, DDP batch split, official-batch split, atomic prepare,
HYDRA_FULL_ERROR, and bench's median and step caps."""

import csv
import math
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from cifar_lightning import report
from cifar_lightning.bench import median_run
from cifar_lightning.bench_pipelines import caps
from cifar_lightning.data.datamodule import CifarDataModule
from cifar_lightning.data.folder import EXTENSIONS, KerasImageFolder
from cifar_lightning.data.prepare import ensure_layout
from cifar_lightning.errors import UserError
from cifar_lightning.predict import find_inputs
from tests.conftest import write_images

SPLITS = ["train_1", "train_2", "train_3", "train_4", "valid", "test"]
CLASSES = ["000_a", "001_b", "002_c"]


# ---------------------------------------------------------------- report
@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")
def test_auroc_of_a_class_that_is_every_label_is_undefined_and_so_is_the_macro():
    # One-vs-rest AUROC needs negatives too: with every label class 0, no class has both positives
    # and negatives, so each AUROC is NaN and the macro mean has nothing to average.
    logits = torch.from_numpy(np.random.default_rng(2).normal(size=(12, 3)).astype(np.float32))
    m = report.classification_metrics(logits, torch.zeros(12, dtype=torch.long), CLASSES)
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
    report.write_predictions(
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
    # metrics.json is replaced in one step: a crash while writing must leave the previous file whole.
    target = tmp_path / "metrics.json"
    report.write_json(target, {"test_accuracy": 0.5})
    before = target.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.write_json(target, {"test_accuracy": 0.9})
    assert target.read_bytes() == before


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    # A failed write should not leave .metrics.json.*.tmp files piling up in the run directory.
    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError):
        report.write_json(tmp_path / "metrics.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_written_artefacts_are_readable_by_others(tmp_path):
    # mkstemp creates 0600 files; artefacts are meant to be opened by other users, whatever the umask.
    old = os.umask(0o077)
    try:
        report.write_csv(tmp_path / "s.csv", [{"a": 1}], ["a"])
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
    fig = report.plot_history(rows)
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


# ---------------------------------------------------------------- predict's inputs
def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # find_inputs only looks at names; decoding comes later


def test_predict_glob_selects_exactly_the_matching_files(tmp_path):
    # 'pics/*.jpg' is the shell's meaning: that folder only, that extension only.
    d = tmp_path / "pics"
    _touch(d / "b.jpg", d / "a.jpg", d / "c.png", d / "sub" / "d.jpg", d / "e.jpgx")
    assert find_inputs(f"{d}/*.jpg") == [d / "a.jpg", d / "b.jpg"]
    assert find_inputs(f"{d}/**/*.jpg") == [
        d / "a.jpg",
        d / "b.jpg",
        d / "sub" / "d.jpg",
    ]  # ** recurses


def test_predict_folder_is_searched_recursively_for_keras_extensions(tmp_path):
    # A folder means every image below it with Keras's extensions; hidden files and folders
    # (.ipynb_checkpoints, ._x.jpg from macOS) are not images to classify.
    d = tmp_path / "photos"
    wanted = [d / f"x{ext}" for ext in EXTENSIONS] + [d / "deep" / "er" / "y.JPG"]
    _touch(
        *wanted,
        d / "z.tif",
        d / "z.webp",
        d / "notes.txt",
        d / ".hidden.png",
        d / ".ipynb_checkpoints" / "w.png",
    )
    assert find_inputs(str(d)) == sorted(wanted)
    with pytest.raises(UserError, match="no image files found"):
        find_inputs(f"{d}/*.tif.nothing")


# ---------------------------------------------------------------- DDP batches
def test_ddp_ranks_share_the_global_batch(tiny_layout):
    # data.batch_size is the global batch: under DDP the ranks' chunks of a step put together are
    # the one-process batch (same images, same labels), so each image is seen once per epoch.
    def loaders(rank, world):
        dm = CifarDataModule(str(tiny_layout), source="unused", batch_size=8, cache=True)
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
            global_rank=rank,
            world_size=world,
        )
        dm.setup()
        return dm, list(dm.train_dataloader())

    dm, single = loaders(0, 1)
    (_, rank0), (_, rank1) = loaders(0, 2), loaders(1, 2)
    assert len(rank0) == len(rank1) == len(single)
    for (x0, y0), (x1, y1), (x, y) in zip(rank0, rank1, single):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    n_train = sum(len(KerasImageFolder(tiny_layout / d)) for d in dm.train_dirs)
    assert max(len(y) for _, y in single) == 8
    assert sum(len(y0) + len(y1) for (_, y0), (_, y1) in zip(rank0, rank1)) == n_train


# ---------------------------------------------------------------- prepare
def _official_batches(base, per_batch=6):
    """Fake official pickles; every image of batch i is one flat grey level, 20 * (i + 1)."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    for i, name in enumerate(names):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "data": np.full((per_batch, 3072), 20 * (i + 1), np.uint8),
                    "labels": [j % 3 for j in range(per_batch)],
                },
                f,
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"]}, f)
    return names


def test_official_batch_5_is_valid_and_test_batch_is_test(tmp_path, monkeypatch):
    # The notebook trains on data_batch_1..4 and validates on data_batch_5: a valid split taken
    # from another batch would be a different experiment with the same numbers of files.
    names = _official_batches(tmp_path / "src")
    monkeypatch.setattr(
        CIFAR10, "_check_integrity", lambda self: True
    )  # fakes can't match the md5s
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    root = ensure_layout(tmp_path / "layout", str(tmp_path / "src"), SPLITS)
    for i, split in enumerate(SPLITS):  # SPLITS lists the splits in the order of `names`
        files = sorted((root / split).rglob("*.png"))
        levels = {int(np.asarray(Image.open(p)).mean()) for p in files}
        assert len(files) == 6 and levels == {20 * (i + 1)}, (split, names[i], levels)


def test_a_build_that_fails_midway_leaves_no_root_and_can_be_rerun(tmp_path, monkeypatch):
    # The layout is built beside data.root and renamed into place: a crash (disk full, Ctrl-C)
    # must not leave a half-built root that a later run would refuse or, worse, train on.
    import shutil

    src = tmp_path / "src"
    for c, name in enumerate(["airplane", "automobile", "bird"]):
        write_images(src / "train" / name, 5, c, ext=".jpg")
        write_images(src / "test" / name, 1, c, seed=9, ext=".jpg")
    copy, copied = shutil.copyfile, []

    def copy_then_fail(a, b, *args, **kw):
        if len(copied) == 4:
            raise OSError("No space left on device")
        copied.append(b)
        return copy(a, b, *args, **kw)

    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)
    root = tmp_path / "layout"
    with pytest.raises(
        UserError, match=r"data.root=.*layout: building the layout failed: No space left on device$"
    ):
        ensure_layout(root, str(src), SPLITS)  # one error line, not an OSError traceback
    assert len(copied) == 4 and not root.exists()
    assert not list(tmp_path.glob(".layout.building-*"))
    monkeypatch.undo()
    assert ensure_layout(root, str(src), SPLITS) == root
    assert len(KerasImageFolder(root / "valid")) == 3 and len(KerasImageFolder(root / "test")) == 3


# ---------------------------------------------------------------- errors
def test_hydra_full_error_shows_the_traceback_of_a_user_error(tmp_path):
    # HYDRA_FULL_ERROR=1 is how a user asks for the traceback behind an `error:` line.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_lightning.evaluate",
            f"ckpt_path={tmp_path / 'nope.ckpt'}",
            f"eval_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "UserError: ckpt_path=" in res.stderr and "nope.ckpt: no such file" in res.stderr


# ---------------------------------------------------------------- bench
def test_bench_median_of_an_even_number_of_rounds_is_the_lower_middle_run():
    # The reported run is a real one (no averaging of two runs); with 4 rounds it is the 2nd fastest.
    runs = [{"epoch_s": s, "round": k} for k, s in enumerate([4.0, 1.0, 3.0, 2.0])]
    by_time = sorted(runs, key=lambda r: r["epoch_s"])
    assert median_run(runs) is by_time[len(runs) // 2 - 1]
    assert (
        median_run(runs[:3]) is sorted(runs[:3], key=lambda r: r["epoch_s"])[1]
    )  # odd: the middle one
    assert median_run(runs[:1]) is runs[0]


def test_bench_caps_validation_in_proportion_to_training():
    # With max_steps the timed epoch keeps a full epoch's train:val ratio, so it can be extrapolated.
    n_train, n_val = 100, 20
    assert caps(n_train, n_val, 10) == (10, n_val * 10 // n_train)
    assert caps(n_train, n_val, 7) == (7, math.ceil(n_val * 7 / n_train))  # rounded up, never 0
    assert caps(n_train, 5, 1) == (1, 1)
    assert caps(n_train, n_val, None) == (n_train, n_val)
    assert caps(n_train, n_val, 1000) == (n_train, n_val)  # a cap above the epoch changes nothing
