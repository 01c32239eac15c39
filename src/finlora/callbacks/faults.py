"""Faults during a fit: a signal saves the step and stops (`SaveAndStop`, agreed over ranks by `StopVote`), and a
non-finite step never reaches the weights (`NonFiniteGuard`, applying `finlora.nonfinite`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from finlora.compat.lightning import accumulating
from finlora.config import NonFinitePolicy
from finlora.errors import Interrupted, NonFiniteLoss
from finlora.loggers import ends_fit, logs_now
from finlora.metric_names import GRAD_NORM
from finlora.nonfinite import NonFiniteSteps, flag_step, measure_gradients
from finlora.update import RecordedAdamW

log = logging.getLogger(__name__)


class SaveAndStop(Callback):
    """Writes last.ckpt every `every_n_steps` optimizer steps and after the final one, and on SIGTERM
    (preemption) or Ctrl-C finishes the optimizer step under way, writes last.ckpt and stops.

    Saves happen only where an optimizer step has just ended, never inside a gradient-accumulation window
    whose gradients a checkpoint would not hold. The handlers are installed at train start, over
    Lightning's own SIGTERM handler (which would raise mid-validation without saving); Lightning puts the
    handlers from before `fit` back at teardown. A second Ctrl-C aborts at once.
    """

    def __init__(self, last: Path, every_n_steps: int) -> None:
        self.last = last
        self.every_n_steps = every_n_steps
        self.signum: int | None = None
        self.vote = StopVote()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            print(f"finlora: Ctrl-C again: aborted at once; {self.last} holds the last saved step", file=sys.stderr,
                  flush=True)
            os._exit(128 + signal.SIGINT)  # no cleanup: every file finlora writes is renamed into place whole
        self.signum = signum
        log.warning("%s: saving a checkpoint after this optimizer step, then stopping (Ctrl-C again aborts)",
                    signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if accumulating(trainer):
            return
        stop = self.vote(trainer, self.signum)
        if stop and self.signum is None:  # another rank was signalled: this one stops with it
            self.signum = stop
        final = ends_fit(trainer, trainer.global_step)
        if stop or final or trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.last, weights_only=False)  # optimizer and loops too
        if stop:  # out of the loop now: `should_stop` would still run validation and Lightning's end-of-fit messages
            raise self.interrupted(trainer.global_step)

    def interrupted(self, step: int) -> Interrupted | None:
        """The fault to end the run with if a signal stopped it (raised at the next optimizer-step boundary,
        or by `train` after `fit` when the signal came during the last validation)."""
        if self.signum is None:
            return None
        name = signal.Signals(self.signum).name
        return Interrupted(f"stopped by {name} after step {step}; {self.last} holds it: rerun in the same folder "
                           "(hydra.run.dir=<run folder>) or pass ckpt_path=last to continue", self.signum)


class StopVote:
    """The signal any rank got (the largest number, if several), known to every rank at the same optimizer
    step, without making the host wait for the GPU (Lightning's `reduce_boolean_decision` copies a new tensor
    from host memory and meets the other ranks at a barrier, a wait for the GPU at every step). Each step's
    votes are reduced over the ranks on their device and copied to pinned host memory, queued behind the step's
    work; the result is read one step later, when the GPU has long finished it (if it has not, the read waits
    for it, so every rank still decides at the same step). One process decides on its own signal at once."""

    def __init__(self) -> None:
        self.votes: torch.Tensor | None = None  # this step's signal number (0: none), the ranks' largest in place
        self.seen: torch.Tensor | None = None  # the result, on the host
        self.done: torch.cuda.Event | None = None  # when `seen` holds it (CUDA; the CPU copies at once)
        self.posted = False

    def __call__(self, trainer: L.Trainer, signum: int | None) -> int | None:
        if trainer.world_size == 1:
            return signum
        earlier = self._read() if self.posted else None
        if self.votes is None:
            device = trainer.strategy.root_device
            self.votes = torch.zeros(1, dtype=torch.int32, device=device)
            self.seen = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
            self.done = torch.cuda.Event() if device.type == "cuda" else None
        self.votes.fill_(signum or 0)
        torch.distributed.all_reduce(self.votes, op=torch.distributed.ReduceOp.MAX)
        self.seen.copy_(self.votes, non_blocking=True)
        if self.done is not None:
            self.done.record()
        self.posted = True
        return earlier

    def _read(self) -> int | None:
        if self.done is not None:
            self.done.synchronize()
        return int(self.seen[0]) or None


class NonFiniteGuard(Callback):
    """Keeps an optimizer step whose loss or gradients are not finite from the weights, and clips the gradients to
    at most `clip` (`trainer.grad_clip`; 0: not clipped), with `finlora.nonfinite`'s one implementation. The check
    runs before each optimizer step, after the loss and gradients are averaged over a whole accumulation window and
    over DDP ranks, so every rank decides alike; it logs the norm as `train/grad_norm`. Callbacks after it see the
    clipped gradients (Lightning's own clipping, `gradient_clip_val`, refuses fused optimizers).

    With fused AdamW (CUDA) the verdict goes to the optimizer (`flag_step`) and is read back only on logging steps,
    before checkpoints and at the end (`NonFiniteSteps.check`): the host never waits for the GPU. Otherwise (the
    CPU) it is read at each step (`NonFiniteSteps.on_host`). `update.RecordedAdamW` (`trainer.capture`) measures
    and clips inside its own update, replayed from a CUDA graph: the guard then reads its verdict after the step.
    """

    def __init__(self, policy: NonFinitePolicy, last: Path, every_n_steps: int, clip: float = 0.0) -> None:
        self.steps = NonFiniteSteps(policy, last)
        self.clip = clip
        self.last = last
        self.every_n_steps = every_n_steps
        self.loss: torch.Tensor | None = None

    @property
    def policy(self) -> NonFinitePolicy:
        return self.steps.policy

    @property
    def skipped(self) -> int:
        return self.steps.skipped

    @property
    def pending(self) -> dict[str, torch.Tensor] | None:
        return self.steps.pending

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, RecordedAdamW):  # it measures and clips inside its update: read after the step
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss = self.loss if self.loss is not None else torch.zeros((), device=pl_module.device)
        norm, bad = measure_gradients(params, loss, self.clip)
        if logs_now(trainer):
            pl_module.log(GRAD_NORM, norm, on_step=True, batch_size=1)
        step = trainer.global_step + 1
        if optimizer.defaults.get("fused"):
            flag_step(optimizer, bad)
            self.steps.record(bad, step, loss, norm)
            return
        self.steps.on_host(optimizer, step, loss, norm, bad)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        for optimizer in trainer.optimizers:  # one that measured its own update, just now
            if isinstance(optimizer, RecordedAdamW) and optimizer.measured is not None:
                loss, norm, bad = optimizer.measured
                if logs_now(trainer):  # a copy: the next replay overwrites the update's outputs before Lightning reads
                    pl_module.log(GRAD_NORM, norm.clone(), on_step=True, batch_size=1)
                self.steps.record(bad, step, loss, norm)
        if step % trainer.log_every_n_steps == 0 or step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.check()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def check(self) -> None:
        """Read the fused path's verdicts back (one wait for the GPU): raise or warn about new ones."""
        self.steps.check()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """No checkpoint from weights that are not finite: an update can overflow (a huge trainer.lr) at a step
        whose loss and gradients were finite. One wait for the GPU per save, which copies to the host anyway."""
        params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        finite = torch.stack([torch.isfinite(p).all() for _, p in params]).tolist()
        if not all(finite):
            bad = [n for (n, _), ok in zip(params, finite, strict=True) if not ok]
            raise NonFiniteLoss(f"after step {trainer.global_step} the trainable weights are not finite ({len(bad)} "
                                f"of {len(params)} tensors, e.g. {bad[0]}): the update overflowed, and no checkpoint "
                                f"was written from them. {self.steps.then()}")
