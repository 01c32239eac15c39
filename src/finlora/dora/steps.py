"""Switching a model's DoRA layers to finlora's (`use_fast_dora`), and what they need at each point of a step,
registered with `finlora.adapter_steps` (`DoraSteps`) so that the generic step code names no adapter: the cache
emptied before a CUDA graph is recorded, the constants refreshed eagerly before a compiled training step, the frozen
row norms computed before a decode step is compiled, and the step count bumped after every optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

import finlora.dora.state as dora_state
from finlora import adapter_steps
from finlora.compat import peft as compat_peft
from finlora.dora.bases import supported
from finlora.dora.constants import frozen_sqnorm
from finlora.dora.layer import QUANTIZED_DORA, FastDoraLinearVariant, refresh
from finlora.dora.state import Group, ensure_state, state_of


def _fast_layers(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if isinstance(variants, dict) and any(isinstance(v, FastDoraLinearVariant) for v in variants.values()):
            yield module


def forget_norms(model: nn.Module) -> None:
    """Drop every layer's cached constants, keeping the frozen ‖W0_i‖², so that the next forward computes them again:
    inside a CUDA graph being recorded (`finlora.capture`), where they are then recomputed at each replay from the
    parameters as they are, instead of read from a cache the graph would never consult again."""
    for module in model.modules():
        st = state_of(module)
        if st is not None:
            st.forget()


def clear_dora_cache(model: nn.Module) -> None:
    """Forget everything cached, for code that writes adapter weights through ``.data`` outside an optimizer."""
    for module in model.modules():
        dora_state.drop_state(module)


@torch.no_grad()
def prepare_compile(model: nn.Module) -> None:
    """Compute every finlora DoRA layer's frozen ‖W0_i‖² now, eagerly, for compiled code to read."""
    for module in _fast_layers(model):
        base = module.get_base_layer()
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        with torch.autocast(base.weight.device.type, enabled=False):
            frozen_sqnorm(module, base, dtype)


def fresh_norms(model: nn.Module, in_place: bool = False) -> Callable[[], AbstractContextManager]:
    """The context a compiled training step of `model` runs in (a new one at each call of the function returned): on
    entry, the constants of every stale finlora DoRA layer are refreshed, eagerly and batched over layers of one shape
    (as the eager layers refresh them), and until it exits compiled layers read them instead of rebuilding each
    layer's norm in its graph. A 4-bit layer that computes its norm in its forward has only its A·Aᵀ refreshed here,
    and reads that and its ‖W0_i‖² (computed once, now). Dynamo guards on the switch this sets
    (`state.compiled_reads_norms`). `in_place`: refreshed where the last refresh left them, for torch.compile's CUDA
    graphs."""
    groups = list({id(group): group for module in model.modules()
                   if (st := state_of(module)) is not None and (group := st.group)}.values())
    prepare_compile(model)

    @contextmanager
    def refreshed() -> Iterator[None]:
        for group in groups:  # in the dtype the layers compute in: checkpointed layers recompute eagerly
            module, adapter = group.members[0]
            weight = module.lora_A[adapter].weight
            mixed = torch.is_autocast_enabled(weight.device.type)
            refresh(group.members, torch.get_autocast_dtype(weight.device.type) if mixed else weight.dtype, in_place)
        dora_state.set_compiled_reads_norms(True)
        try:
            yield
        finally:
            dora_state.set_compiled_reads_norms(False)

    return refreshed


class DoraSteps(adapter_steps.AdapterSteps):
    """finlora's DoRA at each point of a step (`finlora.adapter_steps`)."""

    def before_recording(self, model: nn.Module) -> None:
        forget_norms(model)

    def compiled_step(self, model: nn.Module, in_place: bool) -> Callable[[], AbstractContextManager]:
        return fresh_norms(model, in_place)

    def before_decode_compile(self, model: nn.Module) -> None:
        prepare_compile(model)

    def after_optimizer_step(self, model: nn.Module) -> None:
        dora_state.count_optimizer_step()


def use_fast_dora(model: nn.Module, use_triton: bool = True) -> int:
    """Switch every DoRA-enabled LoRA linear layer of ``model`` to finlora's DoRA, in place, and register
    `DoraSteps` (once).

    Layers whose base finlora does not handle (not nn.Linear or bitsandbytes 8-/4-bit) keep peft's
    DoRA. Adapters added or loaded later get peft's variant: call this again after loading them (a call
    also sets `use_triton` on layers switched before). Returns the number of layers that now run finlora's DoRA.
    """
    adapter_steps.register("dora", _STEPS)
    members: list[tuple[nn.Module, str]] = []
    layers: list[nn.Module] = []
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict) or not supported(module.get_base_layer()):
            continue
        for name, variant in variants.items():
            if type(variant) is compat_peft.DoraLinearVariant:
                variants[name] = FastDoraLinearVariant(use_triton)
            elif isinstance(variant, FastDoraLinearVariant):
                variant.use_triton = use_triton
        fast = [name for name, variant in variants.items() if isinstance(variant, FastDoraLinearVariant)]
        members += [(module, name) for name in fast]
        layers += [module] if fast else []
        if fast and type(module) in QUANTIZED_DORA:
            compat_peft.swap_class(module, QUANTIZED_DORA[type(module)])
    group = Group(members)
    for module in layers:
        ensure_state(module).group = group
    return len(layers)


_STEPS = DoraSteps()
