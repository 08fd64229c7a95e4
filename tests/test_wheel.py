"""The wheel is the package a user installs: it carries the configs and the console scripts, and
runs from any directory, with nothing of the source tree on its path. The configs live in conf/ at
the top of the repository and ship as the package cifar_lightning.conf, which the editable install
maps to conf/ too."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# every config file, as the wheel names it: conf/X.yaml is cifar_lightning/conf/X.yaml
IN_REPO = {
    f"cifar_lightning/conf/{p.relative_to(REPO / 'conf').as_posix()}"
    for p in (REPO / "conf").rglob("*.yaml")
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source (the checkout stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for folder in ("cifar_lightning", "conf"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # no build isolation: the installed setuptools builds it, with no download
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
        check=True,
        cwd=tmp,
    )
    (built,) = (tmp / "dist").glob("cifar_lightning-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel) -> Path:
    """The wheel installed without dependencies into a target folder; returns the folder."""
    site = wheel.parent.parent / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    return site


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


def test_the_wheel_holds_every_config_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if n.endswith(".yaml")} == IN_REPO
    assert {
        "cifar_lightning/conf/__init__.py",
        "cifar_lightning/conf/config.yaml",
        "cifar_lightning/conf/recipe.yaml",
        "cifar_lightning/conf/model/s.yaml",
        "cifar_lightning/conf/experiment/best.yaml",
        "cifar_lightning/conf/hydra/job_logging/plain.yaml",
    } <= names
    assert not [n for n in names if n.startswith("conf/")]  # no top-level package named conf


def test_the_wheel_ships_every_config_and_imports_from_itself(installed, tmp_path):
    shipped = {
        p.relative_to(installed).as_posix()
        for p in (installed / "cifar_lightning" / "conf").rglob("*.yaml")
    }
    assert shipped == IN_REPO and "cifar_lightning/conf/config.yaml" in shipped
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


@pytest.mark.parametrize("script", ["cifar-train", "cifar-prepare", "cifar-lr-find"])
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


def test_the_editable_install_reads_the_repositorys_conf_from_any_directory(tmp_path):
    # pkg://cifar_lightning.conf, as every entry point names its configs, is conf/ of the checkout
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    where = subprocess.run(
        [sys.executable, "-c", "import cifar_lightning.conf as c; print(c.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == REPO / "conf" / "__init__.py"
    res = subprocess.run(
        [sys.executable, "-m", "cifar_lightning.train", "--cfg", "job", "model.dropout=0.25"],
        cwd=tmp_path,
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "root: data/cifar10" in res.stdout and "dropout: 0.25" in res.stdout
