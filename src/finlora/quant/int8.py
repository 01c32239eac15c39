"""Weight-only int8 compute for bitsandbytes 8-bit layers (`quant.int8_compute=weight_only`).

bitsandbytes stores an 8-bit layer as int8 rows CB with one scale a row, W0 = CB · SCB / 127. Its LLM.int8
matmul quantizes the activations too, picks outlier columns from the whole batch and waits for the GPU twice a
layer, so a step cannot be recorded as a CUDA graph and a row's result depends on the rest of the batch. Here
the same stored CB and SCB are dequantized to the compute dtype for one ordinary product, forward and backward
(the backward dequantizes again instead of keeping the copy; on a GPU the dequantization is one Triton kernel that
reads the int8 rows once), so nothing waits for the host and the layer records,
compiles and batches like a 16-bit one; memory and the saved adapter are unchanged. The layer's class becomes
`WeightOnlyLinear8bit`, a subclass of bitsandbytes' `Linear8bitLt`, so peft wraps and saves it as before.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from finlora.compat.bitsandbytes import int8_rows as compat_int8_rows
from finlora.compat.bitsandbytes import swap_class

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch ship without Triton
    triton = None


def int8_rows(base: nn.Module) -> tuple[Tensor, Tensor]:
    """CB (out × in, int8) and SCB (out, float) of a bitsandbytes 8-bit layer (`compat.bitsandbytes.int8_rows`)."""
    return compat_int8_rows(base)


def dequantize_int8(cb: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    """W0 = CB · SCB / 127 in `dtype`, computed in float32 and rounded once (`finlora::dequantize_int8`)."""
    return _dequantize_int8_op(cb, scb, dtype)


@torch.library.custom_op("finlora::dequantize_int8", mutates_args=())
def _dequantize_int8_op(cb: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    """One operator in eager, recorded and compiled steps alike: on a GPU one kernel reads CB and writes W0 (torch's
    form would read and write W0 twice more), elsewhere the same arithmetic in torch."""
    if triton is not None and cb.is_cuda:
        out = torch.empty(cb.shape, dtype=dtype, device=cb.device)
        rows, cols = cb.shape
        grid = (triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(cols, _BLOCK_COLS))
        _dequantize_int8_kernel[grid](cb, scb, out, rows, cols, INV_127=_INV_127, BLOCK_ROWS=_BLOCK_ROWS,
                                      BLOCK_COLS=_BLOCK_COLS)
        return out
    return (cb.float() * (scb.float() * _INV_127)[:, None]).to(dtype)


@_dequantize_int8_op.register_fake
def _(cb: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    return cb.new_empty(cb.shape, dtype=dtype)


_BLOCK_ROWS, _BLOCK_COLS = 8, 512
_INV_127 = 1.0 / 127.0  # multiplied, in float32, alike in torch and Triton (torch divides by a number so on a GPU)

if triton is not None:

    @triton.jit
    def _dequantize_int8_kernel(cb_ptr, scb_ptr, out_ptr, n_rows, n_cols, INV_127: tl.constexpr,
                                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """out = CB · (SCB · (1/127)), in float32 as the torch form, rounded once to out's dtype."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        scb = tl.load(scb_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        scale = scb * INV_127
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        q = tl.load(cb_ptr + offs, mask=mask, other=0).to(tl.float32)
        tl.store(out_ptr + offs, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _working_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes `x` in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _Int8Product(torch.autograd.Function):
    """x·W0ᵀ + b from one dequantized W0, and with `extra` rows (DoRA's A) also extra·W0ᵀ, without a gradient, from
    the same product: appended to x's rows, they read W0 once. The backward dequantizes W0 again and multiplies x's
    rows' gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cb: Tensor, scb: Tensor, bias: Tensor | None, extra: Tensor | None,
                ) -> tuple[Tensor, Tensor | None]:
        w = dequantize_int8(cb, scb, x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        if extra is not None:
            rows = torch.cat([rows, extra.to(x.dtype)])
        both = F.linear(rows, w)
        n = x.shape[:-1].numel()
        out = both[:n].view(*x.shape[:-1], -1)
        cross = both[n:] if extra is not None else None
        if cross is not None:
            ctx.mark_non_differentiable(cross)
        ctx.save_for_backward(cb, scb)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return (out if bias is None else out + bias.to(x.dtype)), cross

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        cb, scb = ctx.saved_tensors
        grad_x = torch.matmul(grad, dequantize_int8(cb, scb, grad.dtype))
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, None, None, grad_bias, None


def int8_product(base: nn.Module, x: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """`base`'s output for `x` in the dtype it computes x in, and extra·W0ᵀ (or None)."""
    x = x.to(_working_dtype(x))
    cb, scb = int8_rows(base)
    return _Int8Product.apply(x, cb, scb, base.bias, extra)


class WeightOnlyLinear8bit(bnb.nn.Linear8bitLt):
    """bitsandbytes' 8-bit layer computing through its dequantized weight (`int8_product`); stored, saved and loaded
    as bitsandbytes does."""

    def forward(self, x: Tensor) -> Tensor:
        return int8_product(self, x)[0]


def use_weight_only_int8(model: nn.Module) -> int:
    """Switch every bitsandbytes 8-bit layer of `model` to weight-only compute, in place; the number switched."""
    layers = [m for m in model.modules() if type(m) is bnb.nn.Linear8bitLt]
    for layer in layers:
        swap_class(layer, WeightOnlyLinear8bit)
    return len(layers)
