"""The frozen base layer as finlora's DoRA reads it: what kind of weight it holds (plain, bitsandbytes int8 or
4-bit), its row norms ‖W0_i‖² and the skinny product A·W0ᵀ, each computed on the weight where it lies, never
dequantizing more than the product needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finlora.compat.bitsandbytes import bnb, is_int8_weight, is_unpacked_4bit_weight

if bnb is not None:
    from finlora.quant.int8 import WeightOnlyLinear8bit, int8_rows

_CHUNK_ELEMENTS = 1 << 24  # elements of a weight expanded to float32 at once, for its frozen row norms


def is_plain(base: nn.Module) -> bool:
    """An nn.Linear holding an ordinary tensor."""
    return isinstance(base, nn.Linear) and type(base.weight) in (Tensor, nn.Parameter)


def supported(base: nn.Module) -> bool:
    """Whether finlora's DoRA handles this base: nn.Linear or bitsandbytes 8-/4-bit."""
    if is_plain(base):
        return True
    return bnb is not None and isinstance(base, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def dequantizes_in_forward(base: nn.Module) -> bool:
    """Whether `base` computes through its dequantized weight: bitsandbytes 4-bit (unpacked) for training's row
    counts, weight-only 8-bit (`finlora.quant.int8`) always."""
    return is_unpacked_4bit_weight(base.weight) or isinstance(base, WeightOnlyLinear8bit)


def int8_scale(base: nn.Module) -> Tensor:
    """Row scales of an int8 weight, W0 = CB · SCB / 127."""
    return int8_rows(base)[1].float() / 127.0


def without_bias(base: nn.Module, inputs: Tensor) -> Tensor:
    """inputs · W0ᵀ through the base layer itself (rows × out_features)."""
    out = base(inputs)
    if getattr(base, "bias", None) is not None:
        out = out - base.bias.to(out.dtype)
    return out


def plain_weight(module: nn.Module, base: nn.Linear) -> Tensor:
    """W0 in torch's [out, in] layout (peft's `fan_in_fan_out` layers store it transposed)."""
    return base.weight.T if getattr(module, "fan_in_fan_out", False) else base.weight


def row_sqnorm(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Tensor:
    """‖W0_i‖² of the dequantized base weight in float32, a chunk of rows at a time."""
    weight = base.weight
    if is_plain(base) or is_int8_weight(weight):
        w = plain_weight(module, base) if is_plain(base) else weight.data
        step = max(1, _CHUNK_ELEMENTS // w.shape[1])
        sq = torch.cat([w[i : i + step].float().pow(2).sum(1) for i in range(0, w.shape[0], step)])
        return sq if is_plain(base) else sq * int8_scale(base) ** 2
    if is_unpacked_4bit_weight(weight):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().pow(2).sum(1)
    # Anything else (bitsandbytes' CPU-packed 4-bit, other quantizers): the base layer on an identity.
    d_in = module.in_features
    step = max(1, _CHUNK_ELEMENTS // max(d_in, module.out_features))
    total = torch.zeros(module.out_features, device=weight.device)
    for i in range(0, d_in, step):
        eye = torch.eye(d_in, device=weight.device, dtype=dtype)[i : i + step]
        total += without_bias(base, eye).float().pow(2).sum(0)
    return total


def a_times_w0t(module: nn.Module, base: nn.Module, lora_a: Tensor, dtype: torch.dtype) -> Tensor:
    """A · W0ᵀ (r × out_features): a skinny product over the r rows of A, never W0 + s·B·A."""
    if is_plain(base):
        w = plain_weight(module, base)
        return F.linear(lora_a.to(w.dtype), w)
    if is_int8_weight(base.weight):  # CB is exact in any float dtype; A in the branch's dtype, as peft does
        return F.linear(lora_a.to(dtype), base.weight.data.to(dtype)).float() * int8_scale(base)
    if is_unpacked_4bit_weight(base.weight):
        return a_w0t_4bit(lora_a.to(base.weight.quant_state.dtype), base)
    return without_bias(base, lora_a.to(dtype))


def a_w0t_4bit(a: Tensor, base: nn.Module) -> Tensor:
    """A·W0ᵀ through bitsandbytes' own 4-bit matmul, which picks between its fused kernel and W0 dequantized for
    cuBLAS by shape."""
    return bnb.matmul_4bit(a, base.weight.t(), quant_state=base.weight.quant_state)
