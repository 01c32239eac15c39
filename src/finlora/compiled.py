"""The training loss through torch.compile (`trainer.compile`): the whole step, or the decoder layers alone
(`trainer.compile_regions`), one compilation serving every layer of a class. Part of the step component
(`finlora.fast_step`); the LightningModule never sees it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import MethodType

import torch
from peft import PeftModel
from torch import nn

from finlora import adapter_steps
from finlora.compat.torch import dynamo_counters, mark_dynamic, skip_side_effects_in_checkpoint_recompute
from finlora.compat.transformers import checkpointing_function, no_split_modules
from finlora.config import Compile
from finlora.loss import answer_loss

log = logging.getLogger(__name__)


def training_loss(model: nn.Module, mode: Compile, regions: bool = False, backend: str = "inductor"):
    """`answer_loss` on `model` for training steps: as written, or through torch.compile. The row width is
    compiled as a symbolic size, so one compilation serves every static width; for `cudagraphs`, forward and
    backward are recorded once per width and replayed. Each compiled step runs in the adapters' context
    (`adapter_steps.compiled_step`: e.g. DoRA's norms refreshed eagerly, batched, before the step). With `regions`,
    the decoder layers are compiled instead of the whole step (`decoder_layers`), the rest of the step (embeddings,
    the loss) eager: Dynamo traces one layer, not all of them. `backend`: torch.compile's (tests use aot_eager)."""
    if mode is Compile.eager:
        return lambda batch: answer_loss(model, batch)
    dynamo_counters().clear()  # what `StepRunner.report` reads: this run's graph breaks and skipped captures only
    refreshed = adapter_steps.compiled_step(model, in_place=mode is Compile.cudagraphs)
    options = {"backend": backend, "mode": "reduce-overhead" if mode is Compile.cudagraphs else None}
    layers = decoder_layers(model) if regions else []
    if regions and not layers:
        log.warning("trainer.compile_regions: the model names no repeated block (transformers' _no_split_modules); "
                    "compiling the whole step")
    held = {layer for layer in layers if _checkpointed(layer)}  # checkpointed inside their regions (`_region`)
    routed = {layer: MethodType(_region(type(layer), layer in held, **options), layer) for layer in layers}
    run = ((lambda batch: answer_loss(model, batch)) if routed
           else torch.compile(lambda batch: answer_loss(model, batch), **options))

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not routed:  # (regions: each layer's inputs become dynamic by themselves at a second width)
            for t in batch.values():
                if t.dim() == 2:
                    mark_dynamic(t, 1)
        if mode is Compile.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer needed
        with _through(routed, held), refreshed():
            return run(batch)

    return step


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the outermost modules of the classes its transformers model keeps whole on one
    device (`_no_split_modules`, e.g. LlamaDecoderLayer), whatever the architecture calls them."""
    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    kept = no_split_modules(causal)
    found: list[tuple[str, nn.Module]] = []
    for name, module in causal.named_modules():
        if type(module).__name__ in kept and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def _checkpointed(layer: nn.Module) -> bool:
    """Whether transformers checkpoints the layer's activations (`trainer.gradient_checkpointing`)."""
    return layer.__dict__.get("gradient_checkpointing") is True


@functools.cache
def _region(cls: type, checkpointed: bool, **options: str | None) -> Callable:
    """One compiled forward per layer class, called with each layer as `self`: Dynamo guards on the layer's kind and
    shapes, not on which layer it is (nn modules are inlined, their weights graph inputs), so the compilation of the
    first layer serves every other. A `checkpointed` layer's checkpoint is taken inside the region, so that the
    backward recomputes the compiled forward; transformers' own checkpoint (around the layer's __call__ or its
    forward, depending on the release) would recompute the plain forward, whose saved tensors differ from the
    compiled one's (CheckpointError), so `_through` turns it off during the step. The region must trace whole for
    its checkpoint to be the compiled one (`_side_effects_once`)."""
    forward = cls.forward
    if not checkpointed:
        return torch.compile(forward, **options)

    def checkpointed_forward(self: nn.Module, *args: object, **kwargs: object) -> object:
        return checkpointing_function(self)(functools.partial(forward, self, **kwargs), *args)

    return torch.compile(checkpointed_forward, **options)


@contextmanager
def _through(routed: dict[nn.Module, MethodType], held: set[nn.Module]) -> Iterator[None]:
    """Each layer's forward through its region while the compiled step runs, and only then: other compiled code on
    the same model (generation's decode step) keeps the plain layers. The same bound methods every step, set in
    the instance's __dict__ directly, so Dynamo's guards hold and a step pays no module __setattr__. The `held`
    layers checkpoint inside their region (`_region`), not again around it, and their forward may change Python
    state that the recomputation then leaves alone (`_side_effects_once`)."""
    for layer, method in routed.items():
        layer.__dict__["forward"] = method
    for layer in held:
        layer.__dict__["gradient_checkpointing"] = False
    try:
        with _side_effects_once() if held else nullcontext():
            yield
    finally:
        for layer in routed:
            layer.__dict__.pop("forward", None)
        for layer in held:
            layer.__dict__["gradient_checkpointing"] = True


def _side_effects_once() -> AbstractContextManager:
    """Dynamo traces a checkpointed region's forward even where it changes Python state outside the region, and the
    compiled backward's recomputation leaves that change out. Without this, such a change (transformers' kernels
    integration wraps attention forwards in a ContextVar set and reset) makes Dynamo give up the checkpoint as one
    region (a graph break, 'HOP: Unsafe side effect'), and the eager recomputation then saves other tensors than the
    forward did (CheckpointError). The change is undone within the same forward, so leaving it out of the
    recomputation changes nothing. A torch without the switch gets nothing."""
    return skip_side_effects_in_checkpoint_recompute()
