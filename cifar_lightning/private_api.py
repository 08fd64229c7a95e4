"""The library internals the project needs and no public API offers, wrapped here and nowhere
else. tests/test_private_api.py fails when a library release changes one of them."""

from __future__ import annotations

import argparse


def hydra_args_parser() -> argparse.ArgumentParser:
    """Hydra's own command-line parser: the one that reads `--experimental-rerun` (and takes its
    abbreviations) and the overrides, so that we refuse what Hydra would act on before it starts."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16, or AMX tiles), by torch.cpu's
    own probes. Not oneDNN's `_is_mkldnn_bf16_supported`: it says yes on any AVX-512 CPU, where
    bf16 is emulated and runs slower than fp32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
