"""What finlora's DoRA keeps per layer, typed: the frozen row norms of the base weight, each adapter's constants (its
norm and what the forward derives from it) or, for a layer that computes its norm in its forward, its A·Aᵀ alone;
the group of layers refreshed together, with its count of optimizer steps; and the one switch compiled code reads.

A cached value is valid while its key holds: the group and its optimizer-step count (bumped through
`finlora.adapter_steps.after_optimizer_step`, for optimizers that write parameters without bumping their version
counters, as torch's fused AdamW, a replayed CUDA graph and bitsandbytes' optimizers do), the parameters' identities,
addresses and version counters, and the scaling.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from finlora.compat.torch import version

_ATTR = "_finlora_dora_state"  # where a layer keeps its `LayerState`, in its instance __dict__


@dataclass(eq=False)
class Group:
    """The layers switched by one `use_fast_dora` call: their constants are refreshed together, batched over
    layers of one shape. `steps`: optimizer steps taken since, part of every key of its layers."""

    members: list[tuple[nn.Module, str]]
    ids: set[tuple[int, str]] = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.ids = {(id(m), a) for m, a in self.members}
        _live_groups.add(self)

    def __setstate__(self, state: dict) -> None:  # a copied model's group (copy.deepcopy) counts steps too
        self.__dict__.update(state)
        _live_groups.add(self)


_live_groups: weakref.WeakSet[Group] = weakref.WeakSet()


def count_optimizer_step() -> None:
    """After an optimizer step: every live group's cached constants become stale (a spare refresh of another
    model's layers costs a refresh; a missed one would cost a stale norm)."""
    for group in list(_live_groups):
        group.steps += 1


@dataclass(eq=False)
class Frozen:
    """‖w_i‖² of the base weight, float32: frozen, so computed again only when the weight is another one."""

    key: tuple
    sqnorm: Tensor


@dataclass(eq=False)
class Constants:
    """An adapter's DoRA constants: they depend on parameters only, so they hold until the next step."""

    key: tuple
    norm: Tensor  # ‖W0 + s·B·A‖ per output row, float32
    scale: Tensor  # m / norm, float32
    sb: Tensor  # s·B, float32
    derived: dict[torch.dtype, tuple[Tensor, Tensor]]  # dtype -> (s·scale ⊙ B, s·B) in that dtype


@dataclass(eq=False)
class Gram:
    """A·Aᵀ (r × r, float32) of an adapter whose layer computes the rest of its norm in its forward."""

    key: tuple
    gram: Tensor


@dataclass(eq=False)
class LayerState:
    """Everything finlora's DoRA keeps on one LoRA layer."""

    group: Group | None = None
    frozen: Frozen | None = None
    constants: dict[str, Constants] = field(default_factory=dict)  # adapter -> its constants
    grams: dict[str, Gram] = field(default_factory=dict)  # adapter -> its A·Aᵀ
    kept: dict[tuple, tuple[Tensor, ...]] = field(default_factory=dict)  # in-place refreshes' tensors (`_kept`)

    def forget(self) -> None:
        """Drop the adapters' constants and A·Aᵀ, keeping the frozen ‖w_i‖²."""
        self.constants.clear()
        self.grams.clear()


def state_of(module: nn.Module) -> LayerState | None:
    """The layer's state; None for a layer finlora's DoRA has not touched."""
    return module.__dict__.get(_ATTR)


def ensure_state(module: nn.Module) -> LayerState:
    """The layer's state, made empty if it has none."""
    st = module.__dict__.get(_ATTR)
    if st is None:
        st = module.__dict__[_ATTR] = LayerState()
    return st


def drop_state(module: nn.Module) -> None:
    """Forget everything cached on the layer, the frozen ‖w_i‖² included (the group stays)."""
    st = module.__dict__.get(_ATTR)
    if st is not None:
        st.forget()
        st.frozen = None


def tensor_key(t: Tensor) -> tuple[int, int, int]:
    """What changes when a tensor's values may have changed, short of reading them (a new dtype or device means
    new storage)."""
    return (id(t), t.data_ptr(), version(t))


def key(st: LayerState, base: nn.Module, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scaling: float) -> tuple:
    """The key an adapter's constants hold under: its group and the group's step count, then its tensors' states
    and its scaling."""
    group = st.group
    return (group, group.steps if group is not None else 0, tensor_key(lora_a), tensor_key(lora_b),
            tensor_key(magnitude), scaling, tensor_key(base.weight))


# The one switch compiled code reads, and Dynamo guards on: True inside `fresh_norms`' context, where compiled
# layers read the constants refreshed on entry, False elsewhere (a decode step rebuilds its norm in its graph). A graph
# traced with it on and one traced with it off are separate graphs.
compiled_reads_norms = False


def set_compiled_reads_norms(on: bool) -> None:
    global compiled_reads_norms
    compiled_reads_norms = on



def held_state(module: nn.Module) -> LayerState:
    """The state of a layer that has one: a plain subscript, what compiled code traces."""
    return module.__dict__[_ATTR]
