"""Each finlora DoRA layer's constants (its norm, m / norm, and the LoRA branch's weights with the scale folded in),
computed for many layers at once: batched over the layers of one shape, from the frozen ‖W0_i‖², A·W0ᵀ and A·Aᵀ
(`finlora.dora.reference.gram_row_norm`), and stored on each layer's `LayerState`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import finlora.dora.kernels as kernels
from finlora.compat.bitsandbytes import is_unpacked_4bit_weight
from finlora.compat.torch import foreach_copy
from finlora.dora.bases import a_times_w0t, a_w0t_4bit, is_plain, plain_weight, row_sqnorm
from finlora.dora.ops import Consts
from finlora.dora.reference import gram_row_norm
from finlora.dora.state import Constants, Frozen, Gram, ensure_state, tensor_key

# A batch: (module, adapter, parts, key) of layers of one shape, parts = (base, A, B, m, scaling).
Batch = list[tuple[nn.Module, str, tuple, tuple]]


def frozen_sqnorm(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Tensor:
    """‖W0_i‖² of the layer's base weight, computed again only when the weight is another one."""
    st = ensure_state(module)
    w_key = tensor_key(base.weight)
    if st.frozen is None or st.frozen.key != w_key:
        st.frozen = Frozen(w_key, row_sqnorm(module, base, dtype))
    return st.frozen.sqnorm


def branch_weights(sb: Tensor, scale: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(s·scale ⊙ B, s·B) in the LoRA branch's dtype, from s·B and the scale in float32 (of one layer or a batch)."""
    return torch.mul(sb, scale[..., None], out=torch.empty_like(sb, dtype=dtype)), sb.to(dtype)


def norm_consts(gram: Tensor, b: Tensor, m: Tensor, w2: Tensor, cross: Tensor, scaling: float, dtype: torch.dtype,
                ) -> tuple[Tensor, ...]:
    """(norm, scale, s·B, b_eff, b_s) of L layers of one shape from their A·Aᵀ, B, m (L × …), frozen ‖W0_i‖² and
    A·W0ᵀ, all float32."""
    norm = gram_row_norm(w2, cross, gram, b, scaling)
    scale = m / norm
    sb = b * scaling
    return (norm, scale, sb, *branch_weights(sb, scale, dtype))


def layer_consts(cross: Tensor, gram: Tensor, lora_b: Tensor, magnitude: Tensor, w2: Tensor, scaling: float,
                 dtype: torch.dtype, use_triton: bool) -> Consts:
    """One layer's constants from its A·W0ᵀ (r × d_out) and A·Aᵀ: `norm_consts` for one layer, on CUDA in one Triton
    kernel (`kernels.layer_norm_consts`)."""
    if kernels.on_triton(cross, use_triton):
        return Consts(*kernels.layer_norm_consts(cross, gram, lora_b, magnitude, w2, scaling, dtype))
    norm, scale, _, b_eff, b_s = norm_consts(gram[None], lora_b.float()[None], magnitude.float()[None], w2[None],
                                             cross.float()[None], scaling, dtype)
    return Consts(norm[0], scale[0], b_eff[0], b_s[0])


def gram(a: Tensor) -> Tensor:
    """A·Aᵀ of every layer (L × r × r, float32). On CUDA and up to 128 rows in all, as one product of all layers' rows,
    the blocks off its diagonal wasted (fewer, larger products than the batched one for few layers); elsewhere
    batched, which keeps each layer's A·Aᵀ the same whichever layers it is refreshed with (a dense copy of a 4-bit
    model answers as the model, bit for bit)."""
    n_layers, r, _ = a.shape
    if not a.is_cuda or n_layers * r > 128:
        return a @ a.transpose(1, 2)
    rows = a.reshape(n_layers * r, -1)
    return (rows @ rows.T).view(n_layers, r, n_layers, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def refresh_grams(batch: Batch, dtype: torch.dtype, in_place: bool = False) -> None:
    """A·Aᵀ of layers of one shape that compute the rest of their norm in their forward, at once."""
    grams = gram(torch.stack([parts[1] for _, _, parts, _ in batch]).float())
    if in_place:
        (grams,) = kept(batch, dtype, (grams,))
    for i, (module, adapter, _, key) in enumerate(batch):
        ensure_state(module).grams[adapter] = Gram(key, grams[i])


def refresh_batch(batch: Batch, dtype: torch.dtype, in_place: bool = False) -> None:
    """The constants of layers of one shape and scaling, at once."""
    w2 = [frozen_sqnorm(module, base, dtype) for module, _, (base, *_), _ in batch]
    scaling = batch[0][2][4]
    a = torch.stack([parts[1] for _, _, parts, _ in batch]).float()  # L × r × d_in
    b = torch.stack([parts[2] for _, _, parts, _ in batch]).float()  # L × d_out × r
    m = torch.stack([parts[3] for _, _, parts, _ in batch]).float()  # L × d_out
    cross = grouped_a_w0t(batch, a)
    if cross is None:
        cross = stacked_a_w0t(batch, a, dtype)
    norm, scale, sb, b_eff, b_s = norm_consts(gram(a), b, m, torch.stack(w2), cross, scaling, dtype)
    if in_place:
        norm, scale, sb, b_eff, b_s = kept(batch, dtype, (norm, scale, sb, b_eff, b_s))
    for i, (module, adapter, _, key) in enumerate(batch):
        ensure_state(module).constants[adapter] = Constants(key, norm[i], scale[i], sb[i], {dtype: (b_eff[i], b_s[i])})


def kept(batch: Batch, dtype: torch.dtype, fresh: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """`fresh` copied into the tensors the last refresh of the same layers left (one multi-tensor copy), or kept as
    those tensors. torch.compile takes tensors that modules hold for static inputs, and its CUDA graphs
    (`trainer.compile=cudagraphs`) are recorded again whenever one moves: each step, had each refresh new tensors."""
    store = ensure_state(batch[0][0]).kept
    key = (tuple((id(module), adapter) for module, adapter, _, _ in batch), dtype)
    old = store.get(key)
    if old is None or [(t.shape, t.dtype, t.device) for t in old] != [(t.shape, t.dtype, t.device) for t in fresh]:
        store[key] = fresh
        return fresh
    foreach_copy(old, fresh)
    return old


def stacked_a_w0t(batch: Batch, a: Tensor, dtype: torch.dtype) -> Tensor:
    """A·W0ᵀ of every layer of `batch` (L × r × d_out, float32) where `grouped_a_w0t` does not serve. For 4-bit bases
    of one dtype, A is cast once for all layers and the products once, not each a layer."""
    bases = [parts[0] for _, _, parts, _ in batch]
    if not (all(is_unpacked_4bit_weight(base.weight) for base in bases)
            and len({base.weight.quant_state.dtype for base in bases}) == 1):
        return torch.stack([a_times_w0t(module, base, lora_a, dtype).float()
                            for module, _, (base, lora_a, *_), _ in batch])
    a_w = a.to(bases[0].weight.quant_state.dtype)
    return torch.stack([a_w0t_4bit(a_w[i], base) for i, base in enumerate(bases)]).float()


def grouped_a_w0t(batch: Batch, a: Tensor) -> Tensor | None:
    """A·W0ᵀ of every layer of `batch` in one Triton launch (`kernels.grouped_a_w0t`) where the bases are plain 16-bit
    CUDA weights; None elsewhere."""
    if not (kernels.on_triton(a, all(module.lora_variant[adapter].use_triton for module, adapter, _, _ in batch))
            and all(is_plain(parts[0]) for _, _, parts, _ in batch)):
        return None
    weights = [plain_weight(module, parts[0]) for module, _, parts, _ in batch]  # a transposed one is not contiguous
    return kernels.grouped_a_w0t(weights, a)
