"""Tiny image folders made in tmp_path, config composition, and the small models and batches
shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_lightning.schema import compose

CLASSES = [
    f"{i:03d}_{n}"
    for i, n in enumerate(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    )
]
SPLITS = {"train_1": 2, "train_2": 2, "train_3": 2, "train_4": 2, "valid": 2, "test": 3}


def write_images(
    folder: Path, n: int, cls: int, seed: int = 0, size: int = 32, ext: str = ".png"
) -> None:
    """n learnable images of class `cls`: a class-dependent brightness plus noise."""
    rng = np.random.default_rng(seed * 1000 + cls)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.clip(rng.normal(20 + cls * 22, 15, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:04d}{ext}")


def make_layout(root: Path, classes=CLASSES, splits=SPLITS) -> Path:
    for s, (split, n) in enumerate(splits.items()):
        for c, name in enumerate(classes):
            write_images(root / split / name, n, c, seed=s)
    return root


@pytest.fixture(scope="session")
def tiny_layout(tmp_path_factory) -> Path:
    """The notebook's layout, 10 classes, a few 32x32 images per class and split."""
    return make_layout(tmp_path_factory.mktemp("data") / "cifar10")


def cfg_for(run_dir: Path, data_root: Path, *overrides: str):
    return compose(
        [
            f"run_dir={run_dir}",
            f"data.root={data_root}",
            "trainer=cpu",
            "callbacks.progress_bar.refresh_rate=0",
            *overrides,
        ]
    )


def make_classifier(tmp_path, *overrides: str, precision: str = "32-true"):
    """A Classifier of the default config with `overrides` (`tta.flip=true`, ...), built as
    train builds it, seeded."""
    from cifar_lightning.build import build_module  # here: lightning is slow to import

    cfg = cfg_for(tmp_path, tmp_path, *overrides)
    torch.manual_seed(0)
    return build_module(cfg, CLASSES, precision)


def image_batch(n=6):
    """n seeded random uint8 32x32 images and their labels, 0-9 in turn."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) % 10


def save_ckpt(module, path):
    """A checkpoint of just the module's hyperparameters and weights, as load_net reads them."""
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RunsCode:
    """Pickles as a call that writes $PWNED_MARKER: a hostile file's payload, for the tests that
    it never runs."""

    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['PWNED_MARKER'], 'w').write('ran')",))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI set), a test skipped because an optional extra is missing fails instead: CI
    installs the extras the tests need, so such a skip means the integration went untested. Such
    skips say "needs the NAME extra"; a skip for missing hardware (CUDA) stays a skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and " extra" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing extra, which CI must install: {report.longrepr}"
