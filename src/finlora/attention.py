"""Attention of a compiled decode step that reads each key/value head once.

Llama-3 and SmolLM2 use grouped-query attention: several query heads share one key/value head. For a padded batch,
transformers' SDPA attention on CUDA first copies the keys and values out to one per query head (`repeat_kv`), since
SDPA's grouped mode with a mask would take its slow path; for one new token it instead lays the query heads of a
group along the query axis (`pack_gqa`), but not in compiled code. A compiled decode step over a static cache thus
writes and reads the whole cache several times more than it holds. `grouped_decoding` lets a model's decode steps
take `decode_attention`, which packs the group in compiled code too; a prefill goes to transformers' SDPA, over the
prompt's positions only when the cache holds nothing else (`_written`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from finlora.compat.transformers import attn_implementation, set_attn_implementation

NAME = "finlora_decode_sdpa"


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA over one new token per row, a group's query heads as the query axis of their key/value head
    ([rows, heads, 1, dim] as [rows, kv heads, group, dim]), the mask (one per row, shared by every head)
    broadcast over them; anything else, and any option this does not handle, goes to transformers' SDPA."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = attention_mask is None or attention_mask.shape[1] == 1
    if query.shape[2] != 1 or groups == 1 or not plain or any(kwargs.get(k) is not None for k in
                                                                  ("softcap", "position_bias", "sinks")):
        key, value, attention_mask = _written(query, key, value, attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    out = F.scaled_dot_product_attention(query.reshape(rows, heads // groups, groups, dim), key, value,
                                         attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _written(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A prefill into an empty static cache sees the whole cache as keys, every position past the prompt
    masked: only the prompt's positions, then, which is the same attention over a fraction of the cache
    (transformers does this only without a padding mask). Read from the mask itself (a wait for the GPU, in
    an eager prefill), so a prefill behind earlier tokens keeps everything."""
    n = query.shape[2]
    if (n == 1 or key.shape[2] <= n or mask is None or mask.dtype != torch.bool or mask.shape[-1] != key.shape[2]
            or torch.compiler.is_compiling() or mask[..., n:].any()):
        return key, value, mask
    return key[:, :, :n], value[:, :, :n], mask[..., :n]


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes


@contextmanager
def grouped_decoding(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """`decode_attention` for the model's attention while the block runs, if it computes SDPA (on anything else,
    eager or a flash kernel, nothing changes); its setting as it was afterwards."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf_model, "config", None)
    before = attn_implementation(config)
    if not enabled or before != "sdpa":
        yield
        return
    set_attn_implementation(config, NAME)
    try:
        yield
    finally:
        set_attn_implementation(config, before)
