"""Every Lightning callback of a training run, and `run_callbacks`, which puts them together: resuming exactly
(`resume`), faults (`faults`: signals, non-finite steps), scores at validation (`scoring`), throughput and progress
(`progress`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import PreTrainedTokenizerBase

from finlora.callbacks.faults import NonFiniteGuard, SaveAndStop, StopVote
from finlora.callbacks.progress import StepProfile, StepProgressBar, ThroughputLogger
from finlora.callbacks.resume import ReloadData, RunRecord, StepSeed, checkpoint_callbacks
from finlora.callbacks.scoring import SAMPLES_DIR, TaskScore
from finlora.checkpoints import LAST
from finlora.config import Compile, Config
from finlora.loggers import LastStepLogs

__all__ = ["SAMPLES_DIR", "NonFiniteGuard", "ReloadData", "RunCallbacks", "RunRecord", "SaveAndStop", "StepProfile",
           "StepProgressBar", "StepSeed", "StopVote", "TaskScore", "ThroughputLogger", "checkpoint_callbacks",
           "run_callbacks"]


@dataclass
class RunCallbacks:
    """The callbacks of a run, in order; `train` reads the stopper, throughput, profile and the best checkpoint
    (`best`: None when none is kept) back after `fit`."""

    stopper: SaveAndStop
    throughput: ThroughputLogger
    profile: StepProfile
    best: ModelCheckpoint | None
    all: list[Callback]


def run_callbacks(cfg: Config, ckpt_dir: Path, val_rows: list[dict], tokenizer: PreTrainedTokenizerBase,
                  precision: str, record: dict) -> RunCallbacks:
    """In the order their hooks run: the profile first (its window must close before anything else reads
    the GPU at a step's end), the guard before the stopper (it reads its verdicts back before a save),
    `LastStepLogs` last (the others read `log_every_n_steps` as set)."""
    stopper = SaveAndStop(ckpt_dir / LAST, cfg.checkpoint.every_n_steps)
    # the batches of each shape that compile or record: cudagraphs records at its second call, capture at its first
    warm_up = max({Compile.eager: 0, Compile.inductor: 1, Compile.cudagraphs: 2}[cfg.trainer.compile],
                  int(cfg.trainer.capture))
    throughput = ThroughputLogger(warm_up)
    profile = StepProfile(throughput)
    during = cfg.eval.during_training
    scoring = ([TaskScore(cfg, val_rows, tokenizer, precision)]
               if (during.size or during.samples) and val_rows and cfg.task.test and cfg.trainer.strategy != "fsdp"
               else [])
    guard = NonFiniteGuard(cfg.trainer.on_nonfinite_loss, ckpt_dir / LAST, cfg.checkpoint.every_n_steps,
                           cfg.trainer.grad_clip)
    kept = checkpoint_callbacks(cfg.checkpoint, ckpt_dir, bool(val_rows))
    best = next((c for c in kept if c.monitor == cfg.checkpoint.monitor), None)
    return RunCallbacks(stopper, throughput, profile, best, [
        profile, ReloadData(), RunRecord(record), StepSeed(cfg.seed), guard, stopper, *scoring, *kept, throughput,
        StepProgressBar(), LastStepLogs()])
