"""What the original Keras notebook printed: the figures a reproduction is compared against, and the
tool that sets runs beside them.

    python -m cifar_lightning.notebook RUN_DIR [RUN_DIR ...] --out docs/reproduction

writes docs/reproduction.png (the first run's per-epoch loss and accuracy against the notebook's
log, LR cuts marked), docs/reproduction_<dir>.png for each further run, and docs/reproduction.md
(the table, and test accuracy/F1 as mean ± std over the runs)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

VAL_LOSS = [
    1.3683,
    1.2969,
    1.0690,
    1.6596,
    0.8689,
    1.0259,
    0.9757,
    0.8880,
    0.6032,
    0.6111,
    0.6275,
    0.6083,
    0.5949,
    0.5965,
    0.5969,
    0.5996,
    0.5983,
    0.5988,
    0.5999,
]  # epochs 1-19
LR_CUT_AFTER = [8, 12, 16, 19]
BEST_EPOCH, BEST_VAL_ACC, FIRST_VAL_ACC = 13, 0.8109, 0.506
TEST = {
    "test_accuracy": 0.8155,
    "precision_macro": 0.8146,
    "recall_macro": 0.8155,
    "f1_macro": 0.8147,
}
MS_PER_STEP = 89


def _mean_std(xs: list[float]) -> str:
    return (
        f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
    )


def compare(run_dirs: list[Path], out: Path) -> str:
    from cifar_lightning.report.figures import plot_history
    from cifar_lightning.report.files import read_csv, save_figure

    runs = [
        (d, read_csv(d / "history.csv"), json.loads((d / "metrics.json").read_text()))
        for d in run_dirs
    ]
    reference = [
        {"epoch": i + 1, "val_loss": v, "lr": 1e-3 * 0.1 ** sum(i + 1 > c for c in LR_CUT_AFTER)}
        for i, v in enumerate(VAL_LOSS)
    ]
    # all the log gives
    reference[0]["val_acc"], reference[BEST_EPOCH - 1]["val_acc"] = FIRST_VAL_ACC, BEST_VAL_ACC
    out.parent.mkdir(parents=True, exist_ok=True)
    # the first run is OUT.png, each further one OUT_<its dir>.png
    for i, (d, history, metrics) in enumerate(runs):
        png = out.with_suffix(".png") if i == 0 else out.with_name(f"{out.name}_{d.name}.png")
        fig = plot_history(history, reference, "notebook", best=metrics.get("best_epoch"))
        save_figure(fig, png)
    lines = [
        "| epoch | notebook val_loss | "
        + " | ".join(f"{d.name} train_loss / val_loss / val_acc / lr" for d, _, _ in runs)
        + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for e in range(max(len(VAL_LOSS), *(len(h) for _, h, _ in runs))):
        cells = [
            f"{VAL_LOSS[e]:.4f}{' (LR cut after)' if e + 1 in LR_CUT_AFTER else ''}"
            if e < len(VAL_LOSS)
            else ""
        ]
        for _, h, _ in runs:
            r = h[e] if e < len(h) else None
            cells.append(
                f"{float(r['train_loss']):.4f} / {float(r['val_loss']):.4f} / "
                f"{float(r['val_acc']):.4f} / {float(r['lr']):.0e}"
                if r
                else ""
            )
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    lines += ["", "| | notebook | this project (mean ± std over runs) |", "|---|---|---|"]
    for key, ref in TEST.items():
        lines.append(f"| {key} | {ref:.4f} | {_mean_std([m[key] for _, _, m in runs])} |")
    lines.append(
        f"| best epoch | {BEST_EPOCH} | {', '.join(str(m['best_epoch']) for _, _, m in runs)} |"
    )
    lines.append(f"| epochs run | 19 | {', '.join(str(m['epochs_run']) for _, _, m in runs)} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    args = ap.parse_args()
    print(compare(args.runs, args.out))
