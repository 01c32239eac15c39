"""The LightningModule: a causal-LM loss on answer tokens (logits only there: `finlora.loss`), AdamW on
trainable parameters only (fused on CUDA; DoRA's magnitudes may have a learning rate of their own:
`param_groups`), and checkpoints that hold those parameters and the optimizer, never the frozen base."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from transformers import get_scheduler

from finlora.batching import num_examples
from finlora.config import TrainerConfig
from finlora.loss import answer_loss
from finlora.prompts import IGNORE_INDEX

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

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        answer_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=num_examples(batch))
        self.log("train/answer_tokens", answer_tokens.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self(batch), prog_bar=True, sync_dist=True, batch_size=num_examples(batch))

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.lr, self.magnitude_lr_scale)
        # fused: one kernel for every parameter's update on CUDA instead of several per tensor (not under fp16's
        # gradient scaler, whose scaled gradients `on_before_optimizer_step` would clip)
        fused = all(p.is_cuda for g in groups for p in g["params"]) and self.trainer.precision != "16-mixed"
        optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        # the schedule multiplies each group's own learning rate: the magnitudes keep their ratio throughout
        name = {"constant": "constant_with_warmup"}.get(self.cfg.scheduler.value, self.cfg.scheduler.value)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=self.cfg.warmup_steps,
                                  num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradient clipping by norm, done here rather than by Lightning's `gradient_clip_val`, which refuses
        fused optimizers; at the same point (after the callbacks' hooks, before the step), the same result."""
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
