"""bitsandbytes internals finlora reads or rebuilds: the kind of a quantized weight, a 4-bit quant state's parts and
the state rebuilt from them, the 4-bit layer's compute-dtype handling, and an 8-bit layer's int8 rows and scales.
Checked on peft 0.21 / bitsandbytes 0.50.2."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

try:
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
except ImportError:
    bnb = None


def is_int8_weight(weight: Tensor) -> bool:
    """Whether `weight` is a bitsandbytes 8-bit weight holding its int8 rows (`Int8Params` after quantization)."""
    return type(weight).__name__ == "Int8Params" and weight.dtype == torch.int8


def is_unpacked_4bit_weight(weight: Tensor) -> bool:
    """Whether `weight` is a bitsandbytes 4-bit weight in its portable layout (`Params4bit` with a `quant_state`
    not repacked for the CPU: `QuantState.packing_format_for_cpu`)."""
    qs = getattr(weight, "quant_state", None)
    return type(weight).__name__ == "Params4bit" and qs is not None and not getattr(qs, "packing_format_for_cpu", False)


def int8_rows(base: nn.Module) -> tuple[Tensor, Tensor]:
    """CB (out × in, int8) and SCB (out, float) of an 8-bit layer, W0 = CB · SCB / 127: `weight.data` and
    `state.SCB`, or `weight.SCB` before bitsandbytes has used the layer (`MatmulLtState.SCB`, `Int8Params.SCB`)."""
    scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB
    return base.weight.data, scb


def drop_stale_int8_rows(module: nn.Module) -> None:
    """Drop an 8-bit weight's `CB` left without its `SCB` while the layer's state holds the scales
    (`Int8Params.CB`/`SCB`, `MatmulLtState.SCB`): `Int8Params.to` sets CB again but not SCB, and the next forward's
    `init_8bit_state` would overwrite the good state with SCB=None."""
    w = module.weight
    if getattr(w, "CB", None) is not None and getattr(w, "SCB", None) is None and module.state.SCB is not None:
        w.CB = None


class QuantParts(NamedTuple):
    """A 4-bit `QuantState` as plain values (a nested state's absmax, code and block size included), what a
    custom operator can take."""

    absmax: Tensor
    shape: list[int]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    offset: Tensor | None
    absmax2: Tensor | None
    code2: Tensor | None
    blocksize2: int


def quant_parts(qs: Any) -> QuantParts:
    """The parts of a 4-bit `QuantState` (`absmax`, `shape`, `dtype`, `blocksize`, `quant_type`, `offset`, and of
    `state2` when `nested`)."""
    nested = qs.state2 if qs.nested else None
    return QuantParts(qs.absmax, list(qs.shape), qs.dtype, qs.blocksize, qs.quant_type, qs.offset,
                      nested and nested.absmax, nested and nested.code, nested.blocksize if nested else 0)


def quant_state(absmax: Tensor, shape: list[int], dtype: torch.dtype, blocksize: int, quant_type: str,
                offset: Tensor | None, absmax2: Tensor | None, code2: Tensor | None, blocksize2: int) -> Any:
    """A 4-bit `QuantState` built from `quant_parts`' values (its constructor's arguments, `state2` a `QuantState`
    of float32 absmax)."""
    state2 = None if absmax2 is None else bnb.functional.QuantState(absmax=absmax2, code=code2, blocksize=blocksize2,
                                                                       dtype=torch.float32)
    return bnb.functional.QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                                     quant_type=quant_type, dtype=dtype, offset=offset, state2=state2)


def linear4bit_input(base: nn.Module, x: Tensor) -> Tensor:
    """`x` as `Linear4bit.forward` hands it to its matmul: the weight's lost quant state restored
    (`fix_4bit_weight_quant_state_from_module`), the compute dtype set from the first input (`compute_type_is_set`,
    `set_compute_type`) and `x` cast to it (`compute_dtype`)."""
    fix_4bit_weight_quant_state_from_module(base)
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return x if base.compute_dtype is None else x.to(base.compute_dtype)


def swap_class(layer: nn.Module, cls: type[Any]) -> None:
    """Give a bitsandbytes layer a subclass of its own type (`layer.__class__`) with another forward: transformers
    builds the quantized layers itself, so the instance it made changes class, its stored weights untouched."""
    layer.__class__ = cls
