"""The benchmark in benchmarks/ (bench.py, bench_pipelines.py): the arithmetic behind the timings
(which round is reported, how a capped epoch caps its validation, the compile payoff), the bench's
own config keys, and the command itself, run as `python benchmarks/bench.py` from a clone against
the installed package."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_lightning.errors import UserError, one_line

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module(monkeypatch, name: str):
    """A module of benchmarks/: the benchmark is not part of the package, so its folder goes on
    sys.path for the test, as `python benchmarks/bench.py` puts it there."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture
def bench(monkeypatch):
    return _benchmark_module(monkeypatch, "bench")


@pytest.fixture
def pipelines(monkeypatch):
    return _benchmark_module(monkeypatch, "bench_pipelines")


def run_bench(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python benchmarks/bench.py ARGS`, started from `cwd` (not the clone's root)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_median_of_an_even_number_of_rounds_is_the_lower_middle_run(bench):
    # The reported run is a real one (no average of two runs): of 4 rounds, the 2nd fastest.
    runs = [{"epoch_s": s, "round": k} for k, s in enumerate([4.0, 1.0, 3.0, 2.0])]
    by_time = sorted(runs, key=lambda r: r["epoch_s"])
    assert bench.median_run(runs) is by_time[len(runs) // 2 - 1]
    # odd: the middle one
    assert bench.median_run(runs[:3]) is sorted(runs[:3], key=lambda r: r["epoch_s"])[1]
    assert bench.median_run(runs[:1]) is runs[0]


def test_bench_caps_validation_in_proportion_to_training(pipelines):
    # With max_steps the timed epoch keeps a whole epoch's train:val ratio, to be extrapolated.
    caps = pipelines.caps
    n_train, n_val = 100, 20
    assert caps(n_train, n_val, 10) == (10, n_val * 10 // n_train)
    assert caps(n_train, n_val, 7) == (7, math.ceil(n_val * 7 / n_train))  # rounded up, never 0
    assert caps(n_train, 5, 1) == (1, 1)
    assert caps(n_train, n_val, None) == (n_train, n_val)
    assert caps(n_train, n_val, 1000) == (n_train, n_val)  # a cap above the epoch changes nothing


def test_bench_compile_payoff_arithmetic(bench):
    def runs(*pairs):  # (one_off_s, full_epoch_s_est) per round
        return [{"one_off_s": o, "full_epoch_s_est": e} for o, e in pairs]

    timed = {
        ("a", "32-true"): runs((0.5, 50.0)),
        ("c", "32-true"): runs((1.0, 60.0)),
        ("c", "32-true+compile"): runs((41.0, 56.0)),
    }
    (p,) = bench.compile_payoff(timed)
    assert p == {
        "precision": "32-true",
        "one_off_s": 40.0,
        "saved_per_epoch_s": 4.0,
        "saved_per_epoch_s_per_round": [4.0],
        "pays_off_after_epochs": 10.0,
        "net_gain_30_epochs_s": 80.0,
    }
    timed["c", "32-true+compile"] = runs((41.0, 61.0))  # slower compiled: never pays off
    assert bench.compile_payoff(timed)[0]["pays_off_after_epochs"] is None
    # Rounds pair up, as the ratios do: the saving is the median of the per-round differences
    # (+2, -11, +1 -> +1), not the difference of the rows' medians (70 - 79 = -9, "never pays off").
    timed["c", "32-true"] = runs((1.0, 60.0), (1.0, 70.0), (1.0, 80.0))
    timed["c", "32-true+compile"] = runs((21.0, 58.0), (0.5, 81.0), (0.4, 79.0))
    (p,) = bench.compile_payoff(timed)
    assert p["saved_per_epoch_s_per_round"] == [2.0, -11.0, 1.0] and p["saved_per_epoch_s"] == 1.0
    # the first round's compile
    assert p["one_off_s"] == 20.0 and p["pays_off_after_epochs"] == 20.0
    timed["c", "32-true+compile"][0]["one_off_s"] = 0.2  # below eager's: noise, not a negative cost
    assert (
        bench.compile_payoff(timed)[0]["one_off_s"] == 0.0
        and bench.compile_payoff(timed)[0]["pays_off_after_epochs"] == 0.0
    )
    timed["c", "32-true"][0]["one_off_s"] = None  # warmup_steps=0: eager had no warm-up to measure
    assert bench.compile_payoff(timed)[0]["one_off_s"] == 0.2


# ---------------------------------------------------------------- the bench's config
def test_the_bench_composes_the_training_groups_with_the_same_meaning(bench):
    # bench.yaml reaches the package's groups through its search path: an override names the
    # same thing as in train, and the nodes pipeline (c)'s Classifier needs are there
    cfg = bench.compose(
        ["run_dir=x", "optim=adam", "experiment=next", "speed.compile=true", "pipelines=[a,c]"]
    )
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.augment.flip is True
    assert {"loss", "tta", "whiten", "speed", "fidelity", "trainer", "callbacks"} <= set(cfg)
    assert cfg.speed.compile is True and list(cfg.pipelines) == ["a", "c"]
    assert cfg.compile_c is None and cfg.max_steps is None and cfg.rounds == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("max_steps=0", "max_steps=0: must be >= 1"),
        ("rounds=0", "rounds=0: must be >= 1"),
        ("threads=0", "threads=0: must be >= 1"),
        ("keras_epochs=1", "keras_epochs=1: must be >= 2"),
        (
            "batch_sizes=[0]",
            "batch_sizes=[0]: must be a list like [64,256]; each item must be >= 1",
        ),
        (
            "pipelines=[a,d]",
            "pipelines=['a', 'd']: must be a list like [a,b,c,k]; each item must be one of: a, b, "
            "c, k",
        ),
        (
            "pipelines=[]",
            "pipelines=[]: must be a list like [a,b,c,k]; each item must be one of: a, b, c, k",
        ),
        (
            "keras=[float16]",
            "keras=['float16']: must be a list like [float32,mixed_bfloat16]; each item must be "
            "one of: float32, mixed_bfloat16",
        ),
        (
            "fractions=[0]",
            "fractions=[0.0]: must be a list like [0.25,0.5,1.0]; "
            "each item must be a number in (0, 1]",
        ),
        (
            "compile_c=[no]",
            "compile_c=['no']: must be a list like [false,true]; each item must be true or false",
        ),
        (
            "compile_c=true",
            "compile_c=True: must be a list like [false,true]; each item must be true or false",
        ),
        (
            "trainer.profiler=simple",
            "trainer.profiler=simple is not for the benchmark, where it would slow (c) "
            "alone; profile with python -m cifar_lightning.train trainer.profiler=...",
        ),
    ],
)
def test_the_bench_checks_its_own_values_first(bench, override, message, tmp_path):
    given = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'no_data'}"]
    cfg = bench.compose([*given, override])
    # before the missing data
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        bench.bench(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("rounds=abc", "rounds: Value 'abc' of type 'str' could not be converted to Integer"),
        # a typo of pipelines: BenchConfig declares every key the bench takes
        ("pipeline=[a,c]", "pipeline: Key 'pipeline' not in 'BenchConfig'"),
    ],
)
def test_the_bench_refuses_a_wrong_type_or_an_unknown_key_while_composing(bench, override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as refused:
        bench.compose(["run_dir=x", override])
    assert one_line(refused.value) == f"error: {message}"  # the line the command prints


# ---------------------------------------------------------------- in process
def _bench(bench, tmp_path, tiny_layout, *overrides):
    cfg = bench.compose(
        [
            f"run_dir={tmp_path}",
            f"data.root={tiny_layout}",
            "trainer=cpu",
            "max_steps=2",
            "warmup_steps=0",
            "batch_sizes=[]",
            "fractions=[]",
            "callbacks.progress_bar.refresh_rate=0",
            *overrides,
        ]
    )
    return bench.bench(cfg)


BF16_SKIP = (
    "(a), (c) and (k) at bf16-mixed skipped: the CPU has no native bf16 (AMX-BF16 or "
    "AVX512-BF16), so bf16 would be emulated, slower than fp32"
)


def test_bench_skips_bf16_in_one_line_on_a_cpu_without_native_bf16(
    bench, tiny_layout, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)
    out = _bench(bench, tmp_path, tiny_layout, "pipelines=[a,c]", "precision=[32-true,bf16-mixed]")
    assert [(r["pipeline"], r["variant"]) for r in out["results"]] == [
        ("a", "32-true"),
        ("c", "32-true"),
    ]
    assert out["notes"] == [BF16_SKIP] and capsys.readouterr().out.count(BF16_SKIP) == 1
    assert out["machine"]["cpu_native_bf16"] is False


def test_bench_times_a_and_c_at_bf16_where_it_is_native(bench, tiny_layout, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: True)
    out = _bench(
        bench,
        tmp_path,
        tiny_layout,
        "pipelines=[a,c]",
        "precision=[32-true,bf16-mixed]",
        "batch_sizes=[8]",
    )
    assert [(r["pipeline"], r["variant"]) for r in out["results"]] == [
        ("a", "32-true"),
        ("a", "bf16-mixed"),
        ("c", "32-true"),
        ("c", "bf16-mixed"),
    ]
    assert {"c/a", "c/a[bf16-mixed]", "c[bf16-mixed]/c[32-true]"} <= set(out["ratios"])
    assert [(r["batch_size"], r["precision"]) for r in out["scaling_batch_size"]] == [
        (8, "32-true"),
        (8, "bf16-mixed"),
    ]


def test_bench_skips_k_in_one_line_where_keras_is_not_installed(bench, tiny_layout, tmp_path):
    out = _bench(
        bench,
        tmp_path,
        tiny_layout,
        "pipelines=[a,k]",
        "precision=[32-true]",
        "keras_python=/bin/false",
    )
    assert [r["pipeline"] for r in out["results"]] == ["a"]
    assert out["notes"] == [
        "(k) skipped: TensorFlow/Keras is not importable by /bin/false (pip install "
        "'cifar_lightning[keras]', or keras_python=PATH/TO/python)"
    ]


def _keras_python() -> str | None:
    py = os.environ.get("KERAS_PYTHON", sys.executable)
    found = subprocess.run([py, "-c", "import tensorflow"], capture_output=True)
    return py if found.returncode == 0 else None


# keras: TensorFlow is not among the test extras (hundreds of MB), so this runs with -m keras where
# the keras extra (or KERAS_PYTHON) is installed; CI runs `-m "slow and not keras"`
@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.skipif(_keras_python() is None, reason="needs the keras extra (or KERAS_PYTHON)")
def test_bench_k_times_the_keras_notebook_and_pairs_it_with_c(bench, tiny_layout, tmp_path):
    out = _bench(
        bench,
        tmp_path,
        tiny_layout,
        "pipelines=[c,k]",
        "precision=[32-true]",
        "keras=[float32]",
        "keras_epochs=2",
        f"keras_python={_keras_python()}",
    )
    k = out["results"][1]
    assert (k["pipeline"], k["variant"]) == ("k", "float32")
    # 4 train dirs of 20 images at batch 64: one batch each, every image once per epoch
    assert k["train_steps"] == 4 and k["images"] == 80 and len(k["keras"]["epoch_seconds"]) == 2
    assert out["ratios"]["c/k"] > 0


# ---------------------------------------------------------------- the command
@pytest.mark.parametrize("pipeline", ["a", "b"])
def test_bench_bad_optimizer_value_is_one_error_line(tiny_layout, tmp_path, pipeline):
    # (a) and (b) build the optimizer themselves, not through the Classifier; rho=1.5 passes the
    # schema (it has no range rule for rho) and is refused by the optimizer
    res = run_bench(
        f"data.root={tiny_layout}",
        "trainer=cpu",
        f"pipelines=[{pipeline}]",
        "precision=[32-true]",
        "optim.rho=1.5",
        "batch_sizes=[]",
        "fractions=[]",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip().splitlines()[-1]
        == "error: optim: invalid RMSprop hyperparameters lr=0.001 rho=1.5 eps=1e-07"
    )


@pytest.mark.slow
def test_bench_runs_every_pipeline_and_writes_json(tiny_layout, tmp_path):
    res = run_bench(
        f"data.root={tiny_layout}",
        "trainer=cpu",
        "pipelines=[a,b,c]",
        "precision=[32-true]",
        "max_steps=2",
        "warmup_steps=1",
        "batch_sizes=[8]",
        "fractions=[0.5]",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert "c/a" in res.stdout and "c/b" in res.stdout
    assert [r["pipeline"] for r in out["results"]] == ["a", "b", "c"]
    assert out["ratios"]["c/a"] > 0 and out["ratios"]["c/b"] > 0
    assert all(0 < r["warmup_s"] and r["one_off_s"] < r["warmup_s"] for r in out["results"])
    assert (
        out["cache"]["load_s"] < out["cache"]["build_s"] + 1
        and out["scaling_fraction"]
        and out["scaling_batch_size"]
    )
    assert "(a) at batch 8, 32-true:" in res.stdout
    assert "(a) on 0.5 of the train set, 32-true:" in res.stdout
    # (c) is timed as train runs it, with the configured callbacks and logger; their files removed
    c = out["results"][2]
    assert {
        "ModelCheckpoint",
        "EarlyStopping",
        "TQDMProgressBar",
        "LearningRateMonitor",
        "History",
        "RandomState",
    } <= set(c["callbacks"]) and c["logger"] == "TensorBoardLogger"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        ".hydra",
        "bench.json",
        "bench.log",
    ]


@pytest.mark.slow
def test_bench_interleaved_rounds_report_median_and_paired_ratios(tiny_layout, tmp_path):
    res = run_bench(
        f"data.root={tiny_layout}",
        "trainer=cpu",
        "pipelines=[a,c]",
        "precision=[32-true]",
        "rounds=3",
        "max_steps=2",
        "warmup_steps=0",
        "batch_sizes=[]",
        "fractions=[]",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "b" / "bench.json").read_text())
    for row in out["results"]:
        times = sorted(r["epoch_s"] for r in row["rounds"])
        assert len(times) == 3 and row["epoch_s"] == times[1]  # the median round is the row
    pairs = [
        c["images_per_s"] / a["images_per_s"]
        for a, c in zip(*(r["rounds"] for r in out["results"]))
    ]
    assert out["ratios_per_round"]["c/a"] == pytest.approx(pairs, abs=1e-3)
    assert out["ratios"]["c/a"] == pytest.approx(sorted(pairs)[1], abs=1e-3)
    assert "per round: c/a" in res.stdout
    # progress: one line per timed epoch as it ends, in interleaved order
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("round ")]
    assert [ln.split(":")[0].split()[:3] for ln in lines] == [
        ["round", f"{k}/3", p] for k in (1, 2, 3) for p in "ac"
    ]


@pytest.mark.slow  # compiles the network on the CPU: a minute or more
def test_bench_times_eager_and_compiled_c_side_by_side(tiny_layout, tmp_path):
    res = run_bench(
        f"data.root={tiny_layout}",
        "trainer=cpu",
        "pipelines=[c]",
        "precision=[32-true]",
        "compile_c=[false,true]",
        "max_steps=2",
        "warmup_steps=1",
        "batch_sizes=[]",
        "fractions=[]",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["variant"] for r in out["results"]] == ["32-true", "32-true+compile"]
    assert (
        "c[32-true+compile]/c[32-true]" in out["ratios"]
        and "torch.compile at 32-true" in res.stdout
    )
    assert out["compile_payoff"][0]["one_off_s"] > 0  # compiling costs time up front
