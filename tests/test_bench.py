"""bench.py and bench_pipelines.py, the arithmetic behind the timings: which round is
reported, and how a capped timed epoch caps its validation. The bench command itself is in
test_cli.py."""

import math

import pytest

from cifar_lightning.bench import median_run
from cifar_lightning.bench_pipelines import caps


def test_bench_median_of_an_even_number_of_rounds_is_the_lower_middle_run():
    # The reported run is a real one (no average of two runs): of 4 rounds, the 2nd fastest.
    runs = [{"epoch_s": s, "round": k} for k, s in enumerate([4.0, 1.0, 3.0, 2.0])]
    by_time = sorted(runs, key=lambda r: r["epoch_s"])
    assert median_run(runs) is by_time[len(runs) // 2 - 1]
    # odd: the middle one
    assert median_run(runs[:3]) is sorted(runs[:3], key=lambda r: r["epoch_s"])[1]
    assert median_run(runs[:1]) is runs[0]


def test_bench_caps_validation_in_proportion_to_training():
    # With max_steps the timed epoch keeps a whole epoch's train:val ratio, to be extrapolated.
    n_train, n_val = 100, 20
    assert caps(n_train, n_val, 10) == (10, n_val * 10 // n_train)
    assert caps(n_train, n_val, 7) == (7, math.ceil(n_val * 7 / n_train))  # rounded up, never 0
    assert caps(n_train, 5, 1) == (1, 1)
    assert caps(n_train, n_val, None) == (n_train, n_val)
    assert caps(n_train, n_val, 1000) == (n_train, n_val)  # a cap above the epoch changes nothing


def _bench(tmp_path, tiny_layout, *overrides):
    from cifar_lightning.config import compose

    cfg = compose(
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
        ],
        config_name="bench",
    )
    import cifar_lightning.bench as bench_module

    return bench_module.bench(cfg)


BF16_SKIP = (
    "(a), (c) and (k) at bf16-mixed skipped: the CPU has no native bf16 (AMX-BF16 or "
    "AVX512-BF16), so bf16 would be emulated, slower than fp32"
)


def test_bench_skips_bf16_in_one_line_on_a_cpu_without_native_bf16(
    tiny_layout, tmp_path, monkeypatch, capsys
):
    import cifar_lightning.bench as bench_module

    monkeypatch.setattr(bench_module, "cpu_has_native_bf16", lambda: False)
    out = _bench(tmp_path, tiny_layout, "pipelines=[a,c]", "precision=[32-true,bf16-mixed]")
    assert [(r["pipeline"], r["variant"]) for r in out["results"]] == [
        ("a", "32-true"),
        ("c", "32-true"),
    ]
    assert out["notes"] == [BF16_SKIP] and capsys.readouterr().out.count(BF16_SKIP) == 1
    assert out["machine"]["cpu_native_bf16"] is False


def test_bench_times_a_and_c_at_bf16_where_it_is_native(tiny_layout, tmp_path, monkeypatch):
    import cifar_lightning.bench as bench_module

    monkeypatch.setattr(bench_module, "cpu_has_native_bf16", lambda: True)
    out = _bench(
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


def test_bench_skips_k_in_one_line_where_keras_is_not_installed(tiny_layout, tmp_path):
    out = _bench(
        tmp_path, tiny_layout, "pipelines=[a,k]", "precision=[32-true]", "keras_python=/bin/false"
    )
    assert [r["pipeline"] for r in out["results"]] == ["a"]
    assert out["notes"] == [
        "(k) skipped: TensorFlow/Keras is not importable by /bin/false (pip install "
        "'cifar_lightning[keras]', or keras_python=PATH/TO/python)"
    ]


def _keras_python() -> str | None:
    import os
    import subprocess
    import sys

    py = os.environ.get("KERAS_PYTHON", sys.executable)
    found = subprocess.run([py, "-c", "import tensorflow"], capture_output=True)
    return py if found.returncode == 0 else None


# slow: TensorFlow is not among the test extras (hundreds of MB); with -m slow it needs the keras
# extra (or KERAS_PYTHON), and CI's rule that a skip for a missing extra fails applies to it too
@pytest.mark.slow
@pytest.mark.skipif(_keras_python() is None, reason="needs the keras extra (or KERAS_PYTHON)")
def test_bench_k_times_the_keras_notebook_and_pairs_it_with_c(tiny_layout, tmp_path):
    out = _bench(
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
