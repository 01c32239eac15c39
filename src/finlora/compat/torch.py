"""torch internals: Dynamo's event counters, and the DataLoader's index sampler. Checked on torch 2.11 and 2.13."""

from __future__ import annotations

from typing import Any

import torch


def dynamo_counters() -> Any:
    """Dynamo's process-wide event counters (`counters["graph_break"]`, `counters["inductor"]["cudagraph_skips"]`),
    what a compiled run reports; `torch._dynamo.utils.counters`."""
    from torch._dynamo.utils import counters

    return counters


class SkippingDataLoader(torch.utils.data.DataLoader):  # torch imports torch.utils.data itself
    """A DataLoader that can start an epoch some batches in (`iter_skipping`): the batches skipped are drawn as
    indices, never loaded or collated, so a resumed epoch costs nothing for the part already trained on. It overrides
    `DataLoader._index_sampler`, the sampler (or batch sampler) that a new iterator reads once, when it is made. A
    public route (a batch sampler of our own) would change what Lightning sees and replaces under DDP."""

    skipped_batches = 0  # the batches `iter_skipping` leaves out of the iterator it is making; 0 otherwise

    def iter_skipping(self, batches: int) -> Any:
        """`DataLoader.__iter__` of this epoch less its first `batches` batches."""
        self.skipped_batches = batches
        try:
            return torch.utils.data.DataLoader.__iter__(self)
        finally:
            self.skipped_batches = 0

    @property
    def _index_sampler(self) -> Any:
        import itertools

        sampler = super()._index_sampler
        return itertools.islice(sampler, self.skipped_batches, None) if self.skipped_batches else sampler
