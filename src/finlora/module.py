"""The LightningModule: a causal-LM loss on answer tokens (logits only there: `finlora.loss`), compiled as
`trainer.compile` says and recorded as CUDA graphs if `trainer.capture` says so (`finlora.capture`), AdamW on
trainable parameters only (fused on CUDA; DoRA's magnitudes may have a learning rate of their own:
`param_groups`; gradients clipped by `callbacks.NonFiniteGuard`, which measures their norm anyway, or under
`trainer.capture` by the optimizer's own recorded update, `update.RecordedAdamW`), and
checkpoints that hold those parameters and the optimizer, never the frozen base."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import MethodType

import lightning as L
import torch
from peft import PeftModel
from torch import nn
from transformers import get_scheduler

from finlora.batching import LOSS_POSITIONS, LOSS_TARGETS, num_examples
from finlora.capture import CapturedLoss
from finlora.config import Compile, TrainerConfig
from finlora.loggers import logs_now
from finlora.loss import INPUT_KEYS, answer_loss
from finlora.metric_names import ANSWER_TOKENS, LEARNING_RATE, TRAIN_LOSS, VAL_LOSS
from finlora.prompts import IGNORE_INDEX
from finlora.update import RecordedAdamW

log = logging.getLogger(__name__)

STEP_KEYS = (*INPUT_KEYS, "labels", LOSS_POSITIONS, LOSS_TARGETS)  # the tensors a compiled step takes
MAGNITUDE = "lora_magnitude_vector"  # peft's name for DoRA's magnitude vectors (finlora's DoRA keeps it)


def param_groups(model: nn.Module, lr: float, magnitude_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: every trainable parameter at `lr`, except DoRA's magnitude vectors, which get a
    group of their own at `lr × magnitude_lr_scale` when the scale is not 1 (`adapter.magnitude_lr_scale`).
    A scale of 1 keeps one group, so the optimizer state matches checkpoints written before the setting."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    magnitude = [p for n, p in trainable if MAGNITUDE in n] if magnitude_lr_scale != 1 else []
    ids = {id(p) for p in magnitude}
    groups = [{"params": [p for _, p in trainable if id(p) not in ids], "lr": lr}]
    return groups + ([{"params": magnitude, "lr": lr * magnitude_lr_scale}] if magnitude else [])


class FinetuneModule(L.LightningModule):
    def __init__(self, model: nn.Module, cfg: TrainerConfig, magnitude_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode, and Lightning keeps each module's mode
        self.cfg = cfg
        self.magnitude_lr_scale = magnitude_lr_scale
        self.strict_loading = False  # checkpoints carry only the trainable parameters
        self.train_loss = training_loss(model, cfg.compile, cfg.compile_regions)
        if cfg.capture:
            self.train_loss = CapturedLoss(model, self.train_loss)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_loss(self.model, batch)

    def cpu(self) -> FinetuneModule:
        """Stays where it is: Lightning's teardown moves the model to the CPU after `fit`, where the test stage would
        then generate, and a bitsandbytes 8-bit model cannot move back (its int8 weights would be quantized again)."""
        return self

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.train_loss({k: v for k, v in batch.items() if k in STEP_KEYS})
        if logs_now(self.trainer):
            answer_tokens = (batch["labels"] != IGNORE_INDEX).sum()
            # a copy: a CUDA graph's output is overwritten by the next replay, before Lightning reads the logs
            self.log(TRAIN_LOSS, loss.detach().clone(), prog_bar=True, batch_size=num_examples(batch))
            self.log(ANSWER_TOKENS, answer_tokens.float(), reduce_fx="sum", batch_size=1)
        return loss

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Not where a replayed backward writes every gradient anew (`CapturedLoss.keeps_gradients`): letting them go
        would cost the host a few microseconds a trained tensor, twice (the replay hands them back)."""
        if not getattr(self.train_loss, "keeps_gradients", False):
            optimizer.zero_grad()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log(VAL_LOSS, self(batch), prog_bar=True, sync_dist=True, batch_size=num_examples(batch))

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.lr, self.magnitude_lr_scale)
        # fused: one kernel for every parameter's update on CUDA instead of several per tensor (not under fp16's
        # gradient scaler, whose scaled gradients `on_before_optimizer_step` would clip)
        fused = all(p.is_cuda for g in groups for p in g["params"]) and self.trainer.precision != "16-mixed"
        hyper = {"lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}
        # with trainer.capture, the update (norm, clipping, verdict, step) replays from CUDA graphs too
        optimizer = (RecordedAdamW(groups, clip=self.cfg.grad_clip, **hyper) if fused and self.cfg.capture
                     else torch.optim.AdamW(groups, fused=fused, **hyper))
        # the schedule multiplies each group's own learning rate: the magnitudes keep their ratio throughout
        name = {"constant": "constant_with_warmup"}.get(self.cfg.scheduler.value, self.cfg.scheduler.value)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=self.cfg.warmup_steps,
                                  num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer,  # the learning rate logged under one name, whichever AdamW class runs
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LEARNING_RATE}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def training_loss(model: nn.Module, mode: Compile, regions: bool = False, backend: str = "inductor"):
    """`answer_loss` on `model` for training steps: as written, or through torch.compile. The row width is
    compiled as a symbolic size, so one compilation serves every static width; for `cudagraphs`, forward
    and backward are recorded once per width and replayed. finlora's DoRA norms are refreshed before each step,
    batched, and the compiled layers read them (`dora.fresh_norms`). With `regions` (`trainer.compile_regions`),
    the decoder layers are compiled instead of the whole step, one compilation for every layer of a class
    (`decoder_layers`), the rest of the step (embeddings, the loss) eager: Dynamo traces one layer, not thirty,
    and a later job finds that one layer's kernels in the cache. `backend`: torch.compile's (tests use aot_eager)."""
    if mode is Compile.eager:
        return lambda batch: answer_loss(model, batch)
    from torch._dynamo.utils import counters

    from finlora.dora import fresh_norms

    counters.clear()  # what `train.compile_report` reads: this run's graph breaks and skipped captures only
    refreshed = fresh_norms(model, in_place=mode is Compile.cudagraphs)
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
                    torch._dynamo.maybe_mark_dynamic(t, 1)
        if mode is Compile.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer needed
        with _through(routed, held), refreshed():
            return run(batch)

    return step


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the outermost modules of the classes its transformers model keeps whole on one
    device (`_no_split_modules`, e.g. LlamaDecoderLayer), whatever the architecture calls them."""
    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    kept = set(getattr(causal, "_no_split_modules", None) or ())
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
    """One compiled forward per layer class, called with each layer as `self`: Dynamo guards on the layer's
    kind and shapes, not on which layer it is (nn modules are inlined, their weights graph inputs), so the
    compilation of the first layer serves every other. A `checkpointed` layer's checkpoint is taken inside the
    region, so that the backward recomputes the compiled forward. transformers 5.17 checkpoints the layer's __call__
    (5.24 and 5.25 its forward), outside the region, and its recomputation after the step ran the plain forward, whose
    saved tensors are not the compiled one's (torch.utils.checkpoint's CheckpointError); `_through` turns that
    checkpoint off during the step, whichever of the two transformers takes, through the layer's own
    `gradient_checkpointing` flag. The region must trace whole for its checkpoint to be the compiled one
    (`_side_effects_once`)."""
    forward = cls.forward
    if not checkpointed:
        return torch.compile(forward, **options)

    def checkpointed_forward(self: nn.Module, *args: object, **kwargs: object) -> object:
        return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)

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
    compiled backward's recomputation does not do it again (torch's `skip_fwd_side_effects_in_bwd_under_checkpoint`).
    Without this, such a change makes Dynamo give up the checkpoint as one region (a graph break, 'HOP: Unsafe side
    effect'): torch.utils.checkpoint then runs eagerly around compiled code, its recomputation in the backward runs
    other code (eager, and after `_through` has given the layers their own checkpointing back) and saves other tensors
    than the forward did (CheckpointError). transformers 5.25 is such a case: it requires `kernels` (>=0.19.1,
    which 5.17 and 5.24 leave unused when it is installed at all), whose `use_kernelized_func` wraps the attention's
    forward (LlamaAttention and others) in a ContextVar set and reset. That change is undone within the same forward,
    so leaving it out of the recomputation changes nothing; the recomputation runs the traced graph either way.
    Checked with torch 2.13 (CPU) on transformers 5.17, 5.24 and 5.25; a torch without the switch gets nothing."""
    config = torch._dynamo.config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return nullcontext()
    return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
