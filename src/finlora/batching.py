"""How encoded examples become training batches, and what share of each batch is padding.

FinLoRA's sentiment prompts are short and uneven (32 to 219 tokens, median 56 with SmolLM2's tokenizer),
so a shuffled batch of 8 padded to its longest example is about 29% padding, 39% at 32. Three ways:

- `padded`: shuffled, right-padded to the longest example of the batch (the plain DataLoader).
- `grouped`: shuffled mega-batches of 64 batches, sorted by length inside, cut into batches, and the
  batches shuffled: little padding, but each batch holds examples of similar length (and so often of
  one source file of a mixture).
- `packed`: the very batches `padded` draws, each packed into a few rows with no attention mask and
  `position_ids` restarting at every example; transformers then keeps attention inside each example
  (a block-diagonal mask for SDPA and eager, varlen kernels for FlashAttention). Same examples, same
  token-weighted loss as `padded`, so the run learns the same thing, on a fraction of the tokens.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

from finlora.prompts import IGNORE_INDEX, Encoded

STATS_KEY = "stats"


class BatchStats(NamedTuple):
    """Counted on the host when the batch is built, so logging them never waits for the GPU."""

    examples: int
    tokens: int  # real (non-padding) tokens
    slots: int  # tokens the model computes on: rows × width


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


class LengthGroupedSampler(Sampler[int]):
    """Indices whose consecutive runs of `batch_size` have similar lengths, in a seeded order that changes
    with the epoch (Lightning calls `set_epoch`). Only the last batch of the epoch can be short."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega_batches: int = 64) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start:start + self.mega], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()] + short
        return (i for batch in shuffled for i in batch)
