"""transformers internals: the attention implementation a loaded model's config names. Checked on transformers 5.17,
5.24 and 5.25."""

from __future__ import annotations

from typing import Any


def attn_implementation(config: Any) -> str | None:
    """The attention a model runs (`config._attn_implementation`); None for a config without one."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config: Any, name: str | None) -> None:
    """Route a loaded model's attention to the implementation registered under `name`, without reloading it."""
    config._attn_implementation = name


def checkpointing_function(layer: Any) -> Any:
    """The function a transformers layer checkpoints its forward through, set by `gradient_checkpointing_enable`
    (`GradientCheckpointingLayer._gradient_checkpointing_func`). Plain Python: Dynamo inlines it in a compiled
    region."""
    return layer._gradient_checkpointing_func


def no_split_modules(model: Any) -> set[str]:
    """The class names of the blocks a transformers model keeps whole on one device (`_no_split_modules`, e.g.
    LlamaDecoderLayer): its repeated decoder layers."""
    return set(getattr(model, "_no_split_modules", None) or ())
