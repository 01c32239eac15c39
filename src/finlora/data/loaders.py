"""The order of a training epoch's examples: batches of similar length (`LengthGroupedSampler`), and a loader
whose place in the epoch goes into the checkpoint (`ResumableLoader`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


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


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch goes into the checkpoint.

    Lightning saves and restores the state of a training loader that has `state_dict`/`load_state_dict`;
    for any other loader a mid-epoch resume starts the epoch again from its first batch, so the resumed
    run trains on other data than an uninterrupted one. The state is the shuffle generator's state when
    the epoch began and the number of batches handed out since: on resume the epoch's order is drawn again
    from that state and the batches already trained on are skipped as indices, never loaded or collated.
    Samplers that seed themselves from `set_epoch` (Lightning sets the epoch before each) need nothing more.
    torchdata's StatefulDataLoader does the same and more (worker states), but for in-memory datasets
    this is all that is needed, and it keeps a dependency and its torch-version coupling out.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_start: torch.Tensor | None = None
        self._yielded = 0
        self._skip = 0
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self._yielded >= len(self):  # the epoch is over: the next one draws from the generator as it is now
            return {"generator": self._generator_state(), "batches": 0}
        return {"generator": self._epoch_start, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def __iter__(self) -> Iterator[Any]:
        state, self._pending = self._pending, None
        if state is not None and state["generator"] is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        self._epoch_start = self._generator_state()
        self._skip = self._yielded = state["batches"] if state else 0
        iterator = super().__iter__()  # takes `_index_sampler`, with the skip, right now
        self._skip = 0
        return self._counted(iterator)

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return itertools.islice(sampler, self._skip, None) if self._skip else sampler

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch

    def _generator_state(self) -> torch.Tensor | None:
        return self.generator.get_state() if self.generator is not None else None
