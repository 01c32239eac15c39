"""Which device and precision a run uses, refusing combinations known to fail before anything loads."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from typing import NamedTuple

import torch

from finlora.errors import ConfigError


class Placement(NamedTuple):
    accelerator: str  # Lightning's name: cpu, gpu, cuda or mps
    precision: str  # Lightning's precision setting
    device: torch.device  # this process's device


def resolve_device(accelerator: str, precision: str | None, quant_bits: int | None) -> Placement:
    """`auto` means the GPU with bf16-mixed if there is one, else the CPU in 32-bit; under DDP each process
    takes the GPU of its LOCAL_RANK."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: a GPU was asked for but torch sees none (use trainer=cpu)")
    if precision is None:
        precision = "bf16-mixed" if accelerator != "cpu" and torch.cuda.is_bf16_supported() else "32-true"
    if accelerator == "cpu" and quant_bits == 8 and precision != "32-true":
        raise ConfigError(f"trainer.precision: bitsandbytes 8-bit on the CPU fails under {precision}; "
                          "use trainer.precision=32-true (trainer=cpu)")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if accelerator != "cpu"
              else torch.device("cpu"))
    return Placement(accelerator, precision, device)


def environment() -> dict:
    """The device and precision `trainer=auto` picks on this machine and the versions of the libraries that
    shape results: what a report written elsewhere, from the runs' files, says they ran on."""
    _, precision, device = resolve_device("auto", None, None)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
            "precision": precision,
            "versions": {p: version(p) for p in ("torch", "transformers", "peft", "lightning")}}
