"""The adapter-step protocol: the points of a training or decoding step at which an adapter with state of its own
(finlora's DoRA: per-layer norm caches) must act. The generic step code (`finlora.capture`, `finlora.module`,
`finlora.evaluate`) calls these points; an adapter registers an `AdapterSteps` for them, so that the step code
imports no adapter. With nothing registered every point does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

from torch import nn


class AdapterSteps:
    """What an adapter does at each point of a step; each default does nothing. Each method receives the whole
    model and acts only on the layers of its own adapter (none: nothing to do)."""

    def before_recording(self, model: nn.Module) -> None:
        """Before a step is recorded as a CUDA graph: drop cached state, so that the recorded step computes it again
        at every replay from the parameters as they are."""

    def compiled_step(self, model: nn.Module, in_place: bool) -> Callable[[], AbstractContextManager]:
        """Prepared once for a compiled training step; returns the context each of its calls runs in (a fresh one a
        call). `in_place`: state refreshed where the last refresh left it (torch.compile's CUDA graphs)."""
        return nullcontext

    def before_decode_compile(self, model: nn.Module) -> None:
        """Before a decode step is compiled: compute, eagerly, what the compiled code reads but must not build."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """After every optimizer step: the parameters changed, perhaps without bumping their version counters."""


_registered: dict[str, AdapterSteps] = {}


def register(name: str, steps: AdapterSteps) -> None:
    """Register `steps` under `name` (again: replaced)."""
    _registered[name] = steps


def before_recording(model: nn.Module) -> None:
    for steps in _registered.values():
        steps.before_recording(model)


def compiled_step(model: nn.Module, in_place: bool = False) -> Callable[[], AbstractContextManager]:
    """One context factory that enters every registered adapter's context, in registration order."""
    factories = [steps.compiled_step(model, in_place) for steps in _registered.values()]

    @contextmanager
    def entered() -> Iterator[None]:
        with ExitStack() as stack:
            for factory in factories:
                stack.enter_context(factory())
            yield

    return entered


def before_decode_compile(model: nn.Module) -> None:
    for steps in _registered.values():
        steps.before_decode_compile(model)


def after_optimizer_step(model: nn.Module) -> None:
    for steps in _registered.values():
        steps.after_optimizer_step(model)
