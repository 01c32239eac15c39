"""torch internals: Dynamo's counters, configuration, dynamic marks and exceptions; foreach copies; version counters;
oneDNN's bf16 probe. Checked on torch 2.11 and 2.13."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor


def dynamo_counters() -> Any:
    """Dynamo's process-wide event counters (`counters["graph_break"]`, `counters["inductor"]["cudagraph_skips"]`),
    what a compiled run reports; `torch._dynamo.utils.counters`."""
    from torch._dynamo.utils import counters

    return counters


def mark_dynamic(t: Tensor, dim: int) -> None:
    """Compile `t`'s dimension `dim` as a symbolic size if it varies (`torch._dynamo.maybe_mark_dynamic`)."""
    torch._dynamo.maybe_mark_dynamic(t, dim)


def dynamo_error() -> type[Exception]:
    """The base class of Dynamo's errors, `torch._dynamo.exc.TorchDynamoException`."""
    return torch._dynamo.exc.TorchDynamoException


def skip_side_effects_in_checkpoint_recompute() -> AbstractContextManager:
    """Dynamo's `skip_fwd_side_effects_in_bwd_under_checkpoint` switched on, where this torch has it: the
    recomputation of a checkpointed compiled region leaves out forward side effects (a ContextVar set and reset)."""
    config = torch._dynamo.config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return nullcontext()
    return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def foreach_copy(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """`dst[i].copy_(src[i])` for all i in as few kernels as torch can (`torch._foreach_copy_`)."""
    torch._foreach_copy_(list(dst), list(src))


def version(t: Tensor) -> int:
    """`t`'s version counter, bumped by every in-place write through autograd-visible ops (`Tensor._version`)."""
    return t._version


def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN computes bf16 matmuls natively on this CPU (`torch.ops.mkldnn._is_mkldnn_bf16_supported`);
    false for a build without oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def dynamo_static_input(t: Any) -> bool:
    """Whether Dynamo was told that `t` stays at one address from call to call (`torch._dynamo.mark_static_address`
    sets `_dynamo_static_input_type`; transformers marks its static KV cache so)."""
    return hasattr(t, "_dynamo_static_input_type")
