"""Steps recorded as CUDA graphs and replayed: the training step's forward and backward (`trainer.capture`,
`CapturedLoss`) and generation's decode step (`eval.decode_compile=recorded`, `recorded_backend`).

A step bound by the host (Python launching many small kernels) replays as one launch for the forward and one for
the backward, whatever kernels they hold (the model's own, or inductor's with `trainer.compile=inductor`). Each batch
shape is recorded once, after two warm-up passes that leave the gradients alone, and the backward leaves every
gradient where the parameter's `.grad` already is, so the host does nothing per trained tensor. The optimizer's
update replays from graphs of its own (`update.RecordedAdamW`).

The decode step is traced by Dynamo (transformers compiles it on a static KV cache) and handed to
`recorded_backend`, which runs the traced graph as it is twice and then records it: no AOTAutograd, no Inductor,
and unlike Dynamo's own `cudagraphs` backend, the inputs that stay where they are (the weights, the KV cache) are
read in place at each replay instead of copied into the graph's memory.

All shapes of the training step record into one memory pool: a step's forward and backward replay before the next
step's, and what outlives a step (the loss, the gradients) is read before the next replay, so shapes may reuse each
other's memory. Adapters with cached state drop it before recording (`adapter_steps.before_recording`), so the
recorded step computes it at every replay.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from finlora import adapter_steps
from finlora.compat.torch import dynamo_static_input, foreach_copy

log = logging.getLogger(__name__)


class CapturedLoss:
    """`loss(batch)` replayed from CUDA graphs recorded at the first batch of each shape. If recording fails (an
    operation that waits for the host, such as bitsandbytes' int8 matmul), one line says why and every later
    step runs `loss` as it is. `failure` holds that reason; `shapes` counts the recorded shapes.

    In one process the recorded backward leaves every trained parameter's gradient in a buffer of its own (`grads`,
    the same for every shape), which stays the parameter's `.grad`: the replayed step is one autograd node, and the
    host's only per-parameter work is to check that each `.grad` is still its buffer (`keeps_gradients`: nothing
    need zero them, each replay writes them anew; a parameter the loss does not reach gets zeros, not None). Under
    DDP, whose reducer starts on each gradient's arrival, `torch.cuda.make_graphed_callables` hands them to autograd
    one by one as usual."""

    def __init__(self, model: nn.Module, loss: Callable[[dict[str, Tensor]], Tensor]) -> None:
        self.model, self.loss = model, loss
        self.graphed: dict[tuple, Callable[..., Tensor]] = {}
        self.trained: tuple[Tensor, ...] = ()  # the parameters it trains, as the model has them when it first records
        self.grads: tuple[Tensor, ...] = ()  # one process: where every replayed backward leaves their gradients
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

    @property
    def keeps_gradients(self) -> bool:
        """The trained parameters' `.grad` are `grads`, written anew by every replay: zeroing them is wasted."""
        return bool(self.grads) and self.failure is None

    def _record(self, batch: dict[str, Tensor]) -> Callable[..., Tensor]:
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        self.trained = self.trained or tuple(p for p in self.model.parameters() if p.requires_grad)
        step = _Step(self.model, self.loss, tuple(batch))
        sample = tuple(t.clone() for t in batch.values())  # the graph's own copy (each replay copies a batch in)
        # autocast's weight-cast cache would hold casts made outside the graph: the recording must make its own
        mixed = torch.is_autocast_enabled("cuda")
        casts = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if mixed
                 else nullcontext())
        rng = torch.cuda.default_generators[torch.cuda.current_device()]
        eager_rng = rng.clone_state()
        with casts:
            _warm_up(step, sample + self.trained)
        try:
            with casts, recording():
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    graphed = torch.cuda.make_graphed_callables(step, sample + self.trained, num_warmup_iters=0,
                                                                pool=self.pool, allow_unused_input=True)
                    return lambda *tensors: graphed(*tensors, *self.trained)
                return self._record_graphs(step, sample)
        except RuntimeError:
            rng.graphsafe_set_state(eager_rng)  # a failed recording leaves the generator recording: dropout would fail
            raise

    def _record_graphs(self, step: _Step, sample: tuple[Tensor, ...]) -> Callable[..., Tensor]:
        """The forward's graph, and the backward's, which ends by copying every gradient into `grads`."""
        if not self.grads:
            self.grads = tuple(torch.zeros_like(p) for p in self.trained)
        recorded = _StepGraphs(sample, self.trained, self.grads)
        with torch.cuda.graph(recorded.forward, pool=self.pool):
            recorded.loss = step(*sample)
        recorded.grad_loss = torch.empty_like(recorded.loss)
        with torch.cuda.graph(recorded.backward, pool=self.pool):
            got = torch.autograd.grad(recorded.loss, self.trained, recorded.grad_loss, allow_unused=True)
            reached = [(buffer, grad) for buffer, grad in zip(self.grads, got, strict=True) if grad is not None]
            foreach_copy([buffer for buffer, _ in reached], [grad for _, grad in reached])
        anchor = torch.zeros((), device=recorded.loss.device, requires_grad=True)
        return lambda *tensors: _Replay.apply(anchor, recorded, *tensors)


class _StepGraphs:
    """One batch shape's recorded forward and backward, what they read (`inputs`, `grad_loss`) and write (`loss`;
    the gradients, into `grads`)."""

    def __init__(self, inputs: tuple[Tensor, ...], trained: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> None:
        self.inputs, self.trained, self.grads = inputs, trained, grads
        self.forward, self.backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.loss: Tensor | None = None
        self.grad_loss: Tensor | None = None


class _Replay(torch.autograd.Function):
    """The replayed step as one autograd node: forward replays the forward's graph on the batch copied in; backward
    replays the backward's, which leaves the gradients in the recording's buffers, and makes each parameter's `.grad`
    its buffer again where something (`zero_grad`) has let it go. `anchor`: an input that asks for a gradient, so
    that autograd calls the backward at all."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, recorded: _StepGraphs, *batch: Tensor) -> Tensor:
        for own, tensor in zip(recorded.inputs, batch, strict=True):
            if own.data_ptr() != tensor.data_ptr():
                own.copy_(tensor)
        recorded.forward.replay()
        ctx.recorded = recorded
        return recorded.loss.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        recorded: _StepGraphs = ctx.recorded
        recorded.grad_loss.copy_(grad)
        recorded.backward.replay()
        for param, buffer in zip(recorded.trained, recorded.grads, strict=True):
            if param.grad is not buffer:
                param.grad = buffer
        return (None,) * (2 + len(recorded.inputs))


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
    """The loss over positional tensors: the batch's tensors, then (as `make_graphed_callables` takes them) the
    trained parameters, which get their gradients from the recorded backward. Not the model as a module: its frozen
    weights would be inputs too, read in place all the same but handled one by one on the host at every replay."""

    def __init__(self, model: nn.Module, loss: Callable[[dict[str, Tensor]], Tensor], names: tuple[str, ...]) -> None:
        self.model, self.names = model, names
        self.loss = loss

    def __call__(self, *tensors: Tensor) -> Tensor:
        """Called by the warm-up and the recording only. Each starts with the adapters' cached state dropped
        (`adapter_steps.before_recording`), so the recorded forward computes it, and compiled code meets at the
        recording what it was compiled for (it would compile again, mid-recording, for state that changed)."""
        adapter_steps.before_recording(self.model)
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
        kept = {i for i, a in enumerate(args) if isinstance(a, nn.Parameter) or dynamo_static_input(a)}
        own = [a if i in kept else a.clone() for i, a in enumerate(args)]
        self.inputs = [None if i in kept else t for i, t in enumerate(own)]
        self.kept = [(i, args[i].data_ptr()) for i in sorted(kept)]
        self.copied = [i for i in range(len(args)) if i not in kept]
        self.graph = torch.cuda.CUDAGraph()
        with recording(), torch.cuda.graph(self.graph):
            self.outputs = self.gm(*own)
