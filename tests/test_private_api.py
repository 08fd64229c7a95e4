"""The library internals that private_api.py wraps still behave as it expects. A failure here
means a Hydra or PyTorch release changed them: update private_api.py, nothing else."""

import torch

from cifar_lightning.private_api import cpu_has_native_bf16, hydra_args_parser


def test_hydras_parser_reads_the_rerun_flag_its_abbreviation_and_the_overrides():
    args, _ = hydra_args_parser().parse_known_args(["--exp", "FILE", "a=1", "b=2"])
    assert args.experimental_rerun == "FILE"
    assert args.overrides == ["a=1", "b=2"]


def test_torchs_cpu_probes_answer_whether_bf16_is_native():
    # the two probes cpu_has_native_bf16 reads: still there, still plain yes/no answers
    probes = (torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported())
    assert all(isinstance(p, bool) for p in probes)
    assert cpu_has_native_bf16() is any(probes)
