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
  Layers of one shape are refreshed together; for plain 16-bit CUDA bases one Triton kernel forms every
  layer's A·W0ᵀ, reading each W0 where it lies (`_grouped_a_w0t`).
- The norm depends on parameters only, so it is cached until they change: keyed on the parameters'
  version counters and storage, on the scaling, and on a global count of optimizer steps; a fresh
  value is computed after every optimizer step and reused across gradient-accumulation micro-batches
  and activation-checkpoint recomputation.
- One autograd node (`_DoraTail`) scales the base output and adds the LoRA branch with the scale
  folded into B; it saves the layer's output y and takes the magnitude's gradient from it
  (Σ_t g ⊙ (y - b) / m), instead of saving the base and LoRA outputs separately. On CUDA, a Triton
  kernel forms g·scale and Σ_t g ⊙ y in one pass over g and y.
- Under torch.compile, where a Python-side cache would be read once at tracing and never again, the
  layer computes the same function as plain differentiable ops; the compiler fuses what `_DoraTail` and the
  Triton kernels do by hand. A compiled training step (`trainer.compile`) refreshes every layer's norm
  eagerly, batched, before its compiled code runs, and the layers read them there (`fresh_norms`). Other
  compiled code (generation's decode step) rebuilds each layer's norm inside the graph at every call, from
  the frozen ‖w_i‖² (`prepare_compile` computes it once, eagerly) and A·W0ᵀ.
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
    """Row scales of an int8 weight, W0 = CB · SCB / 127 (bitsandbytes moves SCB to the state on use)."""
    scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB
    return scb.float() / 127.0


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
    if _is_unpacked_4bit(base.weight):  # what bitsandbytes' 4-bit matmul does for more than one row
        w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        return F.linear(lora_a.to(w.dtype), w)
    return _base_without_bias(base, lora_a.to(dtype))


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


def _consts(module: nn.Module, adapter: str, parts: tuple, dtype: torch.dtype) -> _Consts:
    """The layer's constants; when stale, those of every stale layer of its group are recomputed."""
    cache = module.__dict__.setdefault("_finlora_dora_cache", {})
    entry = cache.get(adapter)
    if entry is None or entry.key != _key(*parts):
        group = module.__dict__.get("_finlora_dora_group")
        _refresh(group.members if group and (id(module), adapter) in group.ids else [(module, adapter)], dtype)
        entry = cache[adapter]
    pair = entry.derived.get(dtype)
    if pair is None:
        with torch.no_grad():
            pair = entry.derived[dtype] = (
                torch.mul(entry.sb, entry.scale[:, None], out=torch.empty_like(entry.sb, dtype=dtype)),
                entry.sb.to(dtype),
            )
    return _Consts(entry.norm, entry.scale, *pair)


@torch.no_grad()
def _refresh(members: list[tuple[nn.Module, str]], dtype: torch.dtype) -> None:
    """Recompute the constants of the stale layers among ``members``, batched over layers of one shape."""
    batches: dict[tuple, list] = {}
    for module, adapter in members:
        if adapter not in module.lora_A or not isinstance(module.lora_variant.get(adapter), FastDoraLinearVariant):
            continue
        parts = _parts(module, adapter)
        key = _key(*parts)
        entry = module.__dict__.setdefault("_finlora_dora_cache", {}).get(adapter)
        if entry is None or entry.key != key:
            base, lora_a, lora_b, _, scaling = parts
            shape = (lora_a.device, tuple(lora_a.shape), tuple(lora_b.shape), scaling)
            batches.setdefault(shape, []).append((module, adapter, parts, key))
    for (device, *_), batch in batches.items():
        with torch.autocast(device.type, enabled=False):
            _refresh_batch(batch, dtype)


def _frozen_sqnorm(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Tensor:
    """‖w_i‖² of the layer's base weight, computed again only when the weight is another one."""
    cache = module.__dict__.setdefault("_finlora_dora_cache", {})
    w_key = _state(base.weight)
    if cache.get("w2", (None,))[0] != w_key:
        cache["w2"] = (w_key, _row_sqnorm(module, base, dtype))
    return cache["w2"][1]


def _refresh_batch(batch: list, dtype: torch.dtype) -> None:
    """‖w_i‖² + Σ_j B_ij·(2s·(W0Aᵀ)_ij + s²·(B·A·Aᵀ)_ij) for layers of one shape and scaling, at once."""
    w2 = [_frozen_sqnorm(module, base, dtype) for module, _, (base, *_), _ in batch]
    scaling = batch[0][2][4]
    a = torch.stack([parts[1] for _, _, parts, _ in batch]).float()  # L × r × d_in
    b = torch.stack([parts[2] for _, _, parts, _ in batch]).float()  # L × d_out × r
    m = torch.stack([parts[3] for _, _, parts, _ in batch]).float()  # L × d_out
    cross = _grouped_a_w0t(batch, a)
    if cross is None:
        cross = torch.stack([_a_times_w0t(module, base, lora_a, dtype).float()
                             for module, _, (base, lora_a, *_), _ in batch])
    t = torch.baddbmm(cross.transpose(1, 2), b, a @ a.transpose(1, 2), beta=2 * scaling, alpha=scaling**2)
    n_layers, d_out, r = b.shape
    sq = torch.baddbmm(torch.stack(w2).view(-1, 1, 1), b.view(-1, 1, r), t.view(-1, r, 1))
    norm = sq.view(n_layers, d_out).clamp_min_(0).sqrt_()
    scale = m / norm
    sb = b * scaling
    b_eff = torch.mul(sb, scale[..., None], out=torch.empty_like(sb, dtype=dtype))
    b_s = sb.to(dtype)
    for i, (module, adapter, _, key) in enumerate(batch):
        entry = _Entry(key, norm[i], scale[i], sb[i], {dtype: (b_eff[i], b_s[i])})
        module.__dict__["_finlora_dora_cache"][adapter] = entry


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


def forget_norms(model: nn.Module) -> None:
    """Drop every layer's cached norms, keeping the frozen ‖w_i‖², so that the next forward computes them again:
    inside a CUDA graph being recorded (`finlora.capture`), where they are then recomputed at each replay
    from the parameters as they are, instead of read from a cache the graph would never consult again."""
    for module in model.modules():
        cache = module.__dict__.get("_finlora_dora_cache")
        for adapter in [k for k in cache or () if k != "w2"]:
            del cache[adapter]


def fresh_norms(model: nn.Module) -> Callable[[], AbstractContextManager]:
    """The context a compiled training step of `model` runs in (a new one at each call of the function returned): on
    entry, the norms of every stale finlora DoRA layer are refreshed, eagerly and batched over layers of one shape
    (as the eager layers refresh them), and until it exits compiled layers read them instead of rebuilding each
    layer's norm in its graph (A·W0ᵀ and a few small kernels a layer, where the batched refresh takes a few kernels
    in all). Dynamo guards on the switch: a graph traced inside the context and one traced outside (a decode step)
    are separate graphs."""
    groups = list({id(group): group for module in model.modules()
                   if (group := module.__dict__.get("_finlora_dora_group"))}.values())

    @contextmanager
    def refreshed() -> Iterator[None]:
        global _compiled_reads_norms
        for group in groups:  # in the dtype the layers compute in: checkpointed layers recompute eagerly
            module, adapter = group.members[0]
            weight = module.lora_A[adapter].weight
            mixed = torch.is_autocast_enabled(weight.device.type)
            _refresh(group.members, torch.get_autocast_dtype(weight.device.type) if mixed else weight.dtype)
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
    def _scale_add_kernel(y_ptr, r_ptr, scale_ptr, n_rows, n_cols, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """y += r·scale[column], in float32, in place."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (y + r * scale[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

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
    def _scale_grad_kernel(
        g_ptr,
        y_ptr,
        scale_ptr,
        m_ptr,
        gz_ptr,
        part_ptr,
        n_rows,
        n_cols,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        """gz = g·scale and per-column partial sums of g·y / m (float32), one pass over g and y."""
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
        m = tl.load(m_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
        tl.store(part_ptr + pid_t * n_cols + cols, acc / m, mask=col_mask)


@functools.cache
def _sm_count(device: int | None) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on_triton(t: Tensor, use: bool) -> bool:
    return use and triton is not None and t.is_cuda


def _scale_add_(y: Tensor, r: Tensor, scale: Tensor, use_triton: bool = True) -> Tensor:
    """y += r ⊙ scale (scale float32, broadcast over the last dimension), in place; y and r contiguous."""
    if _on_triton(y, use_triton) and r.is_contiguous():
        n_cols = y.shape[-1]
        n_rows = y.numel() // n_cols
        grid = (triton.cdiv(n_rows, 8), triton.cdiv(n_cols, 512))
        _scale_add_kernel[grid](y, r, scale, n_rows, n_cols, BLOCK_T=8, BLOCK_N=512)
        return y
    return y.addcmul_(r, scale)


def _scale_grad(g: Tensor, y: Tensor, scale: Tensor, magnitude: Tensor, use_triton: bool = True,
                ) -> tuple[Tensor, Tensor]:
    """(g·scale in g's dtype, Σ_rows g·y / m in float32) for 2-D contiguous g and y."""
    if _on_triton(g, use_triton):
        n_rows, n_cols = g.shape
        block_t, block_n = 32, 128
        col_blocks = triton.cdiv(n_cols, block_n)
        target = 4 * _sm_count(g.device.index)
        row_tiles = triton.cdiv(n_rows, block_t)
        # a power of two, so that few variants are compiled however the number of rows varies
        iters = min(64, triton.next_power_of_2(triton.cdiv(row_tiles, triton.cdiv(target, col_blocks))))
        row_progs = triton.cdiv(row_tiles, iters)
        gz = torch.empty_like(g)
        part = torch.empty(row_progs, n_cols, device=g.device, dtype=torch.float32)
        _scale_grad_kernel[(row_progs, col_blocks)](
            g, y, scale, magnitude, gz, part, n_rows, n_cols, BLOCK_T=block_t, BLOCK_N=block_n, ITERS=iters
        )
        return gz, part.sum(0)
    gz = torch.mul(g, scale, out=torch.empty_like(g))
    return gz, (g * y).sum(0, dtype=torch.float32).div_(magnitude)


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
        y = torch.matmul(ax, consts.b_eff.T)
        if bias is not None:
            y += ((1 - consts.scale) * bias.detach().float()).to(y.dtype)
        y = _scale_add_(y, result.contiguous(), consts.scale, use_triton).to(result.dtype)
        ctx.save_for_backward(y, ax, magnitude, bias)
        ctx.use_triton = use_triton
        ctx.consts = consts
        ctx.scaling = scaling
        ctx.b_dtype = lora_b.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, ax, magnitude, bias = ctx.saved_tensors
        consts: _Consts = ctx.consts
        n_out = y.shape[-1]
        g2 = grad.reshape(-1, n_out)
        grad_ax = grad_b = grad_m = grad_bias = None
        if bias is None:
            gz, grad_m = _scale_grad(g2, y.reshape(-1, n_out), consts.scale, magnitude, ctx.use_triton)
        else:  # Σ g·(y - b) / m
            gz = torch.mul(g2, consts.scale, out=torch.empty_like(g2))
            g_sum = g2.sum(0, dtype=torch.float32)
            grad_m = ((g2 * y.reshape(-1, n_out)).sum(0, dtype=torch.float32) - bias.float() * g_sum) / magnitude
            grad_bias = (g_sum * (1 - consts.scale)).to(bias.dtype)
        gz_lora = gz.to(ax.dtype)
        if ctx.needs_input_grad[1]:
            grad_ax = torch.matmul(gz_lora, consts.b_s).view(ax.shape)
        if ctx.needs_input_grad[2]:
            grad_b = (gz_lora.T @ ax.reshape(-1, ax.shape[-1])).to(ctx.b_dtype).mul_(ctx.scaling)
        return gz.view(grad.shape), grad_ax, grad_b, grad_m.to(magnitude.dtype), None, None, grad_bias, None


class FastDoraLinearVariant(DoraLinearVariant):
    """peft's DoRA variant with finlora's forward; init, merge and unmerge stay peft's. `use_triton`: the
    fused Triton kernels on CUDA (False: the same computation in PyTorch ops, to compare)."""

    def __init__(self, use_triton: bool = True) -> None:
        self.use_triton = use_triton

    def forward(self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
        dropout = module.lora_dropout[active_adapter]
        if module.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)
        parts = _parts(module, active_adapter)
        base, lora_a, lora_b, magnitude, scaling = parts
        ax = F.linear(x, lora_a)  # not the module: saves a module call; the norm reads the weight anyway
        if torch.compiler.is_compiling():
            return _traced_tail(module, active_adapter, result, ax, parts)
        consts = _consts(module, active_adapter, parts, ax.dtype)
        return _DoraTail.apply(result, ax, lora_b, magnitude, consts, scaling, getattr(base, "bias", None),
                               self.use_triton)

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


def _traced_tail(module: nn.Module, adapter: str, result: Tensor, ax: Tensor, parts: tuple) -> Tensor:
    """`_DoraTail`'s function as plain differentiable ops, for torch.compile: the norm refreshed by `fresh_norms`,
    or else rebuilt from the frozen ‖w_i‖² (`prepare_compile`) and this call's A and B, detached as in
    `_DoraTail`; m's gradient through autograd."""
    base, lora_a, lora_b, magnitude, scaling = parts
    cache = module.__dict__["_finlora_dora_cache"]
    if _compiled_reads_norms:
        norm = cache[adapter].norm
    else:
        with torch.no_grad():
            a, b = lora_a.float(), lora_b.float()
            cross = _a_times_w0t(module, base, lora_a, ax.dtype).float().T  # d_out × r
            norm = (cache["w2"][1] + (b * (2 * scaling * cross + scaling**2 * (b @ (a @ a.T)))).sum(1)
                    ).clamp_min(0).sqrt()
    scale = magnitude.float() / norm
    bias = getattr(base, "bias", None)
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
    group = _Group(members)
    for module in layers:
        module.__dict__["_finlora_dora_group"] = group
    return len(layers)
