"""The order of a training epoch's examples: batches of similar length (`LengthGroupedSampler`), and a loader
whose place in the epoch goes into the checkpoint (`ResumableLoader`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from finlora.compat.torch import SkippingDataLoader


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


@dataclass
class EpochPosition:
    """Where a loader is in its epoch: the shuffle generator's state when the epoch began (None without a
    generator), the batches handed out since, and a state loaded for the next epoch to start from."""

    epoch_start: torch.Tensor | None = None
    yielded: int = 0
    pending: dict[str, Any] | None = None


class ResumableLoader(SkippingDataLoader):
    """A DataLoader whose place in the epoch goes into the checkpoint.

    Lightning saves and restores the state of a training loader that has `state_dict`/`load_state_dict`;
    for any other loader a mid-epoch resume starts the epoch again from its first batch, so the resumed
    run trains on other data than an uninterrupted one. The state is the shuffle generator's state when
    the epoch began and the number of batches handed out since: on resume the epoch's order is drawn again
    from that state and the batches already trained on are skipped as indices, never loaded or collated.
    Samplers that seed themselves from `set_epoch` (Lightning sets the epoch before each) need nothing more.
    An uninterrupted epoch is the plain DataLoader's, batch for batch, with the same draws from the generator.
    torchdata's StatefulDataLoader (0.11) was not taken: it draws its shuffle order before the DataLoader's
    base seed, so its epochs differ from the plain DataLoader's, and after a resume it leaves the generator
    elsewhere than an uninterrupted run does, so the epochs that follow differ too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = EpochPosition()

    def state_dict(self) -> dict[str, Any]:
        if self.position.yielded >= len(self):  # the epoch is over: the next one draws from the generator as it is
            return {"generator": self.generator_state(), "batches": 0}
        return {"generator": self.position.epoch_start, "batches": self.position.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.pending = state

    def __iter__(self) -> Iterator[Any]:
        state, self.position.pending = self.position.pending, None
        if state is not None and state["generator"] is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        self.position.epoch_start = self.generator_state()
        self.position.yielded = state["batches"] if state else 0
        return _counted(self.iter_skipping(self.position.yielded), self.position)

    def generator_state(self) -> torch.Tensor | None:
        """The shuffle generator's state now; None for a loader without one (in order, or a seeded sampler)."""
        return self.generator.get_state() if self.generator is not None else None


def _counted(iterator: Iterator[Any], position: EpochPosition) -> Iterator[Any]:
    for batch in iterator:
        position.yielded += 1
        yield batch
