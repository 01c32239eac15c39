"""LoRA's dropout without a dropped copy of the input kept for backward.

peft computes B·A·dropout(x) for each adapter of a layer, and autograd keeps the dropped copy of x (for A's gradient)
with its mask. q, k and v read one x, so an attention block keeps three dropped copies of it, in each layer that
gradient checkpointing recomputes. `dropped_product` keeps x itself, which the three share, with each one's
one-byte mask, and remakes the dropped copy in backward. The mask is the one `nn.Dropout` draws (the same kernel on
the same random numbers), and the values and gradients are the same. `DroppedLoraVariant` is vanilla LoRA's forward
through it, set on the LoRA adapters that train with dropout (`use_dropped_product`); finlora's DoRA calls
`dropped_product` itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finlora.compat import peft as compat_peft


class _DroppedProduct(torch.autograd.Function):
    """x ↦ A·dropout(x), saving x and the mask; backward remakes the dropped copy from them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, p: float) -> Tensor:
        keep = torch.native_dropout(x, p, True)[1]
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(x, weight, keep)
        return F.linear(_dropped(x, keep, ctx.scale), weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _dropped(grad @ weight.to(grad.dtype), keep, ctx.scale).to(x.dtype)
        if ctx.needs_input_grad[1]:  # as autocast's linear: the product in the compute dtype, cast to A's
            dropped = _dropped(x, keep, ctx.scale).to(grad.dtype)
            grad_weight = (grad.flatten(0, -2).T @ dropped.flatten(0, -2)).to(weight.dtype)
        return grad_x, grad_weight, None


def _dropped(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    """x · keep · scale, one rounding (dropout's own backward kernel), so forward and backward see the same copy."""
    return torch.ops.aten.native_dropout_backward(x, keep, scale)


def dropped_product(x: Tensor, weight: Tensor, dropout: nn.Module, training: bool) -> Tensor:
    """A·dropout(x) for `weight` A (r × in) and an adapter's `dropout` module (peft's `nn.Dropout`, or
    `nn.Identity` for none), which applies in training only."""
    if not (training and isinstance(dropout, nn.Dropout) and dropout.p > 0):
        return F.linear(x, weight)
    return _DroppedProduct.apply(x, weight, dropout.p)


class DroppedLoraVariant(compat_peft.LoraVariant):
    """Vanilla LoRA, y = base + s·B·A·dropout(x), with the dropout through `dropped_product`. Merging adds
    s·B·A (`get_delta_weight`) as vanilla LoRA does; the adapter saves and loads as a plain LoRA adapter."""

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing: the variant adds no parameters."""

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
        ax = dropped_product(x, module.lora_A[active_adapter].weight, module.lora_dropout[active_adapter],
                             module.training)
        return result + module.lora_B[active_adapter](ax) * module.scaling[active_adapter]


def use_dropped_product(model: nn.Module) -> int:
    """Give every vanilla LoRA adapter with dropout on a linear layer `DroppedLoraVariant`; the number given."""
    layers = (compat_peft.LoraLinear, *compat_peft.lora_bnb_layers().values())
    given = 0
    for module in model.modules():
        if not isinstance(module, layers):
            continue
        for adapter, dropout in module.lora_dropout.items():
            if isinstance(dropout, nn.Dropout) and adapter in module.lora_A and adapter not in module.lora_variant:
                module.lora_variant[adapter] = DroppedLoraVariant()
                given += 1
    return given
