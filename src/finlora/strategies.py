"""How several GPUs share a run, on Lightning's own strategies: DDP as Lightning has it (`trainer=ddp`), and
FSDP set up for a quantized base with adapters (`trainer=fsdp`), whose adapter is gathered whole to save.

FSDP (version 1) flattens each wrapped unit's parameters into one tensor, which needs one dtype and one
`requires_grad` per unit. So each decoder layer is a unit (its frozen base weights; 4-bit weights are
stored in the compute dtype, `models.quantization_config(sharded=True)`), and each trainable leaf module
(a LoRA matrix, a DoRA magnitude) a unit of its own: the recipe of peft's `fsdp_auto_wrap_policy`,
written here without the accelerate package that peft's version imports.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
from torch import nn


def lightning_strategy(strategy: str, model: nn.Module) -> Any:
    """What `L.Trainer(strategy=...)` gets: Lightning's own name, DDP as set out in `ddp`, or for fsdp the
    strategy wrapping `model`."""
    if strategy == "ddp":
        return ddp()
    if strategy != "fsdp":
        return strategy
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    layer_names = set(getattr(_inner(model), "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    trainable_leaf = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: not list(m.children()) and any(
        p.requires_grad for p in m.parameters(recurse=False)))
    per_layer = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)
    return FSDPStrategy(auto_wrap_policy=functools.partial(_or_policy, policies=[trainable_leaf, per_layer]),
                        sharding_strategy="FULL_SHARD", state_dict_type="full")


def ddp() -> Any:
    """Lightning's DDP without a broadcast of the model's buffers before every forward (they are the rotary
    frequencies, the same on every rank: each loaded the same base), and with each gradient a view into DDP's
    reduction bucket, so no copy into the bucket and back a step."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(broadcast_buffers=False, gradient_as_bucket_view=True)


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def full_state(trainer: L.Trainer) -> dict | None:
    """Under FSDP, the model's whole state dict on rank zero (every rank must call this: it gathers the
    shards), keyed as the unwrapped model's; None under any other strategy (the model is whole already)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    state = trainer.strategy.lightning_module_state_dict()
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
