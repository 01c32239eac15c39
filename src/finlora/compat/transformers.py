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


def compile_on_every_device(compile_config: Any) -> None:
    """Make transformers compile the decode step under `compile_config` on any device, not on CUDA alone
    (`CompileConfig._compile_all_devices`): how a CPU test runs the CUDA decode path."""
    compile_config._compile_all_devices = True


def compiles_decode_step(model: Any, model_kwargs: dict, generation_config: Any) -> bool:
    """Whether `generate` would compile `model`'s decode step for these inputs (`_valid_auto_compile_criteria`:
    a static cache, a compile config, and no quantizer that forbids it)."""
    return model._valid_auto_compile_criteria(model_kwargs, generation_config)


def checkpointing_function(layer: Any) -> Any:
    """The function a transformers layer checkpoints its forward through, set by `gradient_checkpointing_enable`
    (`GradientCheckpointingLayer._gradient_checkpointing_func`). Plain Python: Dynamo inlines it in a compiled
    region."""
    return layer._gradient_checkpointing_func


def no_split_modules(model: Any) -> set[str]:
    """The class names of the blocks a transformers model keeps whole on one device (`_no_split_modules`, e.g.
    LlamaDecoderLayer): its repeated decoder layers."""
    return set(getattr(model, "_no_split_modules", None) or ())


def input_grads_enabled(model: Any) -> bool:
    """Whether `enable_input_require_grads` left its hook on the input embeddings (`_require_grads_hook`), which
    `disable_input_require_grads` removes."""
    return getattr(model, "_require_grads_hook", None) is not None
