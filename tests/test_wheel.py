"""The wheel is the package a user installs: it carries the configs and the console scripts, and
runs from any directory, with nothing of the source tree on its path."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source (the checkout stays clean) and installed
    without dependencies into a target folder; returns the folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO / "cifar_lightning",
        src / "cifar_lightning",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # no build isolation: the installed setuptools builds it, with no download
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
        check=True,
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("cifar_lightning-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
        check=True,
        cwd=tmp,
    )
    return tmp / "site"


def run_installed(site: Path, script: str, *args: str, cwd: Path):
    # the target folder first on the path: it, not the checkout's editable install, is imported
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [str(site / "bin" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_wheel_ships_every_config_and_imports_from_itself(installed, tmp_path):
    shipped = {
        p.relative_to(installed / "cifar_lightning").as_posix()
        for p in (installed / "cifar_lightning" / "conf").rglob("*.yaml")
    }
    in_repo = {
        p.relative_to(REPO / "cifar_lightning").as_posix()
        for p in (REPO / "cifar_lightning" / "conf").rglob("*.yaml")
    }
    assert shipped == in_repo and "conf/config.yaml" in shipped
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [sys.executable, "-c", "import cifar_lightning; print(cifar_lightning.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(installed))


@pytest.mark.parametrize("script", ["cifar-train", "cifar-prepare", "cifar-bench"])
def test_console_scripts_compose_their_config_from_any_directory(installed, tmp_path, script):
    res = run_installed(installed, script, "--cfg", "job", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "data:" in res.stdout and "root: data/cifar10" in res.stdout


def test_a_config_dir_of_the_users_extends_the_shipped_groups(installed, tmp_path):
    mine = tmp_path / "myconf" / "optim"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("defaults: [rmsprop]\nlr: 0.0123\n")
    res = run_installed(
        installed,
        "cifar-train",
        "--config-dir",
        str(tmp_path / "myconf"),
        "optim=mine",
        "--cfg",
        "job",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "lr: 0.0123" in res.stdout


def test_evaluate_and_predict_report_a_missing_checkpoint_as_one_line(installed, tmp_path):
    for script, data in (("cifar-evaluate", "eval_dir=x"), ("cifar-predict", "inputs=x")):
        res = run_installed(installed, script, "ckpt_path=nope.ckpt", data, cwd=tmp_path)
        assert res.returncode == 2
        assert res.stderr.strip().splitlines()[-1] == "error: ckpt_path=nope.ckpt: no such file"
