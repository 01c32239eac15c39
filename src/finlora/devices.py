"""Which device and precision a run uses, refusing combinations known to fail before anything loads."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from finlora.errors import ConfigError


class Placement(NamedTuple):
    accelerator: str  # Lightning's name: cpu, gpu, cuda or mps
    precision: str  # Lightning's precision setting
    device: torch.device  # this process's device


def resolve_device(accelerator: str, precision: str | None, quant_bits: int | None,
                   compiled: bool = False) -> Placement:
    """`auto` means the GPU with bf16-mixed if there is one, else the CPU in 32-bit; under DDP each process
    takes the GPU of its LOCAL_RANK. `compiled`: `trainer.compile` asks for torch.compile, which finlora
    runs on CUDA only (on the CPU it costs minutes of C++ compilation for a step that Python does not bind)."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: a GPU was asked for but torch sees none (use trainer=cpu)")
    if precision is None:
        precision = "bf16-mixed" if accelerator != "cpu" and torch.cuda.is_bf16_supported() else "32-true"
    if accelerator == "cpu" and quant_bits == 8 and precision != "32-true":
        raise ConfigError(f"trainer.precision: bitsandbytes 8-bit on the CPU fails under {precision}; "
                          "use trainer.precision=32-true (trainer=cpu)")
    if compiled and accelerator not in ("gpu", "cuda"):
        raise ConfigError(f"trainer.compile: runs on a CUDA GPU only, and this run is on {accelerator}; "
                          "use trainer.compile=eager")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if accelerator != "cpu"
              else torch.device("cpu"))
    return Placement(accelerator, precision, device)
