"""What a run does when something goes wrong: a signal, a non-finite loss, GPU memory, W&B, a leaked token.

The aim is that a fault costs at most the work since the last checkpoint and never leaves a broken
result behind; each one ends in a `RunFault` whose message says what happened and what to do next.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import CheckpointIO

from finlora.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    ReloadData,
    StepSeed,
    checkpoint_callbacks,
    keep_earlier_rows,
    resume_path,
)
from finlora.config import Config, NonFinitePolicy

log = logging.getLogger(__name__)


class RunFault(RuntimeError):
    """Training stopped for a reason the message explains; `exit_code` is what the process returns."""

    exit_code = 3


class NonFiniteLoss(RunFault):
    pass


class OutOfMemory(RunFault):
    pass


class Interrupted(RunFault):
    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


@dataclass
class Guards:
    """What `train` hands Lightning so that a fault costs little: callbacks, the atomic checkpoint IO, and
    the checkpoint to continue from."""

    stopper: SaveAndStop
    callbacks: list[Callback]
    plugins: list[CheckpointIO]
    ckpt_path: str | None


def guards(cfg: Config, run_dir: Path, has_val: bool, loggers: list[Logger]) -> Guards:
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = resume_path(cfg.ckpt_path, ckpt_dir)
    if ckpt_path:
        keep_earlier_rows(loggers, ckpt_path)
    stopper = SaveAndStop(ckpt_dir / LAST, cfg.checkpoint.every_n_steps)
    callbacks = [ReloadData(), StepSeed(cfg.seed), stopper,
                 NonFiniteGuard(cfg.trainer.on_nonfinite_loss, ckpt_dir / LAST),
                 *checkpoint_callbacks(cfg.checkpoint, ckpt_dir, has_val)]
    return Guards(stopper, callbacks, [AtomicCheckpointIO()], ckpt_path)


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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: saving a checkpoint after this optimizer step, then stopping (Ctrl-C again aborts)",
                    signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        stop = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        epoch_loop = trainer.fit_loop.epoch_loop
        final = trainer.global_step == trainer.max_steps or (
            epoch_loop.batch_progress.is_last_batch and trainer.current_epoch + 1 >= (trainer.max_epochs or 1))
        if stop or final or trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.last)
        if stop:
            trainer.should_stop = True

    def interrupted(self, step: int) -> Interrupted | None:
        """The fault to end the run with if a signal stopped it."""
        if self.signum is None:
            return None
        name = signal.Signals(self.signum).name
        return Interrupted(f"stopped by {name} after step {step}; {self.last} holds it: rerun in the same folder "
                           "(hydra.run.dir=<run folder>) or pass ckpt_path=last to continue", self.signum)


class NonFiniteGuard(Callback):
    """Checks the loss and the gradients before each optimizer step, after they are averaged over a whole
    accumulation window and over DDP ranks, so every rank decides alike: `stop` raises `NonFiniteLoss`
    before the weights are touched; `skip` drops the gradients, so AdamW leaves the weights and its
    moments as they were. One host sync per step."""

    def __init__(self, policy: NonFinitePolicy, last: Path) -> None:
        self.policy = policy
        self.last = last
        self.loss: torch.Tensor | None = None
        self.skipped = 0

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if bool(torch.isfinite(norm)) and (self.loss is None or bool(torch.isfinite(self.loss))):
            return
        step = trainer.global_step + 1
        what = f"loss {self.loss.item()}" if self.loss is not None and not torch.isfinite(self.loss) else (
            f"gradient norm {norm.item()}")
        if self.policy is NonFinitePolicy.skip:
            self.skipped += 1
            log.warning("step %d: %s; skipped this optimizer step (%d so far)", step, what, self.skipped)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        last = str(self.last) if self.last.is_file() else "none yet (the run had not saved one)"
        raise NonFiniteLoss(f"step {step}: {what}; stopped before it reached the weights. Last good checkpoint: "
                            f"{last}. Lower trainer.lr or raise trainer.warmup_steps, then resume with "
                            "ckpt_path=last; or set trainer.on_nonfinite_loss=skip to drop such steps")


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Refuse to write an adapter whose trainable weights are not all finite."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLoss(f"after step {step}, {len(bad)} trainable tensors are not finite (e.g. {bad[0]}); "
                            "the adapter was not written")


def oom_advice(cfg: Config, stage: str) -> OutOfMemory:
    """An `OutOfMemory` naming the overrides that lower memory from where this run stands."""
    t = cfg.trainer
    if stage == "eval":
        tips = [f"eval.batch_size={max(cfg.eval.batch_size // 2, 1)}"]
    else:
        tips = [f"trainer.batch_size={t.batch_size // 2} trainer.grad_accum={t.grad_accum * 2} (same effective batch)"
                if t.batch_size > 1 else f"data.max_length={cfg.data.max_length // 2}"]
        if not t.gradient_checkpointing:
            tips.append("trainer.gradient_checkpointing=true")
        if cfg.quant.bits != 4 and cfg.adapter.method.value != "none":
            tips.append("quant=4bit")
    return OutOfMemory(f"out of GPU memory during {stage}; try " + ", or ".join(tips)
                       + ("; then ckpt_path=last continues from the last checkpoint" if stage == "training" else ""))


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger whose trouble never stops training. If the run cannot start online (no network, no
    key) it starts offline; if not even that, or if W&B fails mid-run, it carries on as W&B's own no-op
    run and the CSV log keeps every metric. Each fallback is said once, as a warning."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        for fallback in ("offline", "disabled"):
            try:
                return super().experiment
            except Exception as err:
                log.warning("W&B could not start (%s: %s); continuing with W&B %s, metrics in csv/metrics.csv",
                            type(err).__name__, err, fallback)
                self._wandb_init["mode"] = fallback
                os.environ["WANDB_MODE"] = fallback
        return super().experiment  # W&B's disabled mode is a no-op run that cannot fail

    def _give_up(self, err: Exception) -> None:
        import wandb

        log.warning("W&B failed mid-run (%s: %s); training goes on, metrics stay in csv/metrics.csv",
                    type(err).__name__, err)
        self._experiment = wandb.init(mode="disabled")

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().log_metrics(*args, **kwargs)
        except Exception as err:
            self._give_up(err)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().log_hyperparams(*args, **kwargs)
        except Exception as err:
            self._give_up(err)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().log_table(*args, **kwargs)
        except Exception as err:
            self._give_up(err)

    def update_summary(self, values: dict[str, Any]) -> None:
        try:
            self.experiment.summary.update(values)
        except Exception as err:
            self._give_up(err)
