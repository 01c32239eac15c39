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
  computed once, W0·Aᵀ is a skinny product over the r rows of A (through bitsandbytes' own 4-bit matmul,
  or on the int8 weight itself), so W0 + s·B·A is never built and nothing is dequantized per call.
  Layers of one shape are refreshed together; for plain 16-bit CUDA bases one Triton kernel forms every
  layer's A·W0ᵀ, reading each W0 where it lies (`_grouped_a_w0t`).
- The norm depends on parameters only, so it is cached until they change: keyed on the parameters'
  version counters and storage, on the scaling, and on a global count of optimizer steps; a fresh
  value is computed after every optimizer step and reused across gradient-accumulation micro-batches
  and activation-checkpoint recomputation.
- In training (eager, recorded by `trainer.capture`, or a compiled training step), a layer on a base that
  dequantizes its weight for the product (bitsandbytes 4-bit, or 8-bit computed weight-only, `finlora.quant.int8`)
  instead computes its norm in its own forward (`DoraLinearQuantized`): W0 is dequantized once for both the base
  output and A·W0ᵀ, where a cached refresh would dequantize W0 a second time. A·Aᵀ is still refreshed
  batched over the layers of a shape, and one Triton kernel a layer turns both into the norm and the
  branch's weights on CUDA (`_dora_norm_kernel`).
- One autograd node (`_DoraTail`) scales the base output and adds the LoRA branch with the scale
  folded into B; it saves the layer's output y and takes the magnitude's gradient from it
  (Σ_t g ⊙ (y - b) / m), instead of saving the base and LoRA outputs separately. On CUDA with a 16-bit
  branch, one Triton kernel forms y (the branch's product B·(A·x) and the scaled base output together),
  and one forms g·scale with B's and m's gradients, in one pass over g, y and A·x (its per-block partial
  sums added up by a third kernel), where LoRA runs a GEMM and an elementwise kernel each way.
- Under torch.compile, where a Python-side cache would be read once at tracing and never again, a compiled
  training step (`trainer.compile`) refreshes every layer's norm (of a 4-bit layer, its A·Aᵀ) eagerly,
  batched, before its compiled code runs (`fresh_norms`), and the layers call `_DoraTail`'s kernels as one operator
  (`finlora::dora_tail`) with the constants refreshed there. Other compiled code (generation's decode
  step) computes the same function as plain differentiable ops, rebuilding each layer's norm inside the
  graph at every call from the frozen ‖w_i‖² (`prepare_compile` computes it once, eagerly) and A·W0ᵀ.
- Recorded as a CUDA graph (`trainer.capture`), the layer runs as in eager mode, with its norms recomputed
  inside the graph at every replay: the cache is emptied before recording (`forget_norms`), so the
  recorded forward refreshes every layer's norms, batched, from the parameters the replay reads.
- With dropout > 0 in training, dropout applies to the LoRA branch only (the formula above). peft
  instead runs the base matmul a second time on dropout(x) and adds that; outside training, or with
  dropout 0, both compute the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
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
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    from peft.tuners.lora.bnb import Linear4bit as _Lora4bit
    from peft.tuners.lora.bnb import Linear8bitLt as _Lora8bit

    from finlora.quant.int8 import WeightOnlyLinear8bit, int8_product, int8_rows
except ImportError:
    bnb = None

_CHUNK_ELEMENTS = 1 << 24  # elements of a weight expanded to float32 at once, for its frozen row norms

_optimizer_steps = 0  # bumped after every torch optimizer step; part of every norm-cache key
_step_hook: Any = None
_compiled_reads_norms = False  # inside `fresh_norms`: compiled layers read the norms refreshed there


def _count_optimizer_step(*_: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _install_step_hook() -> None:
    """Optimizers such as bitsandbytes' write parameters without bumping version counters."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def _state(t: Tensor) -> tuple[int, int, int]:
    """What changes when a tensor's values may have changed, short of reading them (a new dtype or
    device means new storage)."""
    return (id(t), t.data_ptr(), t._version)


def _is_int8(weight: Tensor) -> bool:
    return type(weight).__name__ == "Int8Params" and weight.dtype == torch.int8


def _is_unpacked_4bit(weight: Tensor) -> bool:
    qs = getattr(weight, "quant_state", None)
    return type(weight).__name__ == "Params4bit" and qs is not None and not getattr(qs, "packing_format_for_cpu", False)


def _is_plain(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) and type(base.weight) in (Tensor, nn.Parameter)


def _int8_scale(base: nn.Module) -> Tensor:
    """Row scales of an int8 weight, W0 = CB · SCB / 127."""
    return int8_rows(base)[1].float() / 127.0


def _base_without_bias(base: nn.Module, inputs: Tensor) -> Tensor:
    """inputs · W0ᵀ through the base layer itself (rows × out_features)."""
    out = base(inputs)
    if getattr(base, "bias", None) is not None:
        out = out - base.bias.to(out.dtype)
    return out


def _plain_weight(module: nn.Module, base: nn.Linear) -> Tensor:
    return base.weight.T if getattr(module, "fan_in_fan_out", False) else base.weight


def _row_sqnorm(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Tensor:
    """‖w_i‖² of the dequantized base weight in float32: frozen, so computed once per weight."""
    weight = base.weight
    if _is_plain(base) or _is_int8(weight):
        w = _plain_weight(module, base) if _is_plain(base) else weight.data
        step = max(1, _CHUNK_ELEMENTS // w.shape[1])
        sq = torch.cat([w[i : i + step].float().pow(2).sum(1) for i in range(0, w.shape[0], step)])
        return sq if _is_plain(base) else sq * _int8_scale(base) ** 2
    if _is_unpacked_4bit(weight):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().pow(2).sum(1)
    # Anything else (bitsandbytes' CPU-packed 4-bit, other quantizers): the base layer on an identity.
    d_in = module.in_features
    step = max(1, _CHUNK_ELEMENTS // max(d_in, module.out_features))
    total = torch.zeros(module.out_features, device=weight.device)
    for i in range(0, d_in, step):
        eye = torch.eye(d_in, device=weight.device, dtype=dtype)[i : i + step]
        total += _base_without_bias(base, eye).float().pow(2).sum(0)
    return total


def _a_times_w0t(module: nn.Module, base: nn.Module, lora_a: Tensor, dtype: torch.dtype) -> Tensor:
    """A · W0ᵀ (r × out_features): a skinny product over the r rows of A, never W0 + s·B·A."""
    if _is_plain(base):
        w = _plain_weight(module, base)
        return F.linear(lora_a.to(w.dtype), w)
    if _is_int8(base.weight):  # CB is exact in any float dtype; A in the branch's dtype, as peft does
        return F.linear(lora_a.to(dtype), base.weight.data.to(dtype)).float() * _int8_scale(base)
    if _is_unpacked_4bit(base.weight):
        return _a_w0t_4bit(lora_a.to(base.weight.quant_state.dtype), base)
    return _base_without_bias(base, lora_a.to(dtype))


def _a_w0t_4bit(a: Tensor, base: nn.Module) -> Tensor:
    """A·W0ᵀ through bitsandbytes' own 4-bit matmul, which picks between its fused kernel and W0 dequantized for
    cuBLAS by shape: for 8 rows against 14336 × 4096 on an H100, 68 µs against 127 µs dequantized."""
    return bnb.matmul_4bit(a, base.weight.t(), quant_state=base.weight.quant_state)


class _Entry(NamedTuple):
    """A layer's DoRA constants: they depend on parameters only, so they hold until the next step."""

    key: tuple
    norm: Tensor  # ‖W0 + s·B·A‖ per output row, float32
    scale: Tensor  # m / norm, float32
    sb: Tensor  # s·B, float32
    derived: dict[torch.dtype, tuple[Tensor, Tensor]]  # dtype -> (s·scale ⊙ B, s·B) in that dtype


class _Consts(NamedTuple):
    norm: Tensor
    scale: Tensor
    b_eff: Tensor  # s·scale ⊙ B in the LoRA branch's dtype: its forward weight
    b_s: Tensor  # s·B in the LoRA branch's dtype: its backward weight


class _Group:
    """The layers switched by one `use_fast_dora` call: their constants are refreshed together."""

    def __init__(self, members: list[tuple[nn.Module, str]]) -> None:
        self.members = members
        self.ids = {(id(m), a) for m, a in members}


def _parts(module: nn.Module, adapter: str) -> tuple[nn.Module, Tensor, Tensor, Tensor, float]:
    return (
        module.get_base_layer(),
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        module.lora_magnitude_vector[adapter].weight,
        module.scaling[adapter],
    )


def _key(base: nn.Module, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scaling: float) -> tuple:
    return (_optimizer_steps, _state(lora_a), _state(lora_b), _state(magnitude), scaling, _state(base.weight))


def _fresh_entry(module: nn.Module, adapter: str, parts: tuple, dtype: torch.dtype, slot: Any) -> Any:
    """The layer's cache entry at `slot` (`adapter`: its constants; ``("gram", adapter)``: its A·Aᵀ alone); when stale,
    every stale layer of its group is refreshed first, and this layer to what `slot` holds."""
    cache = module.__dict__.setdefault("_finlora_dora_cache", {})
    entry = cache.get(slot)
    if entry is None or entry[0] != _key(*parts):
        group = module.__dict__.get("_finlora_dora_group")
        layer = (module, adapter)
        _refresh(group.members if group and (id(module), adapter) in group.ids else [layer], dtype,
                 caller=layer if slot == adapter else None)
        entry = cache[slot]
    return entry


def _consts(module: nn.Module, adapter: str, parts: tuple, dtype: torch.dtype) -> _Consts:
    """The layer's constants, refreshed with its group's when stale (`_fresh_entry`)."""
    entry = _fresh_entry(module, adapter, parts, dtype, adapter)
    pair = entry.derived.get(dtype)
    if pair is None:
        with torch.no_grad():
            pair = entry.derived[dtype] = _branch_weights(entry.sb, entry.scale, dtype)
    return _Consts(entry.norm, entry.scale, *pair)


def _branch_weights(sb: Tensor, scale: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(s·scale ⊙ B, s·B) in the LoRA branch's dtype, from s·B and the scale in float32 (of one layer or a batch)."""
    return torch.mul(sb, scale[..., None], out=torch.empty_like(sb, dtype=dtype)), sb.to(dtype)


@torch.no_grad()
def _refresh(members: list[tuple[nn.Module, str]], dtype: torch.dtype, in_place: bool = False,
             caller: tuple[nn.Module, str] | None = None) -> None:
    """Recompute the constants of the stale layers among ``members``, batched over layers of one shape; `in_place`:
    where the last refresh of the same layers left them (`_kept`). Of a layer that computes its norm in its own
    forward (`_norm_in_forward`), only A·Aᵀ (`_refresh_grams`), unless it is the `caller` that needs its constants."""
    batches: dict[tuple, list] = {}
    for module, adapter in members:
        if adapter not in module.lora_A or not isinstance(module.lora_variant.get(adapter), FastDoraLinearVariant):
            continue
        own = _norm_in_forward(module) == adapter and (module, adapter) != caller
        parts = _parts(module, adapter)
        key = _key(*parts)
        entry = module.__dict__.setdefault("_finlora_dora_cache", {}).get(("gram", adapter) if own else adapter)
        if entry is None or entry[0] != key:
            base, lora_a, lora_b, _, scaling = parts
            shape = (own, lora_a.device, tuple(lora_a.shape), tuple(lora_b.shape), scaling)
            batches.setdefault(shape, []).append((module, adapter, parts, key))
    for (own, device, *_), batch in batches.items():
        with torch.autocast(device.type, enabled=False):
            (_refresh_grams if own else _refresh_batch)(batch, dtype, in_place)


def _refresh_grams(batch: list, dtype: torch.dtype, in_place: bool = False) -> None:
    """A·Aᵀ of layers of one shape that compute their norm in their forward, at once, kept as ``("gram", adapter)``:
    a product a layer took 9 µs on an H100 (Llama-3.1-8B's 4,096 columns), as long as all the rest of its norm."""
    gram = _gram(torch.stack([parts[1] for _, _, parts, _ in batch]).float())
    if in_place:
        (gram,) = _kept(batch, dtype, (gram,))
    for i, (module, adapter, _, key) in enumerate(batch):
        module.__dict__["_finlora_dora_cache"][("gram", adapter)] = (key, gram[i])


def _frozen_sqnorm(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Tensor:
    """‖w_i‖² of the layer's base weight, computed again only when the weight is another one."""
    cache = module.__dict__.setdefault("_finlora_dora_cache", {})
    w_key = _state(base.weight)
    if cache.get("w2", (None,))[0] != w_key:
        cache["w2"] = (w_key, _row_sqnorm(module, base, dtype))
    return cache["w2"][1]


def _refresh_batch(batch: list, dtype: torch.dtype, in_place: bool = False) -> None:
    """‖w_i‖² + Σ_j B_ij·(2s·(W0Aᵀ)_ij + s²·(B·A·Aᵀ)_ij) for layers of one shape and scaling, at once."""
    w2 = [_frozen_sqnorm(module, base, dtype) for module, _, (base, *_), _ in batch]
    scaling = batch[0][2][4]
    a = torch.stack([parts[1] for _, _, parts, _ in batch]).float()  # L × r × d_in
    b = torch.stack([parts[2] for _, _, parts, _ in batch]).float()  # L × d_out × r
    m = torch.stack([parts[3] for _, _, parts, _ in batch]).float()  # L × d_out
    cross = _grouped_a_w0t(batch, a)
    if cross is None:
        cross = _stacked_a_w0t(batch, a, dtype)
    norm, scale, sb, b_eff, b_s = _norm_consts(_gram(a), b, m, torch.stack(w2), cross, scaling, dtype)
    if in_place:
        norm, scale, sb, b_eff, b_s = _kept(batch, dtype, (norm, scale, sb, b_eff, b_s))
    for i, (module, adapter, _, key) in enumerate(batch):
        entry = _Entry(key, norm[i], scale[i], sb[i], {dtype: (b_eff[i], b_s[i])})
        module.__dict__["_finlora_dora_cache"][adapter] = entry


def _norm_consts(gram: Tensor, b: Tensor, m: Tensor, w2: Tensor, cross: Tensor, scaling: float, dtype: torch.dtype,
                 ) -> tuple[Tensor, ...]:
    """(norm, scale, s·B, b_eff, b_s) of L layers of one shape (`_Entry`, `_Consts`) from their A·Aᵀ, B, m (L × …),
    frozen ‖w_i‖² and A·W0ᵀ, all float32: ‖w_i‖² + Σ_j B_ij·(2s·(W0Aᵀ)_ij + s²·(B·A·Aᵀ)_ij), then m / norm."""
    t = torch.baddbmm(cross.transpose(1, 2), b, gram, beta=2 * scaling, alpha=scaling**2)
    # Σ_j B_ij·t_ij elementwise: as a batched GEMM of L·d_out products of r numbers each, cuBLAS took 0.1 ms a step
    norm = (b * t).sum(-1).add_(w2).clamp_min_(0).sqrt_()
    scale = m / norm
    sb = b * scaling
    return (norm, scale, sb, *_branch_weights(sb, scale, dtype))


def _kept(batch: list, dtype: torch.dtype, fresh: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """`fresh` copied into the tensors the last refresh of the same layers left (one multi-tensor copy), or kept as
    those tensors. torch.compile takes tensors that modules hold for static inputs, and its CUDA graphs
    (`trainer.compile=cudagraphs`) are recorded again whenever one moves: each step, had each refresh new tensors."""
    kept = batch[0][0].__dict__.setdefault("_finlora_dora_kept", {})
    key = (tuple((id(module), adapter) for module, adapter, _, _ in batch), dtype)
    old = kept.get(key)
    if old is None or [(t.shape, t.dtype, t.device) for t in old] != [(t.shape, t.dtype, t.device) for t in fresh]:
        kept[key] = fresh
        return fresh
    torch._foreach_copy_(list(old), list(fresh))
    return old


def _stacked_a_w0t(batch: list, a: Tensor, dtype: torch.dtype) -> Tensor:
    """A·W0ᵀ of every layer of `batch` (L × r × d_out, float32) where `_grouped_a_w0t` does not serve. For 4-bit bases
    of one dtype, A is cast once for all layers and the products once, not each a layer."""
    bases = [parts[0] for _, _, parts, _ in batch]
    if not (all(_is_unpacked_4bit(base.weight) for base in bases)
            and len({base.weight.quant_state.dtype for base in bases}) == 1):
        return torch.stack([_a_times_w0t(module, base, lora_a, dtype).float()
                            for module, _, (base, lora_a, *_), _ in batch])
    a_w = a.to(bases[0].weight.quant_state.dtype)
    return torch.stack([_a_w0t_4bit(a_w[i], base) for i, base in enumerate(bases)]).float()


def _gram(a: Tensor) -> Tensor:
    """A·Aᵀ of every layer (L × r × r, float32). On CUDA and up to 128 rows in all, as one product of all layers' rows,
    the blocks off its diagonal wasted: cuBLAS's batched product of 4 layers of 4,096 columns took 70 µs on an H100,
    this 9 µs; from 32 layers on the batched product is the faster. Elsewhere batched, which keeps each layer's A·Aᵀ
    the same whichever layers it is refreshed with (a dense copy of a 4-bit model answers as the model, bit for bit)."""
    n_layers, r, _ = a.shape
    if not a.is_cuda or n_layers * r > 128:
        return a @ a.transpose(1, 2)
    rows = a.reshape(n_layers * r, -1)
    return (rows @ rows.T).view(n_layers, r, n_layers, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


_POINTERS: dict[tuple, Tensor] = {}  # (device, weights' addresses) -> those addresses, on the device


def _grouped_a_w0t(batch: list, a: Tensor) -> Tensor | None:
    """A·W0ᵀ of every layer of `batch` (L × r × d_out, float32) in one Triton kernel (`_a_w0t_kernel`) where the bases
    are plain 16-bit CUDA weights: one launch instead of a skinny GEMM and a cast of A a layer. None elsewhere, and
    inside a CUDA graph's recording if the table of the weights' addresses is not on the device yet (the host's copy
    of a new table cannot be recorded; the warm-up passes before a recording make it)."""
    if not (_on_triton(a, all(module.lora_variant[adapter].use_triton for module, adapter, _, _ in batch))
            and all(_is_plain(parts[0]) for _, _, parts, _ in batch)):
        return None
    weights = [_plain_weight(module, parts[0]) for module, _, parts, _ in batch]  # a transposed one is not contiguous
    if not (weights[0].dtype in (torch.bfloat16, torch.float16)
            and all(w.dtype == weights[0].dtype and w.is_contiguous() for w in weights)):
        return None
    key = (a.device, *(w.data_ptr() for w in weights))
    table = _POINTERS.get(key)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        # from pinned memory, without waiting: the host does not stop for the GPU outside logging steps
        table = _POINTERS[key] = torch.tensor(key[1:], dtype=torch.int64).pin_memory().to(a.device, non_blocking=True)
    n_layers, r, d_in = a.shape
    d_out = weights[0].shape[0]
    out = torch.empty(n_layers, r, d_out, device=a.device, dtype=torch.float32)
    _a_w0t_kernel[(n_layers, triton.cdiv(d_out, 64))](
        table, a, out, r, d_in, d_out, W_DTYPE=tl.bfloat16 if weights[0].dtype == torch.bfloat16 else tl.float16,
        R=triton.next_power_of_2(max(r, 16)), BLOCK_N=64, BLOCK_K=64)
    return out


def _dequantizes_in_forward(base: nn.Module) -> bool:
    """Whether `base` computes through its dequantized weight: bitsandbytes 4-bit (unpacked) for training's row
    counts, weight-only 8-bit (`finlora.quant.int8`) always."""
    return _is_unpacked_4bit(base.weight) or isinstance(base, WeightOnlyLinear8bit)


def _norm_in_forward(module: nn.Module) -> str | None:
    """The adapter whose norm `module` computes in its own forward (`DoraLinearQuantized`), from the A·W0ᵀ that its
    base's dequantized weight gives: in training, for one active finlora DoRA adapter on a base that dequantizes its
    weight (`_dequantizes_in_forward`) with no trainable bias, run eagerly (a CUDA graph recording included) or
    compiled in a training step (`fresh_norms`, which refreshes its A·Aᵀ). None where the layer reads its norms from
    the cache."""
    if bnb is None or not isinstance(module, DoraLinearQuantized) or not module.training or module.disable_adapters \
            or module.merged or (torch.compiler.is_compiling() and not _compiled_reads_norms):
        return None
    active = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
    base = module.get_base_layer()
    if (len(active) != 1 or not isinstance(module.lora_variant.get(active[0]), FastDoraLinearVariant)
            or not _dequantizes_in_forward(base) or (base.bias is not None and base.bias.requires_grad)):
        return None
    return active[0]


class _Dequantized4bit(torch.autograd.Function):
    """x·W0ᵀ + b of a bitsandbytes 4-bit layer, and A·W0ᵀ (no gradient), from one dequantized W0: for training's row
    counts bitsandbytes' own matmul dequantizes W0 for cuBLAS too (`gemm_4bit`'s fallback, the same two operators),
    where the norm refresh dequantized each W0 a second time (0.17 ms of an 8 ms step on 4 Llama-3.1-8B layers). A's r
    rows are appended to x's for one product, which reads W0 once: as a product of its own, A·W0ᵀ read all of W0 again
    (about 100 µs a step on 4 Llama-3.1-8B layers, q, k and v). The backward dequantizes again, as bitsandbytes' does,
    instead of keeping the copy (`_dequantize_4bit_op`), and multiplies x's rows' gradient only."""

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
        qs = ctx.quant_state
        nested = qs.state2 if qs.nested else None
        w = _dequantize_4bit_op(weight, qs.absmax, list(qs.shape), qs.dtype, qs.blocksize, qs.quant_type, qs.offset,
                                nested and nested.absmax, nested and nested.code, nested.blocksize if nested else 0)
        return torch.matmul(grad, w.to(grad.dtype)), None, None, None, None


@torch.library.custom_op("finlora::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(packed: Tensor, absmax: Tensor, shape: list[int], dtype: torch.dtype, blocksize: int,
                        quant_type: str, offset: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
                        blocksize2: int) -> Tensor:
    """bitsandbytes' `dequantize_4bit` (a nested state's absmax included) as one operator of finlora's, for the backward
    of `_Dequantized4bit`. Compiled, Inductor would take bitsandbytes' own operators there for the forward's (the same
    operators on the same inputs), merge them, and keep the forward's dequantized W0 until the backward: 48 MB a
    Llama-3.1-8B q/k/v layer, where bitsandbytes' matmul keeps none."""
    state2 = None if absmax2 is None else bnb.functional.QuantState(absmax=absmax2, code=code2, blocksize=blocksize2,
                                                                       dtype=torch.float32)
    state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                                      quant_type=quant_type, dtype=dtype, offset=offset, state2=state2)
    return bnb.functional.dequantize_4bit(packed, state)


@_dequantize_4bit_op.register_fake
def _(packed: Tensor, absmax: Tensor, shape: list[int], dtype: torch.dtype, *_: Any) -> Tensor:
    return packed.new_empty(shape, dtype=dtype)


def _base_and_cross(base: nn.Module, x: Tensor, lora_a: Tensor) -> tuple[Tensor, Tensor]:
    """What the base layer returns for `x`, and A·W0ᵀ, from one dequantization of W0: `int8_product` for a weight-only
    8-bit base; for a 4-bit one, `_Dequantized4bit` (bitsandbytes' `Linear4bit.forward`'s dtype handling repeated
    here)."""
    if isinstance(base, WeightOnlyLinear8bit):
        return int8_product(base, x, lora_a.detach())
    fix_4bit_weight_quant_state_from_module(base)
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = x.dtype
    if base.compute_dtype is not None:
        x = x.to(base.compute_dtype)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    out, cross = _Dequantized4bit.apply(x, lora_a.detach(), base.weight, bias, base.weight.quant_state)
    return out.to(dtype), cross


def _layer_consts(cross: Tensor, gram: Tensor, lora_b: Tensor, magnitude: Tensor, w2: Tensor, scaling: float,
                  dtype: torch.dtype, use_triton: bool) -> _Consts:
    """One layer's constants from its A·W0ᵀ (r × d_out) and A·Aᵀ: `_norm_consts` for one layer, on CUDA in one Triton
    kernel (`_dora_norm_kernel`) instead of a dozen small ones."""
    if _on_triton(cross, use_triton):
        r, d_out = cross.shape
        norm, scale = (cross.new_empty(d_out, dtype=torch.float32) for _ in range(2))
        b_eff, b_s = (cross.new_empty(d_out, r, dtype=dtype) for _ in range(2))
        _dora_norm_kernel[(triton.cdiv(d_out, 64),)](
            cross.contiguous(), gram.contiguous(), lora_b.contiguous(), magnitude.contiguous(), w2, norm, scale, b_eff,
            b_s, r, d_out, scaling, R=triton.next_power_of_2(max(r, 16)), BLOCK_N=64)
        return _Consts(norm, scale, b_eff, b_s)
    norm, scale, _, b_eff, b_s = _norm_consts(gram[None], lora_b.float()[None], magnitude.float()[None], w2[None],
                                              cross.float()[None], scaling, dtype)
    return _Consts(norm[0], scale[0], b_eff[0], b_s[0])


@torch.no_grad()
def _own_consts(module: nn.Module, adapter: str, parts: tuple, cross: Tensor, dtype: torch.dtype, use_triton: bool,
                ) -> _Consts:
    """The constants of a layer that computes its norm in its forward, from its A·W0ᵀ (`_norm_in_forward`). Compiled,
    A·Aᵀ and ‖w_i‖² are read as `fresh_norms` left them: Dynamo traces no cache lookup (`__dict__.setdefault` broke
    the graph at each layer)."""
    base, _, lora_b, magnitude, scaling = parts
    if torch.compiler.is_compiling():
        cache = module.__dict__["_finlora_dora_cache"]
        gram, w2 = cache[("gram", adapter)][1], cache["w2"][1]
    else:
        gram = _fresh_entry(module, adapter, parts, dtype, ("gram", adapter))[1]
        w2 = _frozen_sqnorm(module, base, dtype)
    return _layer_consts(cross, gram, lora_b, magnitude, w2, scaling, dtype, use_triton)


def forget_norms(model: nn.Module) -> None:
    """Drop every layer's cached norms, keeping the frozen ‖w_i‖², so that the next forward computes them again:
    inside a CUDA graph being recorded (`finlora.capture`), where they are then recomputed at each replay
    from the parameters as they are, instead of read from a cache the graph would never consult again."""
    for module in model.modules():
        cache = module.__dict__.get("_finlora_dora_cache")
        for adapter in [k for k in cache or () if k != "w2"]:
            del cache[adapter]


def fresh_norms(model: nn.Module, in_place: bool = False) -> Callable[[], AbstractContextManager]:
    """The context a compiled training step of `model` runs in (a new one at each call of the function returned): on
    entry, the norms of every stale finlora DoRA layer are refreshed, eagerly and batched over layers of one shape
    (as the eager layers refresh them), and until it exits compiled layers read them instead of rebuilding each
    layer's norm in its graph (A·W0ᵀ and a few small kernels a layer, where the batched refresh takes a few kernels
    in all). A 4-bit layer that computes its norm in its forward (`_norm_in_forward`) has only its A·Aᵀ refreshed here,
    and reads that and its ‖w_i‖² (computed once, now). Dynamo guards on the switch: a graph traced inside the context
    and one traced outside (a decode step) are separate graphs. `in_place`: refreshed where the last refresh left them
    (`_kept`), for torch.compile's CUDA graphs."""
    groups = list({id(group): group for module in model.modules()
                   if (group := module.__dict__.get("_finlora_dora_group"))}.values())
    prepare_compile(model)

    @contextmanager
    def refreshed() -> Iterator[None]:
        global _compiled_reads_norms
        for group in groups:  # in the dtype the layers compute in: checkpointed layers recompute eagerly
            module, adapter = group.members[0]
            weight = module.lora_A[adapter].weight
            mixed = torch.is_autocast_enabled(weight.device.type)
            _refresh(group.members, torch.get_autocast_dtype(weight.device.type) if mixed else weight.dtype, in_place)
        _compiled_reads_norms = True
        try:
            yield
        finally:
            _compiled_reads_norms = False

    return refreshed


def clear_dora_cache(model: nn.Module) -> None:
    """Forget cached norms, for code that writes adapter weights through ``.data`` outside an optimizer."""
    for module in model.modules():
        module.__dict__.pop("_finlora_dora_cache", None)


if triton is not None:

    @triton.jit
    def _dora_out_kernel(res_ptr, ax_ptr, b_ptr, scale_ptr, bias_ptr, y_ptr, n_rows, n_cols, r, HAS_BIAS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
        """y = ax·b_effᵀ + scale ⊙ result (+ (1 - scale) ⊙ bias), in float32, rounded once: the LoRA branch's
        product and the scaled base output in one pass."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, R)
        row_mask, col_mask = rows < n_rows, cols < n_cols
        a = tl.load(ax_ptr + rows[:, None].to(tl.int64) * r + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < r),
                    other=0.0)
        b = tl.load(b_ptr + cols[None, :] * r + ks[:, None], mask=col_mask[None, :] & (ks[:, None] < r), other=0.0)
        acc = tl.dot(a, b)
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            acc += ((1 - scale) * tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _a_w0t_kernel(w_table, a_ptr, out_ptr, r, d_in, d_out, W_DTYPE: tl.constexpr, R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[l] = A[l]·W0[l]ᵀ in float32, A cast to W0's dtype first (as `_a_times_w0t`), each layer's W0 read where
        it lies: its address is w_table[l]. One program a layer and BLOCK_N outputs."""
        layer = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, R)
        w_ptr = tl.load(w_table + layer).to(tl.pointer_type(W_DTYPE))
        a_base = a_ptr + layer.to(tl.int64) * r * d_in
        acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_base + rows[:, None] * d_in + ks[None, :], mask=(rows[:, None] < r) & (ks[None, :] < d_in),
                        other=0.0)
            w = tl.load(w_ptr + cols[None, :].to(tl.int64) * d_in + ks[:, None],
                        mask=(cols[None, :] < d_out) & (ks[:, None] < d_in), other=0.0)
            acc = tl.dot(a.to(W_DTYPE), w, acc)
        out = out_ptr + layer.to(tl.int64) * r * d_out + rows[:, None] * d_out + cols[None, :]
        tl.store(out, acc, mask=(rows[:, None] < r) & (cols[None, :] < d_out))

    @triton.jit
    def _dora_norm_kernel(cross_ptr, gram_ptr, b_ptr, m_ptr, w2_ptr, norm_ptr, scale_ptr, b_eff_ptr, b_s_ptr, r, d_out,
                          scaling, R: tl.constexpr, BLOCK_N: tl.constexpr):
        """One layer's constants from its A·W0ᵀ and A·Aᵀ, as `_norm_consts`, for BLOCK_N rows of W0 a program:
        ‖w_i‖² + Σ_j B_ij·(2s·(W0Aᵀ)_ij + s²·(B·A·Aᵀ)_ij), m / norm, and s·B scaled by it and not, in the branch's
        dtype."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, R)
        col_mask = cols < d_out
        gram = tl.load(gram_ptr + ks[:, None] * r + ks[None, :], mask=(ks[:, None] < r) & (ks[None, :] < r), other=0.0)
        mask = col_mask[:, None] & (ks[None, :] < r)
        b = tl.load(b_ptr + cols[:, None] * r + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        cross = tl.load(cross_ptr + ks[None, :] * d_out + cols[:, None], mask=mask, other=0.0).to(tl.float32)
        t = 2 * scaling * cross + scaling * scaling * tl.dot(b, gram, input_precision="ieee")
        norm = tl.sqrt(tl.maximum(tl.sum(b * t, axis=1) + tl.load(w2_ptr + cols, mask=col_mask, other=0.0), 0.0))
        scale = tl.load(m_ptr + cols, mask=col_mask, other=1.0).to(tl.float32) / norm
        tl.store(norm_ptr + cols, norm, mask=col_mask)
        tl.store(scale_ptr + cols, scale, mask=col_mask)
        sb = b * scaling
        offs = cols[:, None] * r + ks[None, :]
        tl.store(b_eff_ptr + offs, (sb * scale[:, None]).to(b_eff_ptr.dtype.element_ty), mask=mask)
        tl.store(b_s_ptr + offs, sb.to(b_s_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dora_grad_kernel(g_ptr, y_ptr, ax_ptr, scale_ptr, m_ptr, bias_ptr, gz_ptr, part_ptr, n_rows, n_cols, r,
                          scaling, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          R: tl.constexpr, ITERS: tl.constexpr):
        """gz = g·scale, and over this program's rows the partial sums (float32) of B's gradient, s·gzᵀ·ax, and of
        m's, Σ g·(y - bias) / m: one pass over g, y and ax."""
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, R)
        col_mask = cols < n_cols
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_m = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, R], dtype=tl.float32)
        for i in range(ITERS):
            rows = (pid_t * ITERS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= bias[None, :]
            gz = (g * scale[None, :]).to(gz_ptr.dtype.element_ty)
            tl.store(gz_ptr + offs, gz, mask=mask)
            acc_m += tl.sum(g * y, axis=0)
            a = tl.load(ax_ptr + rows[:, None].to(tl.int64) * r + ks[None, :],
                        mask=row_mask[:, None] & (ks[None, :] < r), other=0.0)
            acc_b = tl.dot(tl.trans(gz.to(a.dtype)), a, acc_b)
        m = tl.load(m_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
        out = part_ptr + pid_t.to(tl.int64) * n_cols * (r + 1)
        tl.store(out + cols[:, None] * r + ks[None, :], acc_b * scaling, mask=col_mask[:, None] & (ks[None, :] < r))
        tl.store(out + n_cols * r + cols, acc_m / m, mask=col_mask)


    @triton.jit
    def _sum_rows_kernel(part_ptr, out_ptr, n_rows, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """out = Σ_rows part (n_rows × n_cols, float32), BLOCK_P rows at a time, in one fixed order."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for p0 in range(0, n_rows, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            mask = (rows[:, None] < n_rows) & col_mask[None, :]
            acc += tl.sum(tl.load(part_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask,
                                  other=0.0), axis=0)
        tl.store(out_ptr + cols, acc, mask=col_mask)


@functools.cache
def _sm_count(device: int | None) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on_triton(t: Tensor, use: bool) -> bool:
    return use and triton is not None and t.is_cuda


def _fused(ax: Tensor, use: bool) -> bool:
    """The Triton kernels of the layer's output and gradients: on CUDA, with a 16-bit LoRA branch (a float32 one
    would go through TF32 in `tl.dot`)."""
    return _on_triton(ax, use) and ax.dtype in (torch.bfloat16, torch.float16)


def _dora_out(result: Tensor, ax: Tensor, scale: Tensor, b_eff: Tensor, bias: Tensor | None, use_triton: bool,
              ) -> Tensor:
    """y = scale ⊙ result + (1 - scale) ⊙ b + ax·b_effᵀ, from the base output (its bias b included)."""
    if _fused(ax, use_triton):
        result, ax = result.contiguous(), ax.contiguous()
        n_cols, r = result.shape[-1], ax.shape[-1]
        n_rows = result.numel() // n_cols
        y = torch.empty_like(result)
        _dora_out_kernel[(triton.cdiv(n_rows, 64), triton.cdiv(n_cols, 64))](
            result, ax, b_eff, scale, scale if bias is None else bias, y, n_rows, n_cols, r, HAS_BIAS=bias is not None,
            BLOCK_T=64, BLOCK_N=64, R=triton.next_power_of_2(max(r, 16)))
        return y
    y = torch.matmul(ax, b_eff.T)
    if bias is not None:
        y += ((1 - scale) * bias.detach().float()).to(y.dtype)
    return y.addcmul_(result, scale).to(result.dtype)


def _dora_grads(grad: Tensor, y: Tensor, ax: Tensor, scale: Tensor, magnitude: Tensor, b_s: Tensor,
                bias: Tensor | None, scaling: float, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `_dora_out`'s inputs from its output's, `grad`: (the base output's, g·scale; ax's; B's
    and m's, flattened into one float32 vector). m's is Σ_tokens g·(y - b) / m."""
    n_out, r = b_s.shape
    g2, y2, ax2 = grad.reshape(-1, n_out), y.reshape(-1, n_out), ax.reshape(-1, r)
    if _fused(ax, use_triton):
        g2, ax2 = g2.contiguous(), ax2.contiguous()
        n_rows = g2.shape[0]
        block_t, block_n = 32, 64
        col_blocks = triton.cdiv(n_out, block_n)
        row_tiles = triton.cdiv(n_rows, block_t)
        # enough programs to fill the GPU; a power of two, so that few variants compile however many rows there are
        iters = min(64, triton.next_power_of_2(triton.cdiv(row_tiles, triton.cdiv(4 * _sm_count(g2.device.index),
                                                                                   col_blocks))))
        row_progs = triton.cdiv(row_tiles, iters)
        gz = torch.empty_like(g2)
        part = torch.empty(row_progs, n_out * (r + 1), device=g2.device, dtype=torch.float32)
        _dora_grad_kernel[(row_progs, col_blocks)](
            g2, y2, ax2, scale, magnitude, scale if bias is None else bias, gz, part, n_rows, n_out, r, scaling,
            HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_N=block_n, R=triton.next_power_of_2(max(r, 16)),
            ITERS=iters)
        # a sum of its own: the last program adding up the others' (a counter in memory) took longer on an H100
        b_and_m = _sum_rows(part) if row_progs > 1 else part[0]
    else:
        gz = torch.mul(g2, scale, out=torch.empty_like(g2))
        g_y = (g2 * y2).sum(0, dtype=torch.float32)
        if bias is not None:
            g_y -= bias.float() * g2.sum(0, dtype=torch.float32)
        grad_b = (gz.to(ax.dtype).T @ ax2).float().mul_(scaling)
        b_and_m = torch.cat([grad_b.flatten(), g_y / magnitude])
    grad_ax = torch.matmul(gz.to(ax.dtype), b_s).view(ax.shape)
    return gz.view(grad.shape), grad_ax, b_and_m


def _sum_rows(part: Tensor) -> Tensor:
    """Σ over the rows of the grad kernel's partial sums, in one fixed order: 1.85 µs a layer on an H100, where torch's
    column sum took 3.2 µs (embedded shapes, batch 8)."""
    n_rows, n_cols = part.shape
    block_p = min(32, triton.next_power_of_2(n_rows))
    block_n = 4096 // block_p
    out = part.new_empty(n_cols)
    _sum_rows_kernel[(triton.cdiv(n_cols, block_n),)](part, out, n_rows, n_cols, BLOCK_P=block_p, BLOCK_N=block_n)
    return out


def _split_b_and_m(b_and_m: Tensor, lora_b: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """B's and m's gradients from `_dora_grads`' one vector, each in its parameter's dtype."""
    n_out, r = lora_b.shape
    return b_and_m[: n_out * r].view(n_out, r).to(lora_b.dtype), b_and_m[n_out * r :].to(magnitude.dtype)


class _DoraTail(torch.autograd.Function):
    """y = scale ⊙ (result - b) + b + ax·b_effᵀ; saves y and ax, and takes m's gradient from y."""

    @staticmethod
    def forward(
        ctx: Any,
        result: Tensor,
        ax: Tensor,
        lora_b: Tensor,
        magnitude: Tensor,
        consts: _Consts,
        scaling: float,
        bias: Tensor | None,
        use_triton: bool,
    ) -> Tensor:
        # b_eff and ax share a dtype, so an enclosing autocast casts nothing here
        y = _dora_out(result, ax, consts.scale, consts.b_eff, bias, use_triton)
        ctx.save_for_backward(y, ax, lora_b, magnitude, bias)
        ctx.use_triton = use_triton
        ctx.consts = consts
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, ax, lora_b, magnitude, bias = ctx.saved_tensors
        consts: _Consts = ctx.consts
        gz, grad_ax, b_and_m = _dora_grads(grad, y, ax, consts.scale, magnitude, consts.b_s,
                                           None if bias is None else bias.detach(), ctx.scaling, ctx.use_triton)
        grad_b, grad_m = _split_b_and_m(b_and_m, lora_b, magnitude)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[6]:
            grad_bias = (grad.reshape(-1, y.shape[-1]).sum(0, dtype=torch.float32) * (1 - consts.scale)).to(bias.dtype)
        return gz, grad_ax, grad_b, grad_m, None, None, grad_bias, None


@torch.library.custom_op("finlora::dora_tail", mutates_args=())
def _dora_tail_op(result: Tensor, ax: Tensor, lora_b: Tensor, magnitude: Tensor, scale: Tensor, b_eff: Tensor,
                  b_s: Tensor, bias: Tensor | None, scaling: float, use_triton: bool) -> Tensor:
    """`_DoraTail` as one operator for compiled code, which calls it as it is: its kernels are fused already.
    (`lora_b` and `magnitude` are there for their gradients.)"""
    return _dora_out(result, ax, scale, b_eff, bias, use_triton)


@torch.library.custom_op("finlora::dora_tail_grads", mutates_args=())
def _dora_tail_grads_op(grad: Tensor, y: Tensor, ax: Tensor, scale: Tensor, magnitude: Tensor, b_s: Tensor,
                        bias: Tensor | None, scaling: float, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _dora_grads(grad, y, ax, scale, magnitude, b_s, bias, scaling, use_triton)


@_dora_tail_op.register_fake
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
    gz, grad_ax, b_and_m = _dora_tail_grads_op(grad, y, ax, scale, magnitude, b_s, bias, ctx.scaling, ctx.use_triton)
    return gz, grad_ax, *_split_b_and_m(b_and_m, lora_b, magnitude), None, None, None, None, None, None


_dora_tail_op.register_autograd(_dora_tail_backward, setup_context=_dora_tail_setup)


class FastDoraLinearVariant(DoraLinearVariant):
    """peft's DoRA variant with finlora's forward; init, merge and unmerge stay peft's. `use_triton`: the
    fused Triton kernels on CUDA (False: the same computation in PyTorch ops, to compare)."""

    def __init__(self, use_triton: bool = True) -> None:
        self.use_triton = use_triton

    def forward(self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, cross: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """`cross`: the layer's A·W0ᵀ from its own forward (`DoraLinearQuantized`), whose norm is then computed here
        from it instead of read from the cache."""
        dropout = module.lora_dropout[active_adapter]
        if module.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)
        parts = _parts(module, active_adapter)
        base, lora_a, lora_b, magnitude, scaling = parts
        ax = F.linear(x, lora_a)  # not the module: saves a module call; the norm reads the weight anyway
        bias = getattr(base, "bias", None)
        compiling = torch.compiler.is_compiling()
        if cross is None and compiling:
            return _traced_tail(module, active_adapter, result, ax, parts, self.use_triton)
        if cross is None:
            consts = _consts(module, active_adapter, parts, ax.dtype)
        else:
            consts = _own_consts(module, active_adapter, parts, cross, ax.dtype, self.use_triton)
        if compiling:
            return _dora_tail_op(result, ax, lora_b, magnitude, consts.scale, consts.b_eff, consts.b_s, bias, scaling,
                                 self.use_triton)
        return _DoraTail.apply(result, ax, lora_b, magnitude, consts, scaling, bias, self.use_triton)

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


def _variant_kwargs_only(args: tuple, kwargs: dict) -> bool:
    """Whether a LoRA layer's call passes nothing but what peft hands its variant: Dynamo traces this (torch 2.11's
    fails on `kwargs.keys() - a_frozenset`)."""
    return not args and not set(kwargs) - set(VARIANT_KWARG_KEYS)


class DoraLinearQuantized:
    """The forward of a peft LoRA layer on a bitsandbytes base that dequantizes its weight (4-bit, or weight-only
    8-bit), whose class `use_fast_dora` switches to `DoraLinear4bit` / `DoraLinear8bit`: in training
    (`_norm_in_forward`) it takes the base output and A·W0ᵀ from one dequantization of W0 (`_base_and_cross`), and
    the DoRA variant computes the norm from that, in the layer. Anything else (eval, merged or disabled adapters,
    several active ones) runs peft's forward, with the norms cached."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = _norm_in_forward(self)
        if adapter is None or not _variant_kwargs_only(args, kwargs):
            return super().forward(x, *args, **kwargs)
        variant, lora_a = self.lora_variant[adapter], self.lora_A[adapter].weight
        result, cross = _base_and_cross(self.get_base_layer(), x, lora_a)
        if torch.is_autocast_enabled():  # as peft's forward: without autocast, x in A's dtype, y in result's
            return variant.forward(self, adapter, x, result, cross=cross)
        y = variant.forward(self, adapter, self._cast_input_dtype(x, lora_a.dtype), result, cross=cross)
        return y.to(result.dtype)


if bnb is not None:

    class DoraLinear4bit(DoraLinearQuantized, _Lora4bit):
        """peft's LoRA layer on a bitsandbytes 4-bit base, with `DoraLinearQuantized`'s forward."""

    class DoraLinear8bit(DoraLinearQuantized, _Lora8bit):
        """peft's LoRA layer on a bitsandbytes 8-bit base, with `DoraLinearQuantized`'s forward (its norm in the layer
        when the base is weight-only, `finlora.quant.int8`)."""

    _QUANTIZED_DORA = {_Lora4bit: DoraLinear4bit, _Lora8bit: DoraLinear8bit}


def _traced_tail(module: nn.Module, adapter: str, result: Tensor, ax: Tensor, parts: tuple, use_triton: bool,
                 ) -> Tensor:
    """`_DoraTail`'s function for torch.compile. In a compiled training step (`fresh_norms`), one operator that reads
    the constants refreshed before the step and runs `_DoraTail`'s kernels (`_dora_tail_op`). Elsewhere (a decode step;
    a trainable base bias) plain differentiable ops, with the norm rebuilt from the frozen ‖w_i‖² (`prepare_compile`)
    and this call's A and B, detached as in `_DoraTail`, and m's gradient through autograd."""
    base, lora_a, lora_b, magnitude, scaling = parts
    cache = module.__dict__["_finlora_dora_cache"]
    bias = getattr(base, "bias", None)
    if _compiled_reads_norms and (bias is None or not bias.requires_grad):
        entry = cache[adapter]
        b_eff, b_s = entry.derived.get(ax.dtype) or _branch_weights(entry.sb, entry.scale, ax.dtype)
        return _dora_tail_op(result, ax, lora_b, magnitude, entry.scale, b_eff, b_s, bias, scaling, use_triton)
    if _compiled_reads_norms:
        norm = cache[adapter].norm
    else:
        with torch.no_grad():
            a, b = lora_a.float(), lora_b.float()
            cross = _a_times_w0t(module, base, lora_a, ax.dtype).float().T  # d_out × r
            norm = (cache["w2"][1] + (b * (2 * scaling * cross + scaling**2 * (b @ (a @ a.T)))).sum(1)
                    ).clamp_min(0).sqrt()
    scale = magnitude.float() / norm
    plain = result.float() if bias is None else result.float() - bias.float()
    y = scale * (plain + scaling * F.linear(ax, lora_b).float())
    return (y if bias is None else y + bias.float()).to(result.dtype)


@torch.no_grad()
def prepare_compile(model: nn.Module) -> None:
    """Compute every finlora DoRA layer's frozen ‖w_i‖² now, eagerly, for `_traced_tail` to read."""
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if isinstance(variants, dict) and any(isinstance(v, FastDoraLinearVariant) for v in variants.values()):
            base = module.get_base_layer()
            dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
            with torch.autocast(base.weight.device.type, enabled=False):
                _frozen_sqnorm(module, base, dtype)


def _supported(base: nn.Module) -> bool:
    if _is_plain(base):
        return True
    return bnb is not None and isinstance(base, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def use_fast_dora(model: nn.Module, use_triton: bool = True) -> int:
    """Switch every DoRA-enabled LoRA linear layer of ``model`` to finlora's DoRA, in place.

    Layers whose base finlora does not handle (not nn.Linear or bitsandbytes 8-/4-bit) keep peft's
    DoRA. Adapters added or loaded later get peft's variant: call this again after loading them (a call
    also sets `use_triton` on layers switched before). Returns the number of layers that now run finlora's DoRA.
    """
    _install_step_hook()
    members: list[tuple[nn.Module, str]] = []
    layers: list[nn.Module] = []
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict) or not _supported(module.get_base_layer()):
            continue
        for name, variant in variants.items():
            if type(variant) is DoraLinearVariant:
                variants[name] = FastDoraLinearVariant(use_triton)
            elif isinstance(variant, FastDoraLinearVariant):
                variant.use_triton = use_triton
        fast = [name for name, variant in variants.items() if isinstance(variant, FastDoraLinearVariant)]
        members += [(module, name) for name in fast]
        layers += [module] if fast else []
        if fast and bnb is not None and type(module) in _QUANTIZED_DORA:
            module.__class__ = _QUANTIZED_DORA[type(module)]
    group = _Group(members)
    for module in layers:
        module.__dict__["_finlora_dora_group"] = group
    return len(layers)
