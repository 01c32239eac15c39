"""How several GPUs share a run, on Lightning's own strategies: DDP as Lightning has it (`trainer=ddp`), and
FSDP set up for a quantized base with adapters (`trainer=fsdp`), whose adapter is gathered whole to save.

FSDP (version 1) flattens each wrapped unit's parameters into one tensor, which needs one dtype and one
`requires_grad` per unit. So each decoder layer is a unit (its frozen base weights; 4-bit weights are
stored in the compute dtype, `models.quantization_config(sharded=True)`), and each trainable leaf module
(a LoRA matrix, a DoRA magnitude) a unit of its own: peft's `fsdp_auto_wrap_policy`.
"""

from __future__ import annotations

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
    from peft.utils.other import fsdp_auto_wrap_policy

    return FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy="FULL_SHARD",
                        state_dict_type="full")


def ddp() -> Any:
    """Lightning's DDP without a broadcast of the model's buffers before every forward (they are the rotary
    frequencies, the same on every rank: each loaded the same base), and with each gradient a view into DDP's
    reduction bucket, so no copy into the bucket and back a step."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(broadcast_buffers=False, gradient_as_bucket_view=True)


def full_state(trainer: L.Trainer) -> dict | None:
    """Under FSDP, the model's whole state dict on rank zero (every rank must call this: it gathers the
    shards), keyed as the unwrapped model's; None under any other strategy (the model is whole already)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    state = trainer.strategy.lightning_module_state_dict()
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
