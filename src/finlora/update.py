"""The optimizer update of a training step recorded as a CUDA graph (`trainer.capture`): the gradients' norm, their
clipping and the non-finite verdict (`nonfinite.measure_gradients`, the same as the eager step's), then fused AdamW's
step, replayed in a few launches whatever the number of trained tensors, so the host does no per-tensor work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from finlora.capture import recording
from finlora.nonfinite import flag_step, measure_gradients

log = logging.getLogger(__name__)
__all__ = ["RecordedAdamW", "measure_gradients"]


class RecordedAdamW(torch.optim.AdamW):
    """Fused AdamW whose `step` measures the gradients itself (`measure_gradients`, clipping by `clip`), hands the
    verdict to the fused kernel (`flag_step`) and, on CUDA, replays all of that from a CUDA graph.
    `callbacks.NonFiniteGuard` reads `measured` after the step: the last update's loss, norm and verdict, on the
    device (overwritten by the next update).

    A graph reads the gradients where they were when it was recorded, so there is one per set of gradient
    addresses: the recorded backward of each batch shape (`trainer.capture`) leaves its gradients in memory of
    its own, under DDP they are views of its buckets. The schedule's learning rate and the step's loss are copied
    into the graph's own before each replay. The first step, which makes the moments, runs as it is (and records
    the graph of its gradients); so does every step after a failed recording, or once `max_graphs` are recorded
    (either said in one line)."""

    def __init__(self, params: Iterable[Any], clip: float = 0.0, max_graphs: int = 32, **kwargs: Any) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.clip, self.max_graphs = clip, max_graphs
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.failure: str | None = None
        self.measured: tuple[Tensor, Tensor, Tensor] | None = None
        self.loss: Tensor | None = None  # the graphs' copy of the step's loss
        self.lrs: list[Tensor] = []  # the graphs' learning rates, one per parameter group
        self.found: Tensor | None = None  # the graphs' verdict, as the fused kernel takes it

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if loss is None or not params:
            return loss
        with torch.no_grad():
            if not self.state:  # the first step makes the moments, as it is; its shape's graph is recorded in it too,
                self._eager(params, loss)  # at the step that records the shape's forward and backward
                self._graph(params)
                return loss
            graph = self._graph(params)
            if graph is None:
                self._eager(params, loss)
                return loss
            replay, norm, bad = graph
            self.measured = (self.loss, norm, bad)
            self.loss.copy_(loss)
            for lr, group in zip(self.lrs, self.param_groups, strict=True):
                lr.fill_(group["lr"])
            replay.replay()
        return loss

    def _eager(self, params: list[Tensor], loss: Tensor) -> None:
        norm, bad = measure_gradients(params, loss.detach(), self.clip)
        self.measured = (loss.detach(), norm, bad)
        flag_step(self, bad)
        super().step()

    def _graph(self, params: list[Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor] | None:
        """The graph for these gradients' addresses, recorded if new; None where the step runs as it is."""
        if self.failure or not params[0].is_cuda:
            return None
        key = tuple(p.grad.data_ptr() for p in params)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                self._fail(f"{self.max_graphs} recorded already: the gradients keep moving, as they do when the "
                           "backward runs unrecorded")
                return None
            try:
                graph = self.graphs[key] = self._record(params)
            except RuntimeError as err:
                self._fail(str(err).strip().splitlines()[0][:200])
                return None
        return graph

    def _fail(self, why: str) -> None:
        self.failure = why
        log.warning("trainer.capture: the optimizer's update could not be recorded as a CUDA graph (%s); running it "
                    "unrecorded", why)

    def _record(self, params: list[Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        """Records without running: the step that records replays the graph, or has already run the update."""
        if self.loss is None:
            device = params[0].device
            self.loss, self.found = torch.zeros((), device=device), torch.zeros((), device=device)
            self.lrs = [torch.tensor(float(group["lr"]), device=device) for group in self.param_groups]
        graph = torch.cuda.CUDAGraph()
        with self._capturable(), recording(), torch.cuda.graph(graph):
            norm, bad = measure_gradients(params, self.loss, self.clip)
            flag_step(self, bad, self.found)
            super().step()
        return graph, norm, bad

    @contextmanager
    def _capturable(self) -> Iterator[None]:
        """While a graph records: each group's learning rate is the graph's tensor (a float would be recorded as
        a constant), and the group capturable, as torch requires of a step under capture; then as they were (the
        schedule sets floats, and checkpoints keep them)."""
        kept = [(group["lr"], group["capturable"]) for group in self.param_groups]
        for group, lr in zip(self.param_groups, self.lrs, strict=True):
            group["lr"], group["capturable"] = lr, True
        try:
            yield
        finally:
            for group, (lr, capturable) in zip(self.param_groups, kept, strict=True):
                group["lr"], group["capturable"] = lr, capturable
