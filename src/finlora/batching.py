"""The batch formats: how encoded examples become the tensors a model takes, for training and generation.

A training batch is a dict of tensors (`input_ids`, `labels`, and `attention_mask` or `position_ids`) plus
its `BatchStats` under `STATS_KEY`, counted on the host; `model_inputs` strips what the model does not
take. Generation batches are left-padded prompts (`pad_left`). Padding uses the tokenizer's pad token,
which `models.load_tokenizer` always sets.

FinLoRA's sentiment prompts are short and uneven (32 to 219 tokens, median 56 with SmolLM2's tokenizer),
so a shuffled batch of 8 padded to its longest example is about 29% padding, 39% at 32. Three ways:

- `padded`: shuffled, right-padded to the longest example of the batch (the plain DataLoader).
- `grouped`: padded batches of examples of similar length (`data.LengthGroupedSampler` picks them):
  little padding, but each batch holds examples of similar length (and so often of one source file of
  a mixture).
- `packed`: the very batches `padded` draws, each packed into a few rows with no attention mask and
  `position_ids` restarting at every example; transformers then keeps attention inside each example
  (a block-diagonal mask for SDPA and eager, varlen kernels for FlashAttention). Same examples, same
  token-weighted loss as `padded`, so the run learns the same thing, on a fraction of the tokens.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from finlora.prompts import IGNORE_INDEX, Encoded

STATS_KEY = "stats"


class BatchStats(NamedTuple):
    """Counted on the host when the batch is built, so logging them never waits for the GPU."""

    examples: int
    tokens: int  # real (non-padding) tokens
    slots: int  # tokens the model computes on: rows × width


def pad_right(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    return {"input_ids": _padded([e.input_ids for e in batch], pad_id),
            "attention_mask": _padded([[1] * len(e.input_ids) for e in batch], 0),
            "labels": _padded([e.labels for e in batch], IGNORE_INDEX)}


def pad_left(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts for `generate`, left-padded so that every row's next token comes at the same position."""
    return {"input_ids": _padded(prompts, pad_id, left=True),
            "attention_mask": _padded([[1] * len(p) for p in prompts], 0, left=True)}


def _padded(rows: list[list[int]], fill: int, left: bool = False) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        else:
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pack(batch: list[Encoded], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Pack whole examples into ceil(tokens / row_length) rows of near-equal fill (longest first into the
    emptiest row), then right-pad the rows to the fullest one.

    The first label of each example is ignored: in a packed row the previous example's last token would
    predict it, where a padded batch predicts nothing (the first token of a prompt is never a target).
    Padding at the end of a row gets positions of its own, so it is a separate sequence no real token sees.
    """
    lengths = [len(e.input_ids) for e in batch]
    rows: list[list[Encoded]] = [[] for _ in range(math.ceil(sum(lengths) / max(row_length, *lengths)))]
    fill = [(0, r) for r in range(len(rows))]
    for e in sorted(batch, key=lambda e: len(e.input_ids), reverse=True):
        used, r = heapq.heappop(fill)
        rows[r].append(e)
        heapq.heappush(fill, (used + len(e.input_ids), r))
    width = max(used for used, _ in fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.empty((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, start:start + n] = torch.tensor(e.input_ids)
            labels[r, start + 1:start + n] = torch.tensor(e.labels[1:])
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def with_stats(collate: Callable[[list[Encoded]], dict[str, torch.Tensor]], batch: list[Encoded]) -> dict[str, Any]:
    """`collate(batch)` plus the batch's `BatchStats`, under `STATS_KEY`."""
    out: dict[str, Any] = collate(batch)
    out[STATS_KEY] = BatchStats(len(batch), sum(len(e.input_ids) for e in batch), out["input_ids"].numel())
    return out


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes: the batch without its statistics, and no KV cache (with a cache,
    transformers does not look for packed rows and would let packed examples attend to each other)."""
    return {k: v for k, v in batch.items() if k != STATS_KEY} | {"use_cache": False}


def num_examples(batch: dict[str, Any]) -> int:
    """Examples in a batch: a packed row holds several."""
    stats = batch.get(STATS_KEY)
    return stats.examples if stats is not None else batch["input_ids"].shape[0]
