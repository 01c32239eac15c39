"""The step component: how a training step's loss runs and which optimizer updates the weights. The LightningModule
asks it for both and otherwise just trains. Plain (`trainer.compile=eager`, no `trainer.capture`): the eager loss and
torch's AdamW. Fast: the loss through torch.compile, whole or by decoder layers (`finlora.compiled`), recorded as
CUDA graphs and replayed (`capture.CapturedLoss`), and the update recorded too (`update.RecordedAdamW`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from finlora.capture import CapturedLoss
from finlora.compat.torch import dynamo_counters
from finlora.compiled import training_loss
from finlora.config import Compile, TrainerConfig
from finlora.update import RecordedAdamW


class StepRunner:
    """`loss(batch)` for a training step, as `trainer.compile`, `trainer.compile_regions` and `trainer.capture` say,
    and the optimizer for it (`optimizer`). Under `trainer.capture` the optimizer is `RecordedAdamW`, which clips
    by `trainer.grad_clip` itself; otherwise `callbacks.NonFiniteGuard` clips (both through `finlora.nonfinite`)."""

    def __init__(self, model: nn.Module, cfg: TrainerConfig) -> None:
        self.compile, self.regions = cfg.compile, cfg.compile_regions
        self.capture, self.clip = cfg.capture, cfg.grad_clip
        self.loss: Callable[[dict[str, Tensor]], Tensor] = training_loss(model, cfg.compile, cfg.compile_regions)
        if cfg.capture:
            self.loss = CapturedLoss(model, self.loss)

    @property
    def keeps_gradients(self) -> bool:
        """Whether a replayed backward writes every gradient anew (`CapturedLoss.keeps_gradients`): zeroing them
        between steps would be wasted host work."""
        return getattr(self.loss, "keeps_gradients", False)

    def optimizer(self, groups: list[dict], precision: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW over `groups`: fused (one kernel for every parameter's update) where every parameter is on CUDA and
        no fp16 gradient scaler runs (its scaled gradients would be clipped); recorded under `trainer.capture`."""
        fused = all(p.is_cuda for g in groups for p in g["params"]) and precision != "16-mixed"
        hyper = {"lr": lr, "weight_decay": weight_decay}
        # with trainer.capture, the update (norm, clipping, verdict, step) replays from CUDA graphs too
        return (RecordedAdamW(groups, clip=self.clip, **hyper) if fused and self.capture
                else torch.optim.AdamW(groups, fused=fused, **hyper))

    def report(self) -> dict:
        """What torch.compile did with the step: by regions or not, graph breaks (each one a return to Python
        mid-step) and, for cudagraphs, whether every graph was captured (inductor skips capture it cannot do
        safely, e.g. CPU ops); for `trainer.capture`, whether the step was recorded and, if not, why."""
        report: dict = {}
        if isinstance(self.loss, CapturedLoss):
            report = {"capture": True, "cudagraphs_captured": self.loss.failure is None and self.loss.shapes > 0,
                      "capture_failure": self.loss.failure}
        if self.compile is Compile.eager:
            return report
        counters = dynamo_counters()
        report |= {"compile_regions": self.regions, "graph_breaks": sum(counters["graph_break"].values())}
        if self.compile is Compile.cudagraphs:
            report["cudagraphs_captured"] = counters["inductor"]["cudagraph_skips"] == 0
        return report
