"""trainer.precision=auto: the precision the hardware runs fastest, chosen before the Trainer is
built and logged with its reason.

- A CPU that multiplies bf16 natively (AMX-BF16, or AVX512-BF16): bf16-mixed. Measured on a
  2-vCPU Intel Xeon with AMX, Model S trains about 2x faster in bf16 autocast than in fp32.
- A CPU without it: 32-true. There bf16 is emulated, and slower than fp32 (oneDNN's own check
  says yes on any AVX-512 CPU, so it is not the test used).
- A GPU: 32-true with TF32 matmuls, which the benchmark measured faster on an H200 than
  bf16-mixed (0.83x of fp32's speed).
Any other value is used as it is."""

from __future__ import annotations

import torch

from cifar_lightning.private_api import cpu_has_native_bf16

AUTO = "auto"


def resolve(setting: str, accelerator: str) -> tuple[str, str]:
    """(precision, why) for trainer.precision=`setting` on trainer.accelerator=`accelerator`."""
    if str(setting) != AUTO:
        return str(setting), "as configured"
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "32-true", "a GPU: 32-true with TF32 ran faster than bf16-mixed in the benchmark"
    if cpu_has_native_bf16():
        return "bf16-mixed", "the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16)"
    return "32-true", "the CPU has no native bf16 (emulated bf16 runs slower than fp32)"
