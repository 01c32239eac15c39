"""Every Lightning callback of a training run, and `run_callbacks`, which puts them together.

Resuming exactly (`ReloadData`, `StepSeed`), saving and stopping on a signal (`SaveAndStop`), refusing
non-finite steps (`NonFiniteGuard`), which checkpoints are kept (`checkpoint_callbacks`), and throughput
and progress (`ThroughputLogger`, `progress_bar`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from transformers import PreTrainedTokenizerBase

from finlora.batching import STATS_KEY, BatchStats
from finlora.checkpoints import LAST
from finlora.config import CheckpointConfig, Config, EvalSettings, NonFinitePolicy
from finlora.errors import Interrupted, NonFiniteLoss
from finlora.evaluate import generate, pick_rows
from finlora.metrics import score

log = logging.getLogger(__name__)


@dataclass
class RunCallbacks:
    """The callbacks of a run, in order; `train` reads the stopper and the throughput back after `fit`."""

    stopper: SaveAndStop
    throughput: ThroughputLogger
    all: list[Callback]


def run_callbacks(cfg: Config, ckpt_dir: Path, val_rows: list[dict], tokenizer: PreTrainedTokenizerBase,
                  precision: str) -> RunCallbacks:
    stopper = SaveAndStop(ckpt_dir / LAST, cfg.checkpoint.every_n_steps)
    throughput = ThroughputLogger()
    scoring = ([TaskScore(cfg, val_rows, tokenizer, precision)]
               if cfg.eval.during_training.size and val_rows and cfg.task.test else [])
    return RunCallbacks(stopper, throughput, [
        ReloadData(), StepSeed(cfg.seed), stopper, NonFiniteGuard(cfg.trainer.on_nonfinite_loss, ckpt_dir / LAST),
        *scoring, *checkpoint_callbacks(cfg.checkpoint, ckpt_dir, bool(val_rows)), throughput,
        progress_bar(cfg.trainer.log_every_n_steps)])


class TaskScore(Callback):
    """At every validation, greedy answers on a fixed sample of the held-out rows (`eval.during_training.size`,
    stratified by label), scored as the task's first test set is scored (its kind and labels), and logged
    as `val/<task>/<metric>`: what `checkpoint.monitor` can keep the best adapter by, and a sweep can
    optimize. The loss says how likely the right answer is; this says how often it is the one generated."""

    def __init__(self, cfg: Config, val_rows: list[dict], tokenizer: PreTrainedTokenizerBase, precision: str) -> None:
        self.test_set, self.task = cfg.task.test[0], cfg.task.name
        sample = EvalSettings(limit=cfg.eval.during_training.size, seed=cfg.seed)
        self.rows = [val_rows[i] for i in pick_rows(val_rows, self.test_set, sample)]
        self.tokenizer, self.precision, self.batch_size = tokenizer, precision, cfg.eval.batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        answers = generate(pl_module.model, self.tokenizer, self.rows, self.test_set.max_new_tokens, self.batch_size,
                           self.precision, f"val {self.task}")
        metrics = score(self.test_set.kind, answers, [str(r["target"]) for r in self.rows], self.test_set.labels)
        for name, value in metrics.items():
            if name != "n":
                pl_module.log(f"val/{self.task}/{name}", value, batch_size=len(self.rows))


class ReloadData(Callback):
    """On resume, makes the fit loop set its training data up again after the checkpoint is restored.

    Lightning hands a training loader its saved position only while setting the data up after the restore;
    `trainer.estimated_stepping_batches`, which the LR schedule needs in `configure_optimizers`, sets it up
    before the restore, and Lightning then keeps that loader and drops the position. `on_fit_start` runs
    after `configure_optimizers` and before the loops are restored.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            trainer.fit_loop._combined_loader = None


class StepSeed(Callback):
    """Reseed torch before every training batch from (seed, rank, batch index).

    Dropout's random numbers then depend on where the run is, not on what ran before, so a resumed run
    draws the same masks as an uninterrupted one. Saving the generator's state in the checkpoint would not
    be enough: validation and new loader iterators draw from it between the save and the next batch, and
    they run differently in a run that was resumed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        torch.manual_seed(hash((self.seed, trainer.global_rank, trainer.fit_loop.total_batch_idx)) % 2**63)


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
            print(f"finlora: Ctrl-C again: aborted at once; {self.last} holds the last saved step", file=sys.stderr,
                  flush=True)
            os._exit(128 + signal.SIGINT)  # no cleanup: every file finlora writes is renamed into place whole
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


class NonFiniteGuard(Callback):
    """Checks the loss and the gradients before each optimizer step, after they are averaged over a whole
    accumulation window and over DDP ranks, so every rank decides alike: `stop` raises `NonFiniteLoss`
    before the weights are touched; `skip` drops the gradients, so AdamW leaves the weights and its
    moments as they were. One host sync per step. The norm it checks is logged as `train/grad_norm`."""

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
            pl_module.log("train/grad_norm", norm, on_step=True, batch_size=1)  # before clipping
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
        then = (f"Last good checkpoint: {self.last}. Lower trainer.lr or raise trainer.warmup_steps, then resume "
                "with ckpt_path=last" if self.last.is_file() else "No checkpoint was saved yet, so nothing to resume: "
                "lower trainer.lr or raise trainer.warmup_steps and start the run again")
        raise NonFiniteLoss(f"step {step}: {what}; stopped before it reached the weights. {then}; or set "
                            "trainer.on_nonfinite_loss=skip to drop such steps")


def checkpoint_callbacks(cfg: CheckpointConfig, ckpt_dir: Path, has_val: bool) -> list[Callback]:
    """Step checkpoints kept `keep_last` deep and the `keep_best` best by `monitor`; last.ckpt itself is
    written by `SaveAndStop`, at the optimizer-step boundaries where a resume is exact."""
    callbacks: list[Callback] = []
    if cfg.keep_last:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", monitor="step", mode="max",
                                         save_top_k=cfg.keep_last, every_n_train_steps=cfg.every_n_steps,
                                         auto_insert_metric_name=False))
    if cfg.keep_best and has_val:
        name = f"best-step{{step:06d}}-{cfg.monitor.rsplit('/', 1)[-1]}{{{cfg.monitor}:.4f}}"  # -loss0.1234
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename=name,
                                         monitor=cfg.monitor, mode=cfg.mode, save_top_k=cfg.keep_best,
                                         auto_insert_metric_name=False))
    return callbacks


class ThroughputLogger(L.Callback):
    """Logs `train/padding_fraction` of each batch and `train/tokens_per_s`, the useful (non-padding)
    tokens per second over the last `log_every_n_steps` batches.

    Rates are host time between the ends of training batches: they include data loading and add no GPU
    synchronization. The host can run ahead of the GPU by about one step, which a window of several
    steps averages out. Validation time and the first batch (start-up) are left out.
    """

    def __init__(self) -> None:
        self.tokens = self.slots = self.timed_tokens = 0
        self.seconds = 0.0
        self._last: float | None = None
        self._window: deque[tuple[int, float]] = deque()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window = deque(maxlen=trainer.log_every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats: BatchStats | None = batch.get(STATS_KEY) if isinstance(batch, dict) else None
        if stats is None:
            return
        now = time.perf_counter()
        self.tokens += stats.tokens
        self.slots += stats.slots
        pl_module.log("train/padding_fraction", 1 - stats.tokens / stats.slots, on_step=True, batch_size=1)
        if self._last is not None:
            self.seconds += now - self._last
            self.timed_tokens += stats.tokens
            self._window.append((stats.tokens, now - self._last))
            rate = sum(t for t, _ in self._window) / sum(s for _, s in self._window)
            pl_module.log("train/tokens_per_s", rate, on_step=True, batch_size=1)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def summary(self) -> dict[str, float | None]:
        """The run's padding fraction and useful tokens/s, for metrics.json and the summary table."""
        return {"padding_fraction": 1 - self.tokens / self.slots if self.slots else None,
                "tokens_per_s": self.timed_tokens / self.seconds if self.seconds else None}


def progress_bar(refresh_every: int) -> TQDMProgressBar:
    """A bar that reads its metrics every `refresh_every` batches: reading the loss copies it from the GPU,
    which waits for the step; Lightning's default (rich) bar does that after every batch."""
    return TQDMProgressBar(refresh_rate=refresh_every)
