"""Copy a checkpoint without its optimizer and callback state, for evaluate and predict only.

    python scripts/slim_checkpoint.py outputs/DATE/TIME/checkpoints/best.ckpt best-weights.ckpt

The copy scores exactly as the original (`cifar-evaluate ckpt_path=...`); it cannot be resumed."""

import sys
from pathlib import Path

from cifar_lightning.errors import UserError
from cifar_lightning.model.checkpoint import inference_copy


def main() -> None:
    if len(sys.argv) != 3 or "-h" in sys.argv:
        raise SystemExit(__doc__ + "\nerror: give the checkpoint to read and the file to write")
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        inference_copy(src, dst)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB (from {src.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
