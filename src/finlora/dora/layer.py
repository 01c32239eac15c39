"""finlora's DoRA on a peft LoRA layer: the variant whose forward is ours (`FastDoraLinearVariant`), the forward of a
layer on a base that dequantizes its weight (`DoraLinearQuantized`, which computes its norm in its own forward), and
how a layer finds its constants: cached on its `LayerState` while their key holds, refreshed with its group's when
stale, or rebuilt inside a compiled graph."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import finlora.dora.state as dora_state
from finlora.compat import peft as compat_peft
from finlora.compat.bitsandbytes import bnb
from finlora.dora.bases import a_times_w0t, dequantizes_in_forward
from finlora.dora.constants import branch_weights, frozen_sqnorm, layer_consts, refresh_batch, refresh_grams
from finlora.dora.ops import Consts, DoraTail, base_and_cross, dora_tail_op
from finlora.dora.state import Constants, Gram, ensure_state, held_state, key
from finlora.lora_dropout import dropped_product


def parts(module: nn.Module, adapter: str) -> tuple[nn.Module, Tensor, Tensor, Tensor, float]:
    """(base layer, A, B, m, scaling) of one adapter of a LoRA layer."""
    return (
        module.get_base_layer(),
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        module.lora_magnitude_vector[adapter].weight,
        module.scaling[adapter],
    )


class FastDoraLinearVariant(compat_peft.DoraLinearVariant):
    """peft's DoRA variant with finlora's forward; init, merge and unmerge stay peft's. `use_triton`: the
    fused Triton kernels on CUDA (False: the same computation in PyTorch ops, to compare)."""

    def __init__(self, use_triton: bool = True) -> None:
        self.use_triton = use_triton

    def forward(self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, cross: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """`cross`: the layer's A·W0ᵀ from its own forward (`DoraLinearQuantized`), whose norm is then computed here
        from it instead of read from the cache."""
        layer = parts(module, active_adapter)
        base, lora_a, lora_b, magnitude, scaling = layer
        ax = dropped_product(x, lora_a, module.lora_dropout[active_adapter], module.training)
        bias = getattr(base, "bias", None)
        compiling = torch.compiler.is_compiling()
        if cross is None and compiling:
            return traced_tail(module, active_adapter, result, ax, layer, self.use_triton)
        if cross is None:
            consts = cached_consts(module, active_adapter, layer, ax.dtype)
        else:
            consts = own_consts(module, active_adapter, layer, cross, ax.dtype, self.use_triton)
        if compiling:
            return dora_tail_op(result, ax, lora_b, magnitude, consts.scale, consts.b_eff, consts.b_s, bias, scaling,
                                self.use_triton)
        return DoraTail.apply(result, ax, lora_b, magnitude, consts, scaling, bias, self.use_triton)

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        dora_state.drop_state(module)
        return compat_peft.DoraLinearVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> None:
        dora_state.drop_state(module)
        compat_peft.DoraLinearVariant.merge_unsafe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        dora_state.drop_state(module)
        return compat_peft.DoraLinearVariant.unmerge(module, active_adapter, orig_weight)


def variant_kwargs_only(args: tuple, kwargs: dict) -> bool:
    """Whether a LoRA layer's call passes nothing but what peft hands its variant: Dynamo traces this (torch 2.11's
    fails on `kwargs.keys() - a_frozenset`)."""
    return not args and not set(kwargs) - set(compat_peft.VARIANT_KWARG_KEYS)


class DoraLinearQuantized:
    """The forward of a peft LoRA layer on a bitsandbytes base that dequantizes its weight (4-bit, or weight-only
    8-bit), whose class `use_fast_dora` switches to `DoraLinear4bit` / `DoraLinear8bit`: in training
    (`norm_in_forward`) it takes the base output and A·W0ᵀ from one dequantization of W0 (`base_and_cross`), and
    the DoRA variant computes the norm from that, in the layer. Anything else (eval, merged or disabled adapters,
    several active ones) runs peft's forward, with the norms cached."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = norm_in_forward(self)
        if adapter is None or not variant_kwargs_only(args, kwargs):
            return super().forward(x, *args, **kwargs)
        variant, lora_a = self.lora_variant[adapter], self.lora_A[adapter].weight
        result, cross = base_and_cross(self.get_base_layer(), x, lora_a)
        if torch.is_autocast_enabled():  # as peft's forward: without autocast, x in A's dtype, y in result's
            return variant.forward(self, adapter, x, result, cross=cross)
        y = variant.forward(self, adapter, compat_peft.cast_input_dtype(self, x, lora_a.dtype), result, cross=cross)
        return y.to(result.dtype)


QUANTIZED_DORA: dict[type, type] = {}  # peft's LoRA class on a bitsandbytes base -> finlora's
if bnb is not None:
    _lora_bnb = compat_peft.lora_bnb_layers()

    class DoraLinear4bit(DoraLinearQuantized, _lora_bnb["4bit"]):
        """peft's LoRA layer on a bitsandbytes 4-bit base, with `DoraLinearQuantized`'s forward."""

    class DoraLinear8bit(DoraLinearQuantized, _lora_bnb["8bit"]):
        """peft's LoRA layer on a bitsandbytes 8-bit base, with `DoraLinearQuantized`'s forward (its norm in the layer
        when the base is weight-only, `finlora.quant.int8`)."""

    QUANTIZED_DORA.update({_lora_bnb["4bit"]: DoraLinear4bit, _lora_bnb["8bit"]: DoraLinear8bit})


def norm_in_forward(module: nn.Module) -> str | None:
    """The adapter whose norm `module` computes in its own forward (`DoraLinearQuantized`), from the A·W0ᵀ that its
    base's dequantized weight gives: in training, for one active finlora DoRA adapter on a base that dequantizes its
    weight (`dequantizes_in_forward`) with no trainable bias, run eagerly (a CUDA graph recording included) or
    compiled in a training step (`fresh_norms`, which refreshes its A·Aᵀ). None where the layer reads its norms from
    the cache."""
    if bnb is None or not isinstance(module, DoraLinearQuantized) or not module.training or module.disable_adapters \
            or module.merged or (torch.compiler.is_compiling() and not dora_state.compiled_reads_norms):
        return None
    active = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
    base = module.get_base_layer()
    if (len(active) != 1 or not isinstance(module.lora_variant.get(active[0]), FastDoraLinearVariant)
            or not dequantizes_in_forward(base) or (base.bias is not None and base.bias.requires_grad)):
        return None
    return active[0]


@torch.no_grad()
def refresh(members: list[tuple[nn.Module, str]], dtype: torch.dtype, in_place: bool = False,
            caller: tuple[nn.Module, str] | None = None) -> None:
    """Recompute the constants of the stale layers among ``members``, batched over layers of one shape; `in_place`:
    where the last refresh of the same layers left them (`constants.kept`). Of a layer that computes its norm in its
    own forward (`norm_in_forward`), only A·Aᵀ (`refresh_grams`), unless it is the `caller` that needs its
    constants."""
    batches: dict[tuple, list] = {}
    for module, adapter in members:
        if adapter not in module.lora_A or not isinstance(module.lora_variant.get(adapter), FastDoraLinearVariant):
            continue
        own = norm_in_forward(module) == adapter and (module, adapter) != caller
        layer = parts(module, adapter)
        st = ensure_state(module)
        layer_key = key(st, *layer)
        entry = (st.grams if own else st.constants).get(adapter)
        if entry is None or entry.key != layer_key:
            base, lora_a, lora_b, _, scaling = layer
            shape = (own, lora_a.device, tuple(lora_a.shape), tuple(lora_b.shape), scaling)
            batches.setdefault(shape, []).append((module, adapter, layer, layer_key))
    for (own, device, *_), batch in batches.items():
        with torch.autocast(device.type, enabled=False):
            (refresh_grams if own else refresh_batch)(batch, dtype, in_place)


def _fresh(module: nn.Module, adapter: str, layer: tuple, dtype: torch.dtype, gram: bool) -> Constants | Gram:
    """The adapter's constants (`gram`: its A·Aᵀ alone); when stale, every stale layer of its group is refreshed
    first, and this layer to what was asked."""
    st = ensure_state(module)
    entry = (st.grams if gram else st.constants).get(adapter)
    if entry is None or entry.key != key(st, *layer):
        group = st.group
        this = (module, adapter)
        refresh(group.members if group and (id(module), adapter) in group.ids else [this], dtype,
                caller=None if gram else this)
        entry = (st.grams if gram else st.constants)[adapter]
    return entry


def cached_consts(module: nn.Module, adapter: str, layer: tuple, dtype: torch.dtype) -> Consts:
    """The adapter's constants, refreshed with its group's when stale."""
    entry = _fresh(module, adapter, layer, dtype, gram=False)
    pair = entry.derived.get(dtype)
    if pair is None:
        with torch.no_grad():
            pair = entry.derived[dtype] = branch_weights(entry.sb, entry.scale, dtype)
    return Consts(entry.norm, entry.scale, *pair)


@torch.no_grad()
def own_consts(module: nn.Module, adapter: str, layer: tuple, cross: Tensor, dtype: torch.dtype, use_triton: bool,
               ) -> Consts:
    """The constants of a layer that computes its norm in its forward, from its A·W0ᵀ (`norm_in_forward`). Compiled,
    A·Aᵀ and ‖W0_i‖² are read as `fresh_norms` left them: Dynamo traces no cache lookup."""
    base, _, lora_b, magnitude, scaling = layer
    if torch.compiler.is_compiling():
        st = held_state(module)
        gram, w2 = st.grams[adapter].gram, st.frozen.sqnorm
    else:
        gram = _fresh(module, adapter, layer, dtype, gram=True).gram
        w2 = frozen_sqnorm(module, base, dtype)
    return layer_consts(cross, gram, lora_b, magnitude, w2, scaling, dtype, use_triton)


def traced_tail(module: nn.Module, adapter: str, result: Tensor, ax: Tensor, layer: tuple, use_triton: bool,
                ) -> Tensor:
    """`DoraTail`'s function for torch.compile. In a compiled training step (`fresh_norms`), one operator that reads
    the constants refreshed before the step and runs `DoraTail`'s kernels (`dora_tail_op`). Elsewhere (a decode step;
    a trainable base bias) plain differentiable ops, with the norm rebuilt from the frozen ‖W0_i‖² (`prepare_compile`)
    and this call's A and B (the reference's Gram form as plain ops), detached as in `DoraTail`, and m's gradient
    through autograd."""
    base, lora_a, lora_b, magnitude, scaling = layer
    st = held_state(module)
    bias = getattr(base, "bias", None)
    if dora_state.compiled_reads_norms and (bias is None or not bias.requires_grad):
        entry = st.constants[adapter]
        b_eff, b_s = entry.derived.get(ax.dtype) or branch_weights(entry.sb, entry.scale, ax.dtype)
        return dora_tail_op(result, ax, lora_b, magnitude, entry.scale, b_eff, b_s, bias, scaling, use_triton)
    if dora_state.compiled_reads_norms:
        norm = st.constants[adapter].norm
    else:
        with torch.no_grad():
            a, b = lora_a.float(), lora_b.float()
            cross = a_times_w0t(module, base, lora_a, ax.dtype).float().T  # d_out × r
            norm = (st.frozen.sqnorm + (b * (2 * scaling * cross + scaling**2 * (b @ (a @ a.T)))).sum(1)
                    ).clamp_min(0).sqrt()
    scale = magnitude.float() / norm
    plain = result.float() if bias is None else result.float() - bias.float()
    y = scale * (plain + scaling * F.linear(ax, lora_b).float())
    return (y if bias is None else y + bias.float()).to(result.dtype)
