"""peft internals finlora's DoRA and LoRA dropout build on: the variant base class and the per-adapter DoRA variant
they subclass, peft's LoRA linear layer, the keyword arguments a LoRA layer hands its variant, the LoRA layer classes on
bitsandbytes bases, the input cast of a LoRA layer, and swapping a layer's class. Checked on peft 0.21 /
bitsandbytes 0.50.2."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraVariant
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from torch import Tensor, nn

__all__ = ["DoraLinearVariant", "LoraLinear", "LoraVariant", "VARIANT_KWARG_KEYS", "cast_input_dtype",
           "lora_bnb_layers", "swap_class"]

# `LoraVariant` (peft.tuners.lora.layer): what a LoRA layer's forward and merge call for an adapter found in
# `module.lora_variant` (init, merge_safe, merge_unsafe, unmerge, forward) instead of vanilla LoRA's own code.
# `LoraLinear` (peft.tuners.lora.layer.Linear): peft's LoRA layer on a plain nn.Linear base.

# `DoraLinearVariant` (peft.tuners.lora.variants): the variant object peft keeps per adapter in
# `module.lora_variant[adapter]` for a DoRA linear layer; finlora's subclasses it and replaces `forward`.
# `VARIANT_KWARG_KEYS` (peft.tuners.lora.layer): the keyword arguments a LoRA layer's forward passes to a variant.


def lora_bnb_layers() -> dict[str, type]:
    """peft's LoRA layer classes on bitsandbytes bases, by bit width (`peft.tuners.lora.bnb.Linear4bit`,
    `Linear8bitLt`); empty where bitsandbytes is not installed."""
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:
        return {}
    return {"4bit": Linear4bit, "8bit": Linear8bitLt}


def cast_input_dtype(module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` cast as a LoRA layer casts its input for the adapter branch (`LoraLayer._cast_input_dtype`, which honours
    peft's `disable_input_dtype_casting`)."""
    return module._cast_input_dtype(x, dtype)


def swap_class(module: nn.Module, cls: type[Any]) -> None:
    """Give a LoRA layer another class of the same layout (`module.__class__`): peft builds its layers itself, so a
    finlora subclass with another forward replaces the class of the instance peft made."""
    module.__class__ = cls
