"""The LightningModule: a causal-LM loss on answer tokens (logits only there: `finlora.loss`), AdamW on trainable
parameters only (DoRA's magnitudes may have a learning rate of their own: `param_groups`), and checkpoints that hold
those parameters and the optimizer, never the frozen base. How the step's loss runs (compiled, recorded) and which
AdamW updates the weights is the step component's business (`fast_step.StepRunner`); clipping and the non-finite
policy are `finlora.nonfinite`'s."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from transformers import get_scheduler

from finlora import adapter_steps
from finlora.batching import LOSS_POSITIONS, LOSS_TARGETS, num_examples
from finlora.compiled import decoder_layers, training_loss
from finlora.config import TrainerConfig
from finlora.fast_step import StepRunner
from finlora.loggers import logs_now
from finlora.loss import INPUT_KEYS, answer_loss
from finlora.metric_names import ANSWER_TOKENS, LEARNING_RATE, TRAIN_LOSS, VAL_LOSS
from finlora.prompts import IGNORE_INDEX

__all__ = ["MAGNITUDE", "STEP_KEYS", "FinetuneModule", "decoder_layers", "param_groups", "training_loss"]

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
    """Trains `model` with the loss and optimizer of `step` (default: the one `cfg` describes)."""

    def __init__(self, model: nn.Module, cfg: TrainerConfig, magnitude_lr_scale: float = 1.0,
                 step: StepRunner | None = None) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode, and Lightning keeps each module's mode
        self.cfg = cfg
        self.magnitude_lr_scale = magnitude_lr_scale
        self.strict_loading = False  # checkpoints carry only the trainable parameters
        self.runner = step if step is not None else StepRunner(model, cfg)
        self.train_loss = self.runner.loss  # the step's loss, as the runner made it

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
        """Not where the step writes every gradient anew (`StepRunner.keeps_gradients`)."""
        if not self.runner.keeps_gradients:
            optimizer.zero_grad()

    def optimizer_step(self, *args: object, **kwargs: object) -> None:
        """The optimizer's step (eager or replayed, on the host once a real step), then the adapters' own
        (`adapter_steps.after_optimizer_step`): their weights changed."""
        super().optimizer_step(*args, **kwargs)
        adapter_steps.after_optimizer_step(self.model)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log(VAL_LOSS, self(batch), prog_bar=True, sync_dist=True, batch_size=num_examples(batch))

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.lr, self.magnitude_lr_scale)
        optimizer = self.runner.optimizer(groups, self.trainer.precision, self.cfg.lr, self.cfg.weight_decay)
        # the schedule multiplies each group's own learning rate: the magnitudes keep their ratio throughout
        name = {"constant": "constant_with_warmup"}.get(self.cfg.scheduler.value, self.cfg.scheduler.value)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=self.cfg.warmup_steps,
                                  num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer,  # the learning rate logged under one name, whichever AdamW class runs
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LEARNING_RATE}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
