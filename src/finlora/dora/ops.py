"""finlora's DoRA autograd: the layer's tail (the scaled base output plus the LoRA branch) with one backward, and the
4-bit base product that also yields A·W0ᵀ.

The tail runs as an autograd Function in eager code (`DoraTail`, recorded CUDA graphs included) and as the custom
operator `finlora::dora_tail` in compiled code, where Dynamo must not trace into the kernels' launchers. Both take
their gradients from one function, `tail_backward`; the operator's backward calls the launcher through its own
operator (`finlora::dora_tail_grads`), the Function directly (no dispatcher on the eager path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from finlora.compat import bitsandbytes as compat_bnb
from finlora.compat.bitsandbytes import bnb
from finlora.dora.kernels import dora_grads, dora_out, split_b_and_m

if bnb is not None:
    from finlora.quant.int8 import WeightOnlyLinear8bit, int8_product


class Consts(NamedTuple):
    """What a layer's tail reads: its norm and scale (float32) and the branch's weights in the branch's dtype."""

    norm: Tensor
    scale: Tensor
    b_eff: Tensor  # s·scale ⊙ B: the branch's forward weight
    b_s: Tensor  # s·B: the branch's backward weight


def tail_backward(grads: Callable[..., tuple[Tensor, Tensor, Tensor]], grad: Tensor, y: Tensor, ax: Tensor,
                  lora_b: Tensor, magnitude: Tensor, scale: Tensor, b_s: Tensor, bias: Tensor | None, scaling: float,
                  use_triton: bool, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The tail's gradients (result's, ax's, B's, m's, and the base bias's when `bias_grad`) from its output's,
    through `grads` (`dora_grads`, or its operator in compiled code). m's is taken from the saved output y."""
    gz, grad_ax, b_and_m = grads(grad, y, ax, scale, magnitude, b_s, bias, scaling, use_triton)
    grad_b, grad_m = split_b_and_m(b_and_m, lora_b, magnitude)
    grad_bias = None
    if bias_grad:
        grad_bias = (grad.reshape(-1, y.shape[-1]).sum(0, dtype=torch.float32) * (1 - scale)).to(bias.dtype)
    return gz, grad_ax, grad_b, grad_m, grad_bias


class DoraTail(torch.autograd.Function):
    """y = scale ⊙ (result - b) + b + ax·b_effᵀ; saves y and ax, and takes m's gradient from y."""

    @staticmethod
    def forward(ctx: Any, result: Tensor, ax: Tensor, lora_b: Tensor, magnitude: Tensor, consts: Consts,
                scaling: float, bias: Tensor | None, use_triton: bool) -> Tensor:
        # b_eff and ax share a dtype, so an enclosing autocast casts nothing here
        y = dora_out(result, ax, consts.scale, consts.b_eff, bias, use_triton)
        ctx.save_for_backward(y, ax, lora_b, magnitude, bias)
        ctx.use_triton = use_triton
        ctx.consts = consts
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, ax, lora_b, magnitude, bias = ctx.saved_tensors
        consts: Consts = ctx.consts
        gz, grad_ax, grad_b, grad_m, grad_bias = tail_backward(
            dora_grads, grad, y, ax, lora_b, magnitude, consts.scale, consts.b_s,
            None if bias is None else bias.detach(), ctx.scaling, ctx.use_triton,
            bias is not None and ctx.needs_input_grad[6])
        return gz, grad_ax, grad_b, grad_m, None, None, grad_bias, None


@torch.library.custom_op("finlora::dora_tail", mutates_args=())
def dora_tail_op(result: Tensor, ax: Tensor, lora_b: Tensor, magnitude: Tensor, scale: Tensor, b_eff: Tensor,
                 b_s: Tensor, bias: Tensor | None, scaling: float, use_triton: bool) -> Tensor:
    """`DoraTail` as one operator for compiled code, which calls it as it is: its kernels are fused already.
    (`lora_b` and `magnitude` are there for their gradients; a trainable base bias takes the traced path.)"""
    return dora_out(result, ax, scale, b_eff, bias, use_triton)


@torch.library.custom_op("finlora::dora_tail_grads", mutates_args=())
def _dora_tail_grads_op(grad: Tensor, y: Tensor, ax: Tensor, scale: Tensor, magnitude: Tensor, b_s: Tensor,
                        bias: Tensor | None, scaling: float, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    return dora_grads(grad, y, ax, scale, magnitude, b_s, bias, scaling, use_triton)


@dora_tail_op.register_fake
def _(result: Tensor, *_: Any) -> Tensor:
    return result.new_empty(result.shape)


@_dora_tail_grads_op.register_fake
def _(grad: Tensor, y: Tensor, ax: Tensor, scale: Tensor, magnitude: Tensor, b_s: Tensor, *_: Any,
      ) -> tuple[Tensor, Tensor, Tensor]:
    return grad.new_empty(grad.shape), ax.new_empty(ax.shape), b_s.new_empty(b_s.numel() + b_s.shape[0],
                                                                           dtype=torch.float32)


def _dora_tail_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    result, ax, lora_b, magnitude, scale, b_eff, b_s, bias, scaling, use_triton = inputs
    ctx.save_for_backward(output, ax, lora_b, magnitude, scale, b_s, bias)
    ctx.scaling, ctx.use_triton = scaling, use_triton


def _dora_tail_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    y, ax, lora_b, magnitude, scale, b_s, bias = ctx.saved_tensors
    gz, grad_ax, grad_b, grad_m, _ = tail_backward(_dora_tail_grads_op, grad, y, ax, lora_b, magnitude, scale, b_s,
                                                   bias, ctx.scaling, ctx.use_triton, False)
    return gz, grad_ax, grad_b, grad_m, None, None, None, None, None, None


dora_tail_op.register_autograd(_dora_tail_backward, setup_context=_dora_tail_setup)


class Dequantized4bit(torch.autograd.Function):
    """x·W0ᵀ + b of a bitsandbytes 4-bit layer, and A·W0ᵀ (no gradient), from one dequantized W0: for training's row
    counts bitsandbytes' own matmul dequantizes W0 for cuBLAS too, where a separate norm refresh would dequantize each
    W0 a second time. A's r rows are appended to x's for one product, which reads W0 once. The backward dequantizes
    again, as bitsandbytes' does, instead of keeping the copy (`finlora::dequantize_4bit`), and multiplies x's rows'
    gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lora_a: Tensor, weight: Tensor, bias: Tensor | None, quant_state: Any,
                ) -> tuple[Tensor, Tensor]:
        w = bnb.functional.dequantize_4bit(weight, quant_state).to(x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        both = F.linear(torch.cat([rows, lora_a.to(x.dtype)]), w)
        out, cross = both[:rows.shape[0]].view(*x.shape[:-1], -1), both[rows.shape[0]:]
        ctx.mark_non_differentiable(cross)
        ctx.save_for_backward(weight)
        ctx.quant_state = quant_state
        return out if bias is None else out + bias, cross

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        w = _dequantize_4bit_op(weight, *compat_bnb.quant_parts(ctx.quant_state))
        return torch.matmul(grad, w.to(grad.dtype)), None, None, None, None


@torch.library.custom_op("finlora::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(packed: Tensor, absmax: Tensor, shape: list[int], dtype: torch.dtype, blocksize: int,
                        quant_type: str, offset: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
                        blocksize2: int) -> Tensor:
    """bitsandbytes' `dequantize_4bit` (a nested state's absmax included) as one operator of finlora's, for the backward
    of `Dequantized4bit`. Compiled, Inductor would otherwise take bitsandbytes' own operators there for the forward's
    (the same operators on the same inputs), merge them, and keep the forward's dequantized W0 until the backward,
    where bitsandbytes' matmul keeps none."""
    return bnb.functional.dequantize_4bit(packed, compat_bnb.quant_state(absmax, shape, dtype, blocksize, quant_type,
                                                                         offset, absmax2, code2, blocksize2))


@_dequantize_4bit_op.register_fake
def _(packed: Tensor, absmax: Tensor, shape: list[int], dtype: torch.dtype, *_: Any) -> Tensor:
    return packed.new_empty(shape, dtype=dtype)


def base_and_cross(base: nn.Module, x: Tensor, lora_a: Tensor) -> tuple[Tensor, Tensor]:
    """What the base layer returns for `x`, and A·W0ᵀ, from one dequantization of W0: `int8_product` for a weight-only
    8-bit base; for a 4-bit one, `Dequantized4bit` on the input as `Linear4bit.forward` prepares it."""
    if isinstance(base, WeightOnlyLinear8bit):
        return int8_product(base, x, lora_a.detach())
    dtype = x.dtype
    x = compat_bnb.linear4bit_input(base, x)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    out, cross = Dequantized4bit.apply(x, lora_a.detach(), base.weight, bias, base.weight.quant_state)
    return out.to(dtype), cross
