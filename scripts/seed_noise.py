"""Do two recipes differ by more than seed noise? Reads each run's metrics.json.

    python scripts/seed_noise.py RUN_A1 RUN_A2 RUN_A3 -- RUN_B1 RUN_B2 RUN_B3

The difference counts as inside seed noise when the two means differ by less than twice the
larger of the two sample standard deviations (n-1). Prints both figures, per metric."""

import json
import statistics
import sys
from pathlib import Path

METRICS = ("test_accuracy", "f1_macro")


def mean_std(runs: list[Path], key: str) -> tuple[float, float]:
    values = [json.loads((run / "metrics.json").read_text())[key] for run in runs]
    return statistics.mean(values), statistics.stdev(values)


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") in (0, len(argv) - 1) or "-h" in argv:
        raise SystemExit(__doc__ + "\nerror: give run directories of A, then --, then those of B")
    split = argv.index("--")
    a, b = argv[:split], argv[split + 1 :]
    a, b = [Path(p) for p in a], [Path(p) for p in b]
    for key in METRICS:
        (ma, sa), (mb, sb) = mean_std(a, key), mean_std(b, key)
        diff, limit = abs(ma - mb), 2 * max(sa, sb)
        verdict = "inside seed noise" if diff < limit else "beyond seed noise"
        print(
            f"{key}: A {ma:.4f} ± {sa:.4f} (n={len(a)}), B {mb:.4f} ± {sb:.4f} (n={len(b)}); "
            f"|difference| {diff:.4f} vs 2 x larger std {limit:.4f}: {verdict}"
        )


if __name__ == "__main__":
    main()
