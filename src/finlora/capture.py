"""The training step's forward and backward recorded as CUDA graphs and replayed (`trainer.capture`).

On a GPU the steps of a small model, or of a large one on short examples, are bound by the host: Python
launches thousands of small kernels a step, and torch.compile's own CUDA graphs (`trainer.compile=cudagraphs`)
still spend milliseconds a step in their per-tensor bookkeeping. Here `torch.cuda.make_graphed_callables`
records the loss's forward and its backward once per batch shape (static batches have a few), after two
warm-up passes that leave the gradients alone, and each step replays them: one launch for the forward, one
for the backward, whatever kernels they hold (the model's own, or inductor's with `trainer.compile=inductor`).
Without `trainer.compile` nothing is compiled, so recording costs a few eager passes (seconds). The optimizer
step stays outside the graphs (fused AdamW: a few launches).

All shapes record into one memory pool: a step's forward and backward replay before the next step's, and
what outlives a step (the loss, the gradients) is read before the next replay, so shapes may reuse each
other's memory. finlora's DoRA recomputes its norms inside the graph (`dora.forget_norms`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from finlora.dora import forget_norms

log = logging.getLogger(__name__)


class CapturedLoss:
    """`loss(batch)` replayed from CUDA graphs recorded at the first batch of each shape. If recording fails (an
    operation that waits for the host, such as bitsandbytes' int8 matmul), one line says why and every later
    step runs `loss` as it is. `failure` holds that reason; `shapes` counts the recorded shapes."""

    def __init__(self, model: nn.Module, loss: Callable[[dict[str, Tensor]], Tensor]) -> None:
        self.model, self.loss = model, loss
        self.graphed: dict[tuple, Callable[..., Tensor]] = {}
        self.pool: tuple[int, int] | None = None
        self.failure: str | None = None

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        if self.failure:
            return self.loss(batch)
        key = tuple((name, t.shape, t.dtype) for name, t in batch.items())
        graphed = self.graphed.get(key)
        if graphed is None:
            try:
                graphed = self.graphed[key] = self._record(batch)
            except RuntimeError as err:
                self.failure = str(err).strip().splitlines()[0][:200]
                log.warning("trainer.capture: the step could not be recorded as a CUDA graph (%s); running it "
                            "unrecorded", self.failure)
                return self.loss(batch)
        return graphed(*batch.values())

    @property
    def shapes(self) -> int:
        return len(self.graphed)

    def _record(self, batch: dict[str, Tensor]) -> Callable[..., Tensor]:
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        step = _Step(self.model, self.loss, tuple(batch))
        sample = tuple(t.clone() for t in batch.values())  # the graph's own inputs: each replay copies a batch in
        # autocast's weight-cast cache would hold casts made outside the graph: the recording must make its own
        mixed = torch.is_autocast_enabled("cuda")
        casts = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if mixed
                 else nullcontext())
        rng = torch.cuda.default_generators[torch.cuda.current_device()]
        eager_rng = rng.clone_state()
        with casts:
            _warm_up(step, sample)
        collecting = gc.isenabled()
        gc.collect()  # an earlier run's graphs, freed by a collection mid-recording, would spoil it (CUDA forbids that)
        gc.disable()
        try:
            with casts:
                return torch.cuda.make_graphed_callables(step, sample, num_warmup_iters=0, pool=self.pool,
                                                         allow_unused_input=True)
        except RuntimeError:
            rng.graphsafe_set_state(eager_rng)  # a failed recording leaves the generator recording: dropout would fail
            raise
        finally:
            if collecting:
                gc.enable()


def _warm_up(step: nn.Module, sample: tuple[Tensor, ...], passes: int = 2) -> None:
    """Forward and backward passes that change no gradient, as `make_graphed_callables` would make them, on a side
    stream: whatever is made once (compiled kernels, cuBLAS workspaces) is made here, with the garbage collector
    on, and the recording that follows, with it off, only records."""
    trained = [p for p in step.parameters() if p.requires_grad]
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(passes):
            loss = step(*sample)
            torch.autograd.grad(loss, trained, allow_unused=True)
    torch.cuda.synchronize()


class _Step(nn.Module):
    """The loss over positional tensors, as `make_graphed_callables` takes it: a module, whose parameters (the
    model's) are the graph's other inputs and get their gradients from the recorded backward."""

    def __init__(self, model: nn.Module, loss: Callable[[dict[str, Tensor]], Tensor], names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names
        self.loss = loss

    def forward(self, *tensors: Tensor) -> Tensor:
        """Called by the warm-up and the recording only. Each starts from the same DoRA cache, with no norms in it,
        so the recorded forward computes them, and compiled code meets at the recording what it was compiled for
        (it would compile again, mid-recording, for a cache that changed)."""
        forget_norms(self.model)
        return self.loss(dict(zip(self.names, tensors, strict=True)))
