"""Files, written atomically: a reader sees the old file or the whole new one, and a failed write
(a full disk, say) leaves no temporary file behind."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artefacts are for people to open
        os.replace(tmp, path)
    finally:  # a failed write (disk full, say) leaves the old file and no temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
