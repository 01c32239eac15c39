"""The decode step's attention (`finlora.attention`): the function transformers' SDPA attention computes, the
query heads of a group packed on their shared key/value head; taken by generation's compiled path only, and the
model's own setting back afterwards."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA_DIR
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

import finlora.attention
import finlora.evaluate
from finlora.attention import NAME, decode_attention
from finlora.data import read_jsonl
from finlora.evaluate import generate


class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("queries", [1, 5])
def test_decode_attention_is_transformers_sdpa(queries):
    """Rows of a left-padded batch (a bool mask, as transformers makes it for SDPA) against a cache of 40
    positions, 9 query heads on 3 key/value heads; with 5 queries (a prefill) it is transformers' own path."""
    g = torch.Generator().manual_seed(0)
    rows, kv, dim, cache = 4, 3, 16, 40
    query = torch.randn(rows, 9, queries, dim, generator=g)
    key, value = (torch.randn(rows, kv, cache, dim, generator=g) for _ in range(2))
    mask = torch.ones(rows, 1, queries, cache, dtype=torch.bool)
    for row, padding in enumerate((0, 3, 7, 12)):
        mask[row, :, :, :padding] = False
    mask[:, :, :, 30:] = False  # positions of the static cache not written yet
    module = _Attention()
    ours, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (rows, queries, 9, dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_prefill_into_an_empty_static_cache_attends_over_the_prompt_only(monkeypatch):
    """The prompt's 6 positions of a 40-position cache, left padding, everything past the prompt masked: the
    attention over the first 6 positions, which is the attention over all 40; with one more position visible
    (a prefill behind earlier tokens) every position is kept."""
    g = torch.Generator().manual_seed(1)
    rows, queries, cache = 3, 6, 40
    query = torch.randn(rows, 9, queries, 16, generator=g)
    key, value = (torch.randn(rows, 3, cache, 16, generator=g) for _ in range(2))
    mask = torch.zeros(rows, 1, queries, cache, dtype=torch.bool)
    mask[:, :, :, :queries] = torch.ones(queries, queries, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # a left-padded row
    mask[1, :, :2, 0] = True  # (its padding positions attend to something, as transformers arranges)
    module = _Attention()
    seen = []

    def spying(module, query, key, value, mask, **kwargs):
        seen.append(key.shape[2])
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(finlora.attention, "sdpa_attention_forward", spying)
    for visible in (queries, queries + 1):
        mask[:, :, :, queries:visible] = True
        ours, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert seen == [queries, cache]


def test_static_decoding_takes_it_and_gives_the_model_its_attention_back(lively, monkeypatch):
    """The CUDA path run on the CPU (transformers does not compile it here): every decode step's attention is
    `decode_attention` with one query token, the answers are the eager path's, and the model computes with
    SDPA again afterwards."""
    tokenizer, model = lively
    records = read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[:12:2]
    eager = generate(model, tokenizer, records, 5, 8)
    queries = []

    def counting(module, query, *args, **kwargs):
        queries.append(query.shape[2])
        return decode_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, counting)
    monkeypatch.setattr(finlora.evaluate, "compiles_decoding", lambda device: True)
    assert generate(model, tokenizer, records, 5, 8) == eager
    layers = model.config.num_hidden_layers
    assert len(queries) == layers * 5 and queries.count(1) == layers * 4  # a prefill, then 4 decode steps
    assert model.config._attn_implementation == "sdpa"
