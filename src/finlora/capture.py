"""Steps recorded as CUDA graphs and replayed: the training step's forward and backward (`trainer.capture`,
`CapturedLoss`) and generation's decode step (`eval.decode_compile=recorded`, `recorded_backend`).

On a GPU the steps of a small model, or of a large one on short examples, are bound by the host: Python
launches thousands of small kernels a step, and torch.compile's own CUDA graphs (`trainer.compile=cudagraphs`)
still spend milliseconds a step in their per-tensor bookkeeping. Here `torch.cuda.make_graphed_callables`
records the loss's forward and its backward once per batch shape (static batches have a few), after two
warm-up passes that leave the gradients alone, and each step replays them: one launch for the forward, one
for the backward, whatever kernels they hold (the model's own, or inductor's with `trainer.compile=inductor`).
Without `trainer.compile` nothing is compiled, so recording costs a few eager passes (seconds). The optimizer's
update replays from graphs of its own (`update.RecordedAdamW`).

The decode step is traced by Dynamo (transformers compiles it on a static KV cache) and handed to
`recorded_backend`, which runs the traced graph as it is twice and then records it: no AOTAutograd, no
Inductor, and unlike Dynamo's own `cudagraphs` backend, the inputs that stay where they are (the weights, the
KV cache) are read in place at each replay instead of copied into the graph's memory.

All shapes of the training step record into one memory pool: a step's forward and backward replay before the
next step's, and what outlives a step (the loss, the gradients) is read before the next replay, so shapes may
reuse each other's memory. finlora's DoRA recomputes its norms inside the graph (`dora.forget_norms`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

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
        self.trained: tuple[Tensor, ...] = ()  # the parameters it trains, as the model has them when it first records
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
        return graphed(*batch.values(), *self.trained)

    @property
    def shapes(self) -> int:
        return len(self.graphed)

    def _record(self, batch: dict[str, Tensor]) -> Callable[..., Tensor]:
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        self.trained = self.trained or tuple(p for p in self.model.parameters() if p.requires_grad)
        step = _Step(self.model, self.loss, tuple(batch))
        # the graph's own copy of the batch (each replay copies a batch in), and the trained parameters themselves
        sample = tuple(t.clone() for t in batch.values()) + self.trained
        # autocast's weight-cast cache would hold casts made outside the graph: the recording must make its own
        mixed = torch.is_autocast_enabled("cuda")
        casts = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if mixed
                 else nullcontext())
        rng = torch.cuda.default_generators[torch.cuda.current_device()]
        eager_rng = rng.clone_state()
        with casts:
            _warm_up(step, sample)
        try:
            with casts, recording():
                return torch.cuda.make_graphed_callables(step, sample, num_warmup_iters=0, pool=self.pool,
                                                         allow_unused_input=True)
        except RuntimeError:
            rng.graphsafe_set_state(eager_rng)  # a failed recording leaves the generator recording: dropout would fail
            raise


@contextmanager
def recording() -> Iterator[None]:
    """The garbage collector off while a graph records: an earlier run's graphs, freed by a collection
    mid-recording, would spoil it (CUDA forbids freeing a graph while another records)."""
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _warm_up(step: _Step, sample: tuple[Tensor, ...], passes: int = 2) -> None:
    """Forward and backward passes that change no gradient, as `make_graphed_callables` would make them, on a side
    stream: whatever is made once (compiled kernels, cuBLAS workspaces) is made here, with the garbage collector
    on, and the recording that follows, with it off, only records."""
    trained = [t for t in sample if t.requires_grad]
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(passes):
            loss = step(*sample)
            torch.autograd.grad(loss, trained, allow_unused=True)
    torch.cuda.synchronize()


class _Step:
    """The loss over positional tensors, as `make_graphed_callables` takes it: the batch's tensors, then the trained
    parameters, which get their gradients from the recorded backward. Not the model as a module: its frozen
    weights would be inputs too, read in place all the same but handled one by one on the host at every replay
    (a few microseconds each, hundreds of them)."""

    def __init__(self, model: nn.Module, loss: Callable[[dict[str, Tensor]], Tensor], names: tuple[str, ...]) -> None:
        self.model, self.names = model, names
        self.loss = loss

    def __call__(self, *tensors: Tensor) -> Tensor:
        """Called by the warm-up and the recording only. Each starts from the same DoRA cache, with no norms in it,
        so the recorded forward computes them, and compiled code meets at the recording what it was compiled for
        (it would compile again, mid-recording, for a cache that changed)."""
        forget_norms(self.model)
        return self.loss(dict(zip(self.names, tensors[:len(self.names)], strict=True)))


def recorded_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """A torch.compile backend for the decode step (`eval.decode_compile=recorded`): `_Recorded` for each graph."""
    return _Recorded(gm)


class _Recorded:
    """A traced graph run as it is for its first `WARM` calls (lazily made state: cuBLAS workspaces, kernels
    loaded), then recorded as a CUDA graph and replayed. Inputs that stay at one address from call to call
    (parameters, and what Dynamo was told is static: transformers marks its static KV cache so) are read in
    place; any other input is copied into the graph's own buffer before each replay. An input kept in place
    that has moved, or other inputs than tensors, and the graph runs as it is; a failed recording too, after
    one line saying why."""

    WARM = 2

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm, self.calls = gm, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor | None] = []  # the graph's own copies of the inputs not read in place
        self.kept: list[tuple[int, int]] = []  # (index, address) of the inputs read in place
        self.copied: list[int] = []
        self.outputs: object = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.failed or self.calls <= self.WARM or not all(isinstance(a, Tensor) and a.is_cuda for a in args):
            return self.gm(*args)
        if self.graph is None or any(args[i].data_ptr() != ptr for i, ptr in self.kept):
            try:
                self._record(args)
            except RuntimeError as err:
                self.failed = True
                log.warning("eval.decode_compile=recorded: the decode step could not be recorded as a CUDA graph (%s);"
                            " running it as traced", str(err).strip().splitlines()[0][:200])
                return self.gm(*args)
        for i in self.copied:
            self.inputs[i].copy_(args[i])
        self.graph.replay()
        return self.outputs

    def _record(self, args: tuple[Tensor, ...]) -> None:
        """Only the addresses of the inputs read in place are kept, not the tensors: a KV cache that transformers
        frees and makes again for the next batch can then come back at the same address, with no new recording."""
        kept = {i for i, a in enumerate(args) if isinstance(a, nn.Parameter) or hasattr(a, "_dynamo_static_input_type")}
        own = [a if i in kept else a.clone() for i, a in enumerate(args)]
        self.inputs = [None if i in kept else t for i, t in enumerate(own)]
        self.kept = [(i, args[i].data_ptr()) for i in sorted(kept)]
        self.copied = [i for i in range(len(args)) if i not in kept]
        self.graph = torch.cuda.CUDAGraph()
        with recording(), torch.cuda.graph(self.graph):
            self.outputs = self.gm(*own)
