"""bench.py and bench_pipelines.py, the arithmetic behind the timings: which round is
reported, and how a capped timed epoch caps its validation. The bench command itself is in
test_cli.py."""

import math

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
