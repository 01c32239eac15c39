"""The training loader's order: an uninterrupted epoch is the plain DataLoader's, batch for batch (the same draws
from the shuffle generator, so runs keep their adapters), and a resume after any batch of an epoch, its last
included, gives the uninterrupted sequence of batches from there on, for later epochs too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from finlora.compat.torch import SkippingDataLoader
from finlora.data import LengthGroupedSampler, ResumableLoader

N, BATCH, SEED, EPOCHS = 23, 4, 7, 3  # 6 batches an epoch, the last one short


def make(cls: type[DataLoader], grouped: bool) -> DataLoader:
    """A loader as `TaskDataModule` builds one: shuffled by a seeded generator, or by the grouped sampler."""
    sampler = LengthGroupedSampler([(i * 37) % 11 for i in range(N)], BATCH, SEED) if grouped else None
    generator = None if grouped else torch.Generator().manual_seed(SEED)
    return cls(list(range(N)), batch_size=BATCH, shuffle=not grouped, sampler=sampler, generator=generator,
               collate_fn=list)


def epochs(loader: DataLoader, start: int = 0, stop: int = EPOCHS, state: dict | None = None) -> list[list[list[int]]]:
    """The batches of epochs `start`…`stop - 1` as Lightning iterates them: the sampler's epoch set, the state
    loaded first."""
    out = []
    for epoch in range(start, stop):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if state is not None and epoch == start:
            loader.load_state_dict(state)
        out.append(list(loader))
    return out


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped"])
def test_uninterrupted_epochs_are_the_plain_dataloaders(grouped):
    assert epochs(make(ResumableLoader, grouped)) == epochs(make(DataLoader, grouped))


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("stop", range(7))
def test_resume_after_any_batch_gives_the_uninterrupted_sequence(grouped, stop):
    uninterrupted = epochs(make(ResumableLoader, grouped))
    loader = make(ResumableLoader, grouped)
    first = epochs(loader, 0, 1)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(stop)]
    state = copy.deepcopy(loader.state_dict())
    resumed = make(ResumableLoader, grouped)
    if stop == len(uninterrupted[1]):  # the epoch is over: Lightning resumes in the next one
        assert state["batches"] == 0
        assert first + [head] + epochs(resumed, 2, state=state) == uninterrupted
    else:
        rest = epochs(resumed, 1, state=state)
        assert first + [head + rest[0]] + rest[1:] == uninterrupted


def test_skipped_batches_are_never_loaded():
    """`compat.torch.SkippingDataLoader` relies on `DataLoader._index_sampler` being what a new iterator draws its
    batches of indices from; if a torch release changes that, this fails."""
    loaded = []

    class Recording(list):
        def __getitem__(self, i):
            loaded.append(i)
            return super().__getitem__(i)

    loader = SkippingDataLoader(Recording(range(10)), batch_size=3, collate_fn=list)
    assert isinstance(getattr(DataLoader, "_index_sampler", None), property), (
        "torch's DataLoader no longer has the `_index_sampler` property that finlora.compat.torch.SkippingDataLoader "
        "overrides to resume mid-epoch; rework SkippingDataLoader for this torch release")
    assert list(loader.iter_skipping(2)) == [[6, 7, 8], [9]], (
        "finlora.compat.torch.SkippingDataLoader.iter_skipping did not skip: torch's DataLoader no longer reads "
        "`_index_sampler` when it makes an iterator")
    assert loaded == [6, 7, 8, 9]
    assert list(loader) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and len(loader) == 4
