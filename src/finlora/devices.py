"""Which device and precision a run uses, refusing combinations known to fail before anything loads."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any, NamedTuple

import torch

from finlora.errors import ConfigError


class Placement(NamedTuple):
    accelerator: str  # Lightning's name: cpu, gpu, cuda or mps
    precision: str  # Lightning's precision setting
    device: torch.device  # this process's device


def device_type(accelerator: str) -> str:
    """The torch device type a Lightning `accelerator` setting runs on here (`auto`: cuda if torch sees a GPU)."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in ("gpu", "cuda") else accelerator


def resolve_device(accelerator: str, precision: str | None, quant_bits: int | None,
                   cuda_only: str | None = None) -> Placement:
    """`auto` means the GPU with bf16-mixed if there is one, else the CPU in 32-bit; under DDP each process
    takes the GPU of its LOCAL_RANK. `cuda_only`: the setting that asks for what finlora runs on CUDA only,
    `trainer.compile` (on the CPU, minutes of C++ compilation for a step that Python does not bind) or
    `trainer.capture` (CUDA graphs)."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: a GPU was asked for but torch sees none (use trainer=cpu)")
    if precision is None:
        precision = "bf16-mixed" if accelerator != "cpu" and torch.cuda.is_bf16_supported() else "32-true"
    if accelerator == "cpu" and quant_bits == 8 and precision != "32-true":
        raise ConfigError(f"trainer.precision: bitsandbytes 8-bit on the CPU fails under {precision}; "
                          "use trainer.precision=32-true (trainer=cpu)")
    if cuda_only and accelerator not in ("gpu", "cuda"):
        off = "false" if cuda_only == "trainer.capture" else "eager"
        raise ConfigError(f"{cuda_only}: runs on a CUDA GPU only, and this run is on {accelerator}; "
                          f"use {cuda_only}={off}")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if accelerator != "cpu"
              else torch.device("cpu"))
    return Placement(accelerator, precision, device)


def gpu_count(devices: Any) -> int:
    """The number of GPUs Lightning's `devices` setting asks for (-1 or "auto": every one there is)."""
    if devices in (-1, "-1", "auto"):
        return torch.cuda.device_count()
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return len(devices) if isinstance(devices, Sequence) else int(devices)


def linear_params(config: Any) -> int:
    """Weights of a decoder-only model's linear layers (attention and MLP projections): what bitsandbytes quantizes."""
    h, n = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return n * (h * head_dim * (2 * heads + 2 * kv) + 3 * h * config.intermediate_size)


def weight_bytes(config: Any, bits: int | None, full_precision: bool) -> float:
    """Bytes of a decoder-only model's weights as loaded: its linear layers at `bits` (bitsandbytes keeps
    about 3% more for 4-bit block constants), embeddings and head in 16 bits (32 for full fine-tuning)."""
    h, linear = config.hidden_size, linear_params(config)
    embeddings = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    per_linear = {4: 0.5 * 1.03, 8: 1.0}.get(bits, 4.0 if full_precision else 2.0)
    return linear * per_linear + embeddings * (4.0 if full_precision else 2.0)


def capacity_problem(config: Any, bits: int | None, full_precision: bool, gpus: int, gpu_bytes: int,
                     sharded: bool) -> str | None:
    """Why the model cannot train on `gpus` GPUs of `gpu_bytes` each, with what would, if its weights alone
    (plus a margin for activations, adapter states and the CUDA context) exceed one GPU's memory. An
    estimate from the model's config, made before any weight is downloaded or loaded."""
    gib = 2**30
    weights = weight_bytes(config, bits, full_precision)
    need = weights / (gpus if sharded else 1) * 1.15 + 4 * gib
    if need <= gpu_bytes:
        return None
    ways = [f"trainer=fsdp trainer.devices={math.ceil(weights * 1.15 / (gpu_bytes - 4 * gib))} (shards the weights)"]
    if bits != 4 and not full_precision:
        ways.insert(0, "quant=4bit")
    over = f" sharded over {gpus}" if sharded else ""
    return (f"model.name_or_path: {weights / gib:.0f} GiB of weights ({bits or 16}-bit) need about {need / gib:.0f} "
            f"GiB on each GPU{over}, and a GPU here has {gpu_bytes / gib:.0f} GiB; try " + ", or ".join(ways))


def environment() -> dict:
    """The device and precision `trainer=auto` picks on this machine and the versions of the libraries that
    shape results: what a report written elsewhere, from the runs' files, says they ran on."""
    _, precision, device = resolve_device("auto", None, None)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
            "precision": precision,
            "versions": {p: version(p) for p in ("torch", "transformers", "peft", "lightning")}}
