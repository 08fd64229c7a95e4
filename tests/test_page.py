"""report.html: a self-contained page that parses, holds every figure and table with PNG data:
URIs only, reads the run's predictions.csv as an independent recomputation does, never fails a
run, follows report=false, and is rebuilt by cifar-report for a run that predates it. Trained on
a tiny 3-class folder of 64x64 images whose class names have spaces and non-ASCII letters."""

from __future__ import annotations

import base64
import csv
import json
import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cfg_for, run_cli, write_images

CLASSES3 = ["bald eagle", "zebra", "ñandú"]
SPLITS3 = {"train_1": 3, "train_2": 3, "train_3": 3, "train_4": 3, "valid": 4, "test": 5}
FAST = ["logger=none", "trainer.max_epochs=1", "data.batch_size=8", "data.image_size=64"]
SECTIONS = {"headline", "figures", "per-class", "reading", "mistakes", "calibration", "missing"}
FIGURES = {"training_curves", "confusion_matrix", "roc_curves", "reliability"}
TABLES = {"headline-table", "hparams-table", "per-class-table", "confused-pairs"}
NEW_KEYS = (
    "hardware",
    "ece",
    "temperature",
    "ece_temperature_scaled",
    "calibration_seconds",
    "calibration_images",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def layout3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data3") / "three"
    for s, (split, n) in enumerate(SPLITS3.items()):
        for c, name in enumerate(CLASSES3):
            write_images(root / split / name, n, c, seed=s, size=64)
    return root


@pytest.fixture(scope="module")
def run3(layout3, tmp_path_factory) -> Path:
    from cifar_lightning.train import train

    run_dir = tmp_path_factory.mktemp("run3")
    train(cfg_for(run_dir, layout3, *FAST, "tta.flip=true"))
    return run_dir


class Page(HTMLParser):
    """What the tests read of a page: ids, img sources, the confused-pairs rows, the ECE cells,
    and the text."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.imgs, self.pairs, self.values, self.text = set(), [], [], {}, []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "tr" and a.get("class") == "pair":
            self.pairs.append((int(a["data-true"]), int(a["data-predicted"]), a["data-fraction"]))
        if "data-value" in a:
            self.values[a["id"]] = float(a["data-value"])
        for name in ("link", "script", "iframe"):  # nothing the page would have to fetch
            assert tag != name, f"<{tag}> in a self-contained page"

    def handle_data(self, data):
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def read_page(run_dir: Path) -> Page:
    return Page((run_dir / "report.html").read_text(encoding="utf-8"))


def read_predictions(run_dir: Path):
    with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0])[3:]
    probs = np.array([[float(r[c]) for c in names] for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    return names, probs, labels, rows


def test_the_page_parses_and_holds_every_section_figure_and_table(run3):
    page = read_page(run3)
    assert SECTIONS <= page.ids
    assert {f"figure-{f}" for f in FIGURES} <= page.ids
    assert TABLES | {"calibration-table"} <= page.ids
    assert page.imgs, "no images"
    for src in page.imgs:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64", src[:40]
        assert base64.b64decode(data, validate=True)[:8] == PNG_MAGIC
    text = page.all_text
    for name in CLASSES3:  # the per-class table, escaped as text
        assert name in text
    # the headline: metrics.json's numbers, the hardware and the recipe
    metrics = json.loads((run3 / "metrics.json").read_text())
    assert f"{metrics['test_accuracy']:.4f}" in text and metrics["hardware"] in text
    assert "optim/lr" in text and "tta/flip" in text
    # the test images exist inside the data folder: every mistake has its thumbnail
    assert "not shown" not in text


def test_metrics_json_holds_the_hardware_and_the_calibration(run3):
    m = json.loads((run3 / "metrics.json").read_text())
    assert set(NEW_KEYS) <= set(m)
    assert m["temperature"] > 0 and m["calibration_seconds"] >= 0
    assert m["calibration_images"] == len(CLASSES3) * SPLITS3["valid"]
    assert isinstance(m["hardware"], str) and m["hardware"]
    assert 0 <= m["ece"] <= 1 and 0 <= m["ece_temperature_scaled"] <= 1


def independent_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    index = np.digitize(confidence, np.linspace(0, 1, bins + 1)) - 1
    ece = 0.0
    for b in np.unique(index):
        inside = index == b
        gap = (predicted[inside] == labels[inside]).mean() - confidence[inside].mean()
        ece += inside.mean() * abs(gap)
    return ece


def test_confused_pairs_and_ece_match_a_recomputation_from_predictions_csv(run3):
    names, probs, labels, rows = read_predictions(run3)
    predicted = [int(r["prediction"]) for r in rows]
    counts: dict[tuple[int, int], int] = {}
    for y, k in zip(labels.tolist(), predicted):
        if y != k:
            counts[y, k] = counts.get((y, k), 0) + 1
    support = np.bincount(labels, minlength=len(names))
    expected = sorted(
        ((c / support[y], c, y, k) for (y, k), c in counts.items()),
        key=lambda t: (-t[0], -t[1], t[2], t[3]),
    )[:5]
    page = read_page(run3)
    assert [(y, k) for y, k, _ in page.pairs] == [(y, k) for _, _, y, k in expected]
    for (_, _, shown), (fraction, *_) in zip(page.pairs, expected):
        assert float(shown) == pytest.approx(fraction, abs=1e-4)
    assert page.values["ece"] == pytest.approx(independent_ece(probs, labels), abs=1e-4)
    m = json.loads((run3 / "metrics.json").read_text())
    assert page.values["ece-scaled"] == pytest.approx(m["ece_temperature_scaled"], abs=1e-4)
    # metrics.json's ECE, from the logits, agrees with the 6-decimal probabilities' to 1e-4
    assert m["ece"] == pytest.approx(independent_ece(probs, labels), abs=1e-4)
    assert f"{m['temperature']:.4f}" in page.all_text


def test_the_confused_pairs_name_the_share_of_the_true_class():
    import torch

    from cifar_lightning.report.analysis import Predictions, confused_pairs, describe_pair

    # 003_cat: 10 images, 3 read as dog, 1 as bird; 005_dog: 4 images, 1 read as cat
    names = ["002_bird", "003_cat", "005_dog"]
    labels = torch.tensor([1] * 10 + [2] * 4)
    predicted = torch.tensor([2, 2, 2, 0] + [1] * 6 + [1, 2, 2, 2])
    pred = Predictions(names, ["x"] * 14, labels, predicted, torch.full((14, 3), 1 / 3))
    pairs = confused_pairs(pred)
    assert [describe_pair(p) for p in pairs] == [
        "cat → dog: 30.0% of cat (3 of 10)",
        "dog → cat: 25.0% of dog (1 of 4)",
        "cat → bird: 10.0% of cat (1 of 10)",
    ]


def test_cifar10_classes_get_the_vehicles_against_animals_line_and_others_do_not():
    import torch

    from cifar_lightning.report.analysis import Predictions, vehicles_and_animals
    from tests.conftest import CLASSES

    labels = torch.arange(10)
    predicted = torch.tensor([0, 1, 3, 3, 4, 5, 6, 7, 8, 9])  # every vehicle right; bird -> cat
    pred = Predictions(CLASSES, ["x"] * 10, labels, predicted, torch.eye(10))
    line = vehicles_and_animals(pred)
    assert line.startswith("Better on vehicles than on animals: 100.0%") and "83.3%" in line
    other = Predictions(CLASSES3, ["x"] * 3, torch.arange(3), torch.arange(3), torch.eye(3))
    assert vehicles_and_animals(other) is None


def test_thumbnails_come_only_from_inside_the_predictions_folder(tmp_path):
    from cifar_lightning.report.analysis import Gallery

    data, outside = tmp_path / "data", tmp_path / "secret"
    write_images(data / "a", 1, 0, size=40)
    write_images(data / "b", 1, 1, size=40)
    write_images(outside, 1, 2)
    (data / "a" / "link.png").symlink_to(outside / "0000.png")
    paths = [str(data / "a" / "0000.png"), str(data / "b" / "0000.png"), str(data / "a/link.png")]
    gallery = Gallery.for_paths(paths + [str(data / "a" / "gone.png")])
    uri = gallery.thumbnail(paths[0])
    assert base64.b64decode(uri.partition(",")[2])[:8] == PNG_MAGIC
    assert gallery.thumbnail(paths[2]) is None  # a symlink out of the folder is not followed
    assert gallery.thumbnail(str(data / "a" / "gone.png")) is None
    assert gallery.thumbnail(str(data / "a" / ".." / ".." / "secret" / "0000.png")) is None
    assert len(gallery.skipped) == 3


def test_a_failing_page_is_one_warning_and_every_other_artefact_is_written(
    layout3, tmp_path, monkeypatch, caplog
):
    from cifar_lightning.report import page
    from cifar_lightning.train import train

    def broken(context):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(page, "render", broken)
    with caplog.at_level(logging.WARNING):
        m = train(cfg_for(tmp_path, layout3, *FAST))
    ours = [r for r in caplog.records if r.levelno >= logging.WARNING and "cifar" in r.name]
    assert len(ours) == 1 and "report.html not written" in ours[0].getMessage()
    assert "template exploded" in ours[0].getMessage()
    assert not (tmp_path / "report.html").exists()
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] == m["test_accuracy"]
    )
    assert "temperature" in m  # the calibration, before the page, went through
    for name in ("predictions.csv", "confusion_matrix.png", "checkpoints/best.ckpt"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_report_false_writes_no_page_and_runs_no_calibration_pass(layout3, tmp_path):
    from cifar_lightning.train import train

    m = train(cfg_for(tmp_path, layout3, *FAST, "report=false"))
    assert not (tmp_path / "report.html").exists()
    assert "temperature" not in m and "calibration_seconds" not in m
    assert (tmp_path / "metrics.json").is_file() and "ece" in m


def test_a_run_without_a_test_phase_gets_a_page_that_says_so(layout3, tmp_path):
    from cifar_lightning.train import train

    train(cfg_for(tmp_path, layout3, *FAST, "test=false", "callbacks.checkpoint=null"))
    page = read_page(tmp_path)
    text = page.all_text
    assert "no test phase (test=false)" in text and "checkpoints/best.ckpt: none kept" in text
    assert "figure-training_curves" in page.ids and "figure-confusion_matrix" not in page.ids
    assert not page.pairs


def test_cifar_report_rebuilds_the_page_of_a_run_that_predates_it(run3, tmp_path):
    from cifar_lightning.report_cli import rebuild

    old = tmp_path / "old"
    shutil.copytree(run3, old)
    (old / "report.html").unlink()
    m = json.loads((old / "metrics.json").read_text())
    for key in NEW_KEYS:
        del m[key]
    (old / "metrics.json").write_text(json.dumps(m))
    rebuild(old)
    page = read_page(old)
    assert SECTIONS <= page.ids and "temperature" not in page.ids
    text = page.all_text
    assert "has no `hardware`" in text and "the fitted temperature" in text
    names, probs, labels, _ = read_predictions(old)
    assert page.values["ece"] == pytest.approx(independent_ece(probs, labels), abs=1e-4)
    # the console command, from another directory: Hydra leaves no files of its own anywhere
    (old / "report.html").unlink()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    before = sorted(p.name for p in old.iterdir())
    done = run_cli("cifar_lightning.report_cli", f"run_dir={old}", cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_page(old).ids >= SECTIONS
    assert sorted(p.name for p in old.iterdir()) == sorted([*before, "report.html"])
    assert not list(cwd.iterdir())


def test_cifar_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    done = run_cli("cifar_lightning.report_cli", f"run_dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "holds neither metrics.json nor predictions.csv" in done.stderr


def test_an_evaluate_output_gets_a_page_without_training_parts(run3, layout3, tmp_path):
    from cifar_lightning.evaluate import evaluate
    from cifar_lightning.schema import compose

    out = tmp_path / "eval"
    cfg = compose(
        [
            f"ckpt_path={run3 / 'checkpoints' / 'best.ckpt'}",
            f"eval_dir={layout3 / 'test'}",
            f"run_dir={out}",
            "device=cpu",
        ],
        config_name="evaluate",
    )
    m = evaluate(cfg)
    assert m["hardware"] and "ece" in m and "temperature" not in m
    page = read_page(out)
    assert {"figure-confusion_matrix", "figure-roc_curves", "figure-reliability"} <= page.ids
    assert "figure-training_curves" not in page.ids and "hparams-table" not in page.ids
    text = page.all_text
    assert "this is an evaluation of" in text and "no validation split" in text
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
