"""finlora's DoRA: the function peft's DoRA computes, at close to the cost of LoRA.

peft (>= 0.18) keeps the DoRA computation of a LoRA layer in a per-adapter variant object,
``module.lora_variant[adapter]`` (`DoraLinearVariant`, for plain and bitsandbytes 8-/4-bit layers
alike). `use_fast_dora` swaps that object for `FastDoraLinearVariant`, whose ``forward`` is ours; the
parameters (``lora_A``, ``lora_B``, ``lora_magnitude_vector``), their names, ``save_pretrained``,
``adapter_config.json`` (``use_dora: true``) and merging stay peft's, so adapters move freely between
the two implementations.

With s the scaling, m the magnitude, W0 the frozen base weight and b its bias, each layer computes

    y = m / ‖W0 + s·B·A‖_rows ⊙ (W0·x + s·B·A·dropout(x)) + b

with the row norm detached from the graph (DoRA paper, section 4.3), as peft does. What differs is how:

- The norm is factored, ‖w_i‖² + 2s·⟨B_i, (W0·Aᵀ)_i⟩ + s²·B_i·(A·Aᵀ)·B_iᵀ: ‖w_i‖² is a frozen constant
  computed once, W0·Aᵀ is a skinny product over the r rows of A (through the bitsandbytes 4-bit kernel
  or on the int8 weight itself), so W0 + s·B·A is never built and nothing is dequantized per call.
- The norm depends on parameters only, so it is cached until they change: keyed on the parameters'
  version counters and storage, on the scaling, and on a global count of optimizer steps; a fresh
  value is computed after every optimizer step and reused across gradient-accumulation micro-batches
  and activation-checkpoint recomputation.
- One autograd node (`_DoraTail`) scales the base output and adds the LoRA branch with the scale
  folded into B; it saves the layer's output y and takes the magnitude's gradient from it
  (Σ_t g ⊙ (y - b) / m), instead of saving the base and LoRA outputs separately. On CUDA, a Triton
  kernel forms g·scale and Σ_t g ⊙ y in one pass over g and y.
- With dropout > 0 in training, dropout applies to the LoRA branch only (the formula above). peft
  instead runs the base matmul a second time on dropout(x) and adds that; outside training, or with
  dropout 0, both compute the same function.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.variants import DoraLinearVariant
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch ship without Triton
    triton = None

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

USE_TRITON: bool = os.environ.get("FINLORA_DORA_TRITON", "1") != "0"
"""Use the fused Triton kernel in backward on CUDA (set FINLORA_DORA_TRITON=0 to compare)."""

_CHUNK_ELEMENTS = 1 << 24  # rows of a weight handled at once where it must be expanded to float32

_optimizer_steps = 0  # bumped after every torch optimizer step; part of every norm-cache key
_step_hook: Any = None


def _count_optimizer_step(*_: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _install_step_hook() -> None:
    """Optimizers such as bitsandbytes' write parameters without bumping version counters."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def _state(t: Tensor) -> tuple:
    """What changes when a tensor's values may have changed, short of reading them."""
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device)


def _is_int8(weight: Tensor) -> bool:
    return type(weight).__name__ == "Int8Params" and weight.dtype == torch.int8


def _is_unpacked_4bit(weight: Tensor) -> bool:
    qs = getattr(weight, "quant_state", None)
    return (
        type(weight).__name__ == "Params4bit"
        and qs is not None
        and not getattr(qs, "packing_format_for_cpu", False)
    )


def _is_plain(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) and type(base.weight) in (Tensor, nn.Parameter)


def _int8_rows(base: nn.Module, dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    """Row chunks of the int8 weight CB in ``dtype`` (exact), with their row scales: W0 = CB · SCB / 127."""
    weight = base.weight
    scb = base.state.SCB if base.state.SCB is not None else weight.SCB
    scale = scb.float() / 127.0
    step = max(1, _CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        yield weight.data[start : start + step].to(dtype), scale[start : start + step]


def _base_without_bias(base: nn.Module, inputs: Tensor) -> Tensor:
    """W0 · inputsᵀ through the base layer's own kernel, as float32 (out_features × rows)."""
    out = base(inputs)
    if getattr(base, "bias", None) is not None:
        out = out - base.bias.to(out.dtype)
    return out.float().T


def _plain_weight(module: nn.Module, base: nn.Linear) -> Tensor:
    return base.weight.T if getattr(module, "fan_in_fan_out", False) else base.weight


@torch.no_grad()
def _row_sqnorm(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Tensor:
    """‖w_i‖² of the dequantized base weight in float32: frozen, so computed once per weight."""
    weight = base.weight
    if _is_plain(base):
        w = _plain_weight(module, base)
        step = max(1, _CHUNK_ELEMENTS // w.shape[1])
        return torch.cat([w[i : i + step].float().pow(2).sum(1) for i in range(0, w.shape[0], step)])
    if _is_int8(weight):
        return torch.cat([cb.pow(2).sum(1) * scale**2 for cb, scale in _int8_rows(base, torch.float32)])
    if _is_unpacked_4bit(weight):
        w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return w.float().pow(2).sum(1)
    # Anything else (bitsandbytes' CPU-packed 4-bit, other quantizers): the base layer on an identity.
    d_in = module.in_features
    step = max(1, _CHUNK_ELEMENTS // max(d_in, module.out_features))
    total = torch.zeros(module.out_features, device=weight.device)
    for i in range(0, d_in, step):
        eye = torch.eye(d_in, device=weight.device, dtype=dtype)[i : i + step]
        total += _base_without_bias(base, eye).pow(2).sum(1)
    return total


@torch.no_grad()
def _base_times_a(module: nn.Module, base: nn.Module, lora_a: Tensor, dtype: torch.dtype) -> Tensor:
    """W0 · Aᵀ (out_features × r, float32) without building or dequantizing W0 as a whole."""
    if _is_plain(base):
        w = _plain_weight(module, base)
        with torch.autocast(w.device.type, enabled=False):
            return F.linear(lora_a.to(w.dtype), w).float().T
    if _is_int8(base.weight):  # in the input's dtype, as peft does (CB is exact in bf16)
        a = lora_a.to(dtype)
        with torch.autocast(a.device.type, enabled=False):
            parts = [F.linear(a, cb).float().T * scale[:, None] for cb, scale in _int8_rows(base, dtype)]
        return torch.cat(parts)
    return _base_without_bias(base, lora_a.to(dtype))


def _weight_norm(module: nn.Module, adapter: str, dtype: torch.dtype) -> Tensor:
    """‖W0 + s·B·A‖ per output row (float32, detached), cached until A, B, W0 or s change."""
    base = module.get_base_layer()
    lora_a = module.lora_A[adapter].weight
    lora_b = module.lora_B[adapter].weight
    scaling = module.scaling[adapter]
    cache = module.__dict__.setdefault("_finlora_dora_cache", {})

    w_key = _state(base.weight)
    if cache.get("w2", (None,))[0] != w_key:
        cache["w2"] = (w_key, _row_sqnorm(module, base, dtype))
    w2 = cache["w2"][1]

    key = (_optimizer_steps, _state(lora_a), _state(lora_b), scaling, w_key)
    hit = cache.get(adapter)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        a = lora_a.float()
        b = lora_b.float()
        cross = (b * _base_times_a(module, base, lora_a, dtype)).sum(1)
        quad = ((b @ (a @ a.T)) * b).sum(1)
        norm = (w2 + 2 * scaling * cross + scaling**2 * quad).clamp_min(0).sqrt()
    cache[adapter] = (key, norm)
    return norm


def clear_dora_cache(model: nn.Module) -> None:
    """Forget cached norms, for code that writes adapter weights through ``.data`` outside an optimizer."""
    for module in model.modules():
        module.__dict__.pop("_finlora_dora_cache", None)


if triton is not None:

    @triton.jit
    def _scale_grad_kernel(
        g_ptr,
        y_ptr,
        scale_ptr,
        gz_ptr,
        part_ptr,
        n_rows,
        n_cols,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        """gz = g·scale and per-column partial sums of g·y (float32), one pass over g and y."""
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(ITERS):
            rows = (pid_t * ITERS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
            mask = (rows[:, None] < n_rows) & col_mask[None, :]
            offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(gz_ptr + offs, (g * scale[None, :]).to(gz_ptr.dtype.element_ty), mask=mask)
            acc += tl.sum(g * y, axis=0)
        tl.store(part_ptr + pid_t * n_cols + cols, acc, mask=col_mask)


def _scale_grad_triton(g: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = g.shape
    block_t, block_n = 32, 128
    col_blocks = triton.cdiv(n_cols, block_n)
    target = 4 * torch.cuda.get_device_properties(g.device).multi_processor_count
    row_tiles = triton.cdiv(n_rows, block_t)
    # a power of two, so that few variants are compiled however the number of rows varies
    iters = min(64, triton.next_power_of_2(triton.cdiv(row_tiles, triton.cdiv(target, col_blocks))))
    row_progs = triton.cdiv(row_tiles, iters)
    gz = torch.empty_like(g)
    part = torch.empty(row_progs, n_cols, device=g.device, dtype=torch.float32)
    _scale_grad_kernel[(row_progs, col_blocks)](
        g, y, scale, gz, part, n_rows, n_cols, BLOCK_T=block_t, BLOCK_N=block_n, ITERS=iters
    )
    return gz, part.sum(0)


def _scale_grad(g: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(g·scale in g's dtype, Σ_rows g·y in float32) for 2-D contiguous g, y and float32 scale."""
    if USE_TRITON and triton is not None and g.is_cuda:
        return _scale_grad_triton(g, y, scale)
    gz = torch.mul(g, scale, out=torch.empty_like(g))
    return gz, (g * y).sum(0, dtype=torch.float32)


class _DoraTail(torch.autograd.Function):
    """y = scale ⊙ (result - b) + b + ax·(s·scale·B)ᵀ with scale = m / norm; saves only y and ax."""

    @staticmethod
    def forward(
        ctx: Any,
        result: Tensor,
        ax: Tensor,
        lora_b: Tensor,
        magnitude: Tensor,
        norm: Tensor,
        scaling: float,
        bias: Tensor | None,
    ) -> Tensor:
        with torch.autocast(result.device.type, enabled=False):
            scale = magnitude.detach().float() / norm
            b_eff = (lora_b.detach().float() * (scaling * scale)[:, None]).to(ax.dtype)
            y = torch.matmul(ax, b_eff.T)
            if bias is not None:
                y += ((1 - scale) * bias.detach().float()).to(y.dtype)
            y = y.addcmul_(result, scale).to(result.dtype)
        ctx.save_for_backward(y, ax, lora_b, magnitude, scale, bias)
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, ax, lora_b, magnitude, scale, bias = ctx.saved_tensors
        s = ctx.scaling
        n_out = y.shape[-1]
        with torch.autocast(grad.device.type, enabled=False):
            g2 = grad.reshape(-1, n_out)
            gz, gy = _scale_grad(g2, y.reshape(-1, n_out), scale)
            grad_m = grad_ax = grad_b = grad_bias = None
            if ctx.needs_input_grad[3]:
                if bias is not None:  # Σ g·(y - b)
                    gy = gy - bias.float() * g2.sum(0, dtype=torch.float32)
                grad_m = (gy / magnitude.float()).to(magnitude.dtype)
            ax2 = ax.reshape(-1, ax.shape[-1])
            gz_lora = gz.to(ax.dtype)
            if ctx.needs_input_grad[1]:
                grad_ax = (gz_lora @ (s * lora_b.detach()).to(ax.dtype)).view(ax.shape)
            if ctx.needs_input_grad[2]:
                grad_b = (gz_lora.T @ ax2).to(lora_b.dtype).mul_(s)
            if bias is not None and ctx.needs_input_grad[6]:
                grad_bias = (g2.sum(0, dtype=torch.float32) * (1 - scale)).to(bias.dtype)
        return gz.view(grad.shape), grad_ax, grad_b, grad_m, None, None, grad_bias


class FastDoraLinearVariant(DoraLinearVariant):
    """peft's DoRA variant with finlora's forward; init, merge and unmerge stay peft's."""

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
        dropout = module.lora_dropout[active_adapter]
        if module.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)
        ax = module.lora_A[active_adapter](x)
        norm = _weight_norm(module, active_adapter, x.dtype)
        return _DoraTail.apply(
            result,
            ax,
            module.lora_B[active_adapter].weight,
            module.lora_magnitude_vector[active_adapter].weight,
            norm,
            module.scaling[active_adapter],
            getattr(module.get_base_layer(), "bias", None),
        )

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        module.__dict__.pop("_finlora_dora_cache", None)
        return DoraLinearVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> None:
        module.__dict__.pop("_finlora_dora_cache", None)
        DoraLinearVariant.merge_unsafe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        module.__dict__.pop("_finlora_dora_cache", None)
        return DoraLinearVariant.unmerge(module, active_adapter, orig_weight)


def _supported(base: nn.Module) -> bool:
    if _is_plain(base):
        return True
    return bnb is not None and isinstance(base, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def use_fast_dora(model: nn.Module) -> int:
    """Switch every DoRA-enabled LoRA linear layer of ``model`` to finlora's DoRA, in place.

    Layers whose base finlora does not handle (not nn.Linear or bitsandbytes 8-/4-bit) keep peft's
    DoRA. Adapters added or loaded later get peft's variant: call this again after loading them.
    Returns the number of layers that now run finlora's DoRA.
    """
    _install_step_hook()
    switched = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict) or not _supported(module.get_base_layer()):
            continue
        fast = False
        for name, variant in variants.items():
            if type(variant) is DoraLinearVariant:
                variants[name] = FastDoraLinearVariant()
            fast = fast or isinstance(variants[name], FastDoraLinearVariant)
        switched += fast
    return switched
