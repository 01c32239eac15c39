"""What makes a resumed run continue exactly: the training data set up again after the restore (`ReloadData`),
the run's record in every checkpoint and its settings over the checkpoint's (`RunRecord`), random numbers seeded by
the position in training (`StepSeed`), and which step checkpoints are kept (`checkpoint_callbacks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from finlora.checkpoints import RECORD
from finlora.compat.lightning import drop_kept_loader, set_last_lr
from finlora.config import CheckpointConfig


class ReloadData(Callback):
    """On resume, makes the fit loop set its training data up again after the checkpoint is restored.

    Lightning hands a training loader its saved position only while setting the data up after the restore;
    `trainer.estimated_stepping_batches`, which the LR schedule needs in `configure_optimizers`, sets it up
    before the restore, and Lightning then keeps that loader and drops the position. `on_fit_start` runs
    after `configure_optimizers` and before the loops are restored.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            drop_kept_loader(trainer)


class RunRecord(Callback):
    """Puts the run's record (`checkpoints.run_record`: settings, training files, resumes) into every
    checkpoint, what a resume is compared with. On resume, the optimizer keeps this run's learning rates and
    weight decay and the schedule its curve, over the checkpoint's that Lightning restores: where a resume
    changed them (`resume_changes`), the change is what trains, as the record says."""

    def __init__(self, record: dict) -> None:
        self.record = record
        self.fresh: list[list[tuple[float, float]]] = []

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RECORD] = self.record

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # configured, not restored
        self.fresh = [[(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # restored
        if not trainer.ckpt_path:
            return
        for optimizer, fresh in zip(trainer.optimizers, self.fresh, strict=True):
            for group, (lr, decay) in zip(optimizer.param_groups, fresh, strict=True):
                group["initial_lr"], group["weight_decay"] = lr, decay
        for config in trainer.lr_scheduler_configs:  # LambdaLR, as `get_scheduler` makes them: lr = base × f(step)
            s = config.scheduler
            s.base_lrs = [g["initial_lr"] for g in s.optimizer.param_groups]
            lrs = [base * f(s.last_epoch) for base, f in zip(s.base_lrs, s.lr_lambdas, strict=True)]
            set_last_lr(s, lrs)
            for group, lr in zip(s.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr


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
        # the generators this rank draws from, not `torch.manual_seed`, which seeds every device kind torch knows
        # and costs host time for each one not started
        seed = hash((self.seed, trainer.global_rank, trainer.fit_loop.total_batch_idx)) % 2**63
        torch.default_generator.manual_seed(seed)
        if pl_module.device.type == "cuda":
            torch.cuda.default_generators[pl_module.device.index].manual_seed(seed)


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
