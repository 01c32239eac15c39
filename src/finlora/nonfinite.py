"""Gradient clipping and the non-finite policy of an optimizer step, one implementation for every path: the eager
step (`callbacks.NonFiniteGuard` before the optimizer) and the recorded one (`update.RecordedAdamW`, inside its
update). `measure_gradients` clips and judges; `flag_step` hands the verdict to a fused optimizer, which then leaves
the weights as they were; `NonFiniteSteps` applies `trainer.on_nonfinite_loss` (stop or skip) to the verdicts."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from finlora.checkpoints import last_good
from finlora.config import NonFinitePolicy
from finlora.errors import NonFiniteLoss

log = logging.getLogger(__name__)


def measure_gradients(params: list[Tensor], loss: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """The gradients' total norm, and whether the step is not finite (its loss or that norm), both on the device;
    the gradients clipped to a norm of at most `clip` (0: not clipped) by that norm, as `clip_grad_norm_` would,
    without measuring it a second time. Nothing waits for the GPU."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros((), device=loss.device)
    if clip and params:  # a non-finite norm's step is skipped or refused, whatever this makes of its gradients
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm, ~(torch.isfinite(norm) & torch.isfinite(loss))


def flag_step(optimizer: torch.optim.Optimizer, bad: Tensor, found: Tensor | None = None) -> None:
    """Hand the verdict to a fused optimizer (`found_inf`, as GradScaler does): a non-finite step then leaves weights,
    moments and step count as they were, with no wait for the GPU. `found`: a recorded graph's own flag, written in
    place."""
    if found is None:
        optimizer.found_inf = bad.float()
        return
    found.copy_(bad)
    optimizer.found_inf = found


class NonFiniteSteps:
    """`trainer.on_nonfinite_loss` applied to the steps' verdicts. Read at once (`on_host`: the unfused optimizer,
    whose step cannot be skipped on the device), or kept on the device (`record`) and read where the host waits
    anyway (`check`): `stop` raises `NonFiniteLoss` naming the first such step, `skip` warns how many were skipped.
    `last`: the run's last.ckpt, whose folder names where to resume from."""

    def __init__(self, policy: NonFinitePolicy, last: Path) -> None:
        self.policy, self.last = policy, last
        self.skipped = 0
        self.pending: dict[str, Tensor] | None = None  # on the device: count, first step, its loss and norm

    def on_host(self, optimizer: torch.optim.Optimizer, step: int, loss: Tensor, norm: Tensor, bad: Tensor) -> None:
        """Read the verdict now (one wait for the device); `skip` drops the gradients, so the step changes nothing."""
        if not bool(bad):
            return
        what = f"loss {loss.item()}" if not torch.isfinite(loss) else f"gradient norm {norm.item()}"
        if self.policy is NonFinitePolicy.skip:
            self.skipped += 1
            log.warning("step %d: %s; skipped this optimizer step (%d so far)", step, what, self.skipped)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        raise self.fault(step, what)

    def record(self, bad: Tensor, step: int, loss: Tensor, norm: Tensor) -> None:
        """Count the verdict on the device, keeping the first bad step's number, loss and norm."""
        if self.pending is None:
            self.pending = {"count": torch.zeros((), dtype=torch.long, device=bad.device),
                            "step": torch.zeros((), dtype=torch.long, device=bad.device),
                            "loss": torch.zeros((), device=bad.device), "norm": torch.zeros((), device=bad.device)}
        first = bad & (self.pending["count"] == 0)
        for key, value in (("step", step), ("loss", loss.float()), ("norm", norm.float())):
            self.pending[key] = torch.where(first, value, self.pending[key])
        self.pending["count"] += bad

    def check(self) -> None:
        """Read the recorded verdicts back (one wait for the device): raise or warn about new ones."""
        if self.pending is None or (count := int(self.pending["count"])) == self.skipped:
            return
        step, loss, norm = int(self.pending["step"]), float(self.pending["loss"]), float(self.pending["norm"])
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        if self.policy is NonFinitePolicy.skip:
            log.warning("%d optimizer steps skipped so far (the first at step %d: %s)", count, step, what)
            self.skipped = count
            return
        raise self.fault(step, what)

    def fault(self, step: int, what: str) -> NonFiniteLoss:
        return NonFiniteLoss(f"step {step}: {what}; stopped before it reached the weights. {self.then()}; or set "
                             "trainer.on_nonfinite_loss=skip to drop such steps")

    def then(self) -> str:
        """Where to continue from: the newest checkpoint with finite weights, if any."""
        good = last_good(self.last.parent) if self.last.parent.is_dir() else None
        if good is None:
            return ("No checkpoint was saved yet, so nothing to resume: lower trainer.lr or raise "
                    "trainer.warmup_steps and start the run again")
        resume = "ckpt_path=last" if good == self.last else f"ckpt_path={good}"
        return (f"Last good checkpoint: {good}. Lower trainer.lr or raise trainer.warmup_steps, then resume with "
                f"{resume} resume_changes=[trainer.lr] (or trainer.warmup_steps)")
