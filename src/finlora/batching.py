"""The batch formats: how encoded examples become the tensors a model takes, for training and generation.

A training batch is a dict of tensors (`input_ids`, `labels`, and `attention_mask` or `position_ids`) plus
its `BatchStats` under `STATS_KEY`, counted on the host; `model_inputs` strips what the model does not
take. Generation batches are left-padded prompts (`pad_left`). Padding uses the tokenizer's pad token,
which `models.load_tokenizer` always sets.

FinLoRA's sentiment prompts are short and of uneven length, so a shuffled batch padded to its longest
example is much padding (docs/benchmarks.md, "Data path"). Four ways:

- `padded`: shuffled, right-padded to the longest example of the batch (the plain DataLoader).
- `grouped`: padded batches of examples of similar length (`data.LengthGroupedSampler` picks them):
  little padding, but each batch holds examples of similar length (and so often of one source file of
  a mixture).
- `packed`: the very batches `padded` draws, each packed into a few rows with no attention mask and
  `position_ids` restarting at every example; transformers then keeps attention inside each example
  (a block-diagonal mask for SDPA and eager, varlen kernels for FlashAttention). Same examples, same
  token-weighted loss as `padded`, so the run learns the same thing, on a fraction of the tokens.
- `static`: the same batches packed into one row padded to the next of a few fixed widths
  (`static_widths`), with a fixed number of loss positions: the shapes compiled code and CUDA graphs
  reuse (`trainer.compile`). Same loss as `packed`; the only padding is up to the next fixed width.

Every training batch also carries the positions whose next token is a label and those labels
(`LOSS_POSITIONS`, `LOSS_TARGETS`), found on the host, so the loss picks them out on the GPU without
waiting for it (a boolean mask there would copy back to the host to learn how many there are).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from finlora.prompts import IGNORE_INDEX, Encoded

STATS_KEY = "stats"
LOSS_POSITIONS = "loss_positions"  # flat indices into rows × width of the positions that predict a label
LOSS_TARGETS = "loss_targets"  # the label each of them predicts (IGNORE_INDEX for static padding)


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


def pack(batch: list[Encoded], pad_id: int, row_length: int, width: int = 0) -> dict[str, torch.Tensor]:
    """Pack whole examples into ceil(tokens / row_length) rows of near-equal fill (longest first into the
    emptiest row), then right-pad the rows to the fullest one (or to `width`, if wider).

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
    width = max(width, *(used for used, _ in fill))
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


def static_widths(batch_size: int, max_length: int, smallest: int = 128, growth: float = 1.25) -> list[int]:
    """The row widths of `static` batches: multiples of 64 growing by about `growth` (so at most about a fifth
    of a row is padding), up to the most tokens a batch can hold."""
    top = _round_up(batch_size * max_length, 64)
    widths = [min(_round_up(smallest, 64), top)]
    while widths[-1] < top:
        widths.append(min(top, _round_up(int(widths[-1] * growth) + 1, 64)))
    return widths


def pack_static(batch: list[Encoded], pad_id: int, widths: list[int]) -> dict[str, torch.Tensor]:
    """The batch packed into one row as wide as the first of `widths` that holds it."""
    total = sum(len(e.input_ids) for e in batch)
    width = next((w for w in widths if w >= total), None)
    if width is None:
        raise ValueError(f"a batch of {total} tokens is wider than the widest static row ({widths[-1]})")
    return pack(batch, pad_id, row_length=width, width=width)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def loss_positions(labels: torch.Tensor, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions (rows × width) whose next token is a label, and those labels; with `slots`,
    padded to exactly that many (position 0, label IGNORE_INDEX), so the shape is the same every batch."""
    following = labels[:, 1:]
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    positions, targets = rows * labels.shape[1] + cols, following[rows, cols]
    if slots is not None:
        if len(targets) > slots:
            raise ValueError(f"{len(targets)} label tokens in a batch with {slots} loss slots")
        extra = slots - len(targets)
        positions = torch.cat([positions, positions.new_zeros(extra)])
        targets = torch.cat([targets, targets.new_full((extra,), IGNORE_INDEX)])
    return positions, targets


def with_stats(collate: Callable[[list[Encoded]], dict[str, torch.Tensor]], batch: list[Encoded],
               label_slots: int | None = None) -> dict[str, Any]:
    """`collate(batch)` plus its loss positions (`label_slots` of them, if given) and its `BatchStats`."""
    out: dict[str, Any] = collate(batch)
    out[LOSS_POSITIONS], out[LOSS_TARGETS] = loss_positions(out["labels"], label_slots)
    out[STATS_KEY] = BatchStats(len(batch), sum(len(e.input_ids) for e in batch), out["input_ids"].numel())
    return out


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes: the batch without its statistics and loss positions, and no KV cache
    (with a cache, transformers does not look for packed rows and would let packed examples attend to each
    other)."""
    return {k: v for k, v in batch.items() if k not in (STATS_KEY, LOSS_POSITIONS, LOSS_TARGETS)} | {"use_cache": False}


def num_examples(batch: dict[str, Any]) -> int:
    """Examples in a batch: a packed row holds several."""
    stats = batch.get(STATS_KEY)
    return stats.examples if stats is not None else batch["input_ids"].shape[0]
