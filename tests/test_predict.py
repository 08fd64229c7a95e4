"""predict.py: which files an `inputs` pattern or folder selects, and the predictions it
writes (top-k classes and probabilities)."""

import csv

import pytest
import torch

from cifar_lightning.data.folder import EXTENSIONS
from cifar_lightning.errors import UserError
from cifar_lightning.predict import find_inputs
from cifar_lightning.schema import compose
from tests.conftest import make_classifier, save_ckpt, write_images


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # find_inputs only looks at names; decoding comes later


def test_predict_glob_selects_exactly_the_matching_files(tmp_path):
    # 'pics/*.jpg' is the shell's meaning: that folder only, that extension only.
    d = tmp_path / "pics"
    _touch(d / "b.jpg", d / "a.jpg", d / "c.png", d / "sub" / "d.jpg", d / "e.jpgx")
    assert find_inputs(f"{d}/*.jpg") == [d / "a.jpg", d / "b.jpg"]
    # ** recurses
    assert find_inputs(f"{d}/**/*.jpg") == [d / "a.jpg", d / "b.jpg", d / "sub" / "d.jpg"]


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


def test_predict_prediction_is_the_top1_class(tmp_path):
    from cifar_lightning.predict import predict

    module = make_classifier(tmp_path)
    with torch.no_grad():  # spread the probabilities, so that top1 and top3 are different classes
        module.net.classifier[-1].weight.mul_(20)
    ckpt = save_ckpt(module, tmp_path / "m.ckpt")
    write_images(tmp_path / "pics", 4, 3)
    cfg = compose(
        [
            f"ckpt_path={ckpt}",
            f"inputs={tmp_path / 'pics'}",
            f"run_dir={tmp_path / 'out'}",
            "device=cpu",
            "top_k=3",
        ],
        config_name="predict",
    )
    rows = predict(cfg)
    assert len(rows) == 4
    for r in rows:
        p = [float(r[f"p{j}"]) for j in (1, 2, 3)]
        assert r["prediction"] == r["top1"] and p == sorted(p, reverse=True) and p[0] > p[2]
    with open(tmp_path / "out" / "predictions.csv") as f:
        assert [r["prediction"] for r in csv.DictReader(f)] == [r["top1"] for r in rows]
