"""Checkpoints that a run resumes from exactly and that a kill never corrupts.

Lightning restores the adapter, optimizer, LR schedule and loop counters on its own. What it lacks, and
this module adds: the place inside the epoch's data order (`ResumableLoader`), random numbers that depend
on the position in training rather than on history (`StepSeed`), writes that are atomic and loads that
never run pickled code (`AtomicCheckpointIO`), when and which checkpoints are kept (`checkpoint_callbacks`),
and which checkpoint a rerun continues from (`resume_path`).
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from finlora.config import CheckpointConfig, ConfigError
from finlora.outputs import atomic_file

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch goes into the checkpoint.

    Lightning saves and restores the state of a training loader that has `state_dict`/`load_state_dict`;
    for any other loader a mid-epoch resume starts the epoch again from its first batch, so the resumed
    run trains on other data than an uninterrupted one. The state is the shuffle generator's state when
    the epoch began and the number of batches handed out since: on resume the epoch's order is drawn again
    from that state and the batches already trained on are skipped as indices, never loaded or collated.
    Samplers that seed themselves from `set_epoch` (Lightning sets the epoch before each) need nothing more.
    torchdata's StatefulDataLoader does the same and more (worker states), but for in-memory datasets
    this is all that is needed, and it keeps a dependency and its torch-version coupling out.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_start: torch.Tensor | None = None
        self._yielded = 0
        self._skip = 0
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self._yielded >= len(self):  # the epoch is over: the next one draws from the generator as it is now
            return {"generator": self._generator_state(), "batches": 0}
        return {"generator": self._epoch_start, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def __iter__(self) -> Iterator[Any]:
        state, self._pending = self._pending, None
        if state is not None and state["generator"] is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        self._epoch_start = self._generator_state()
        self._skip = self._yielded = state["batches"] if state else 0
        iterator = super().__iter__()  # takes `_index_sampler`, with the skip, right now
        self._skip = 0
        return self._counted(iterator)

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return itertools.islice(sampler, self._skip, None) if self._skip else sampler

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch

    def _generator_state(self) -> torch.Tensor | None:
        return self.generator.get_state() if self.generator is not None else None


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, fsynced and renamed into place (a kill mid-save leaves the
    previous file whole), and read with `weights_only=True` (a planted checkpoint cannot run code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_file(Path(path)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None,
                        ) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def checkpoint_callbacks(cfg: CheckpointConfig, ckpt_dir: Path, has_val: bool) -> list[Callback]:
    """Step checkpoints kept `keep_last` deep and the `keep_best` lowest val/loss ones; last.ckpt itself is
    written by `faults.SaveAndStop`, at the optimizer-step boundaries where a resume is exact."""
    callbacks: list[Callback] = []
    if cfg.keep_last:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", monitor="step", mode="max",
                                         save_top_k=cfg.keep_last, every_n_train_steps=cfg.every_n_steps,
                                         auto_insert_metric_name=False))
    if cfg.keep_best and has_val:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step:06d}-loss{val/loss:.4f}",
                                         monitor="val/loss", mode="min", save_top_k=cfg.keep_best,
                                         auto_insert_metric_name=False))
    return callbacks


def resume_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """The checkpoint to continue from: `ckpt_path` as given; for `last`, or nothing given in a run folder
    that already has checkpoints (a rerun), its last.ckpt or else its newest checkpoint. Writes are
    atomic, so any `*.ckpt` there is whole; temporary files of a killed save are removed."""
    if ckpt_path not in (None, "last"):
        return ckpt_path
    for stale in ckpt_dir.glob(".*.tmp"):
        stale.unlink()
    found = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name == LAST, p.stat().st_mtime), reverse=True)
    if found:
        log.warning("resuming from %s", found[0])
        return str(found[0])
    if ckpt_path == "last":
        raise ConfigError(f"ckpt_path=last: no checkpoint in {ckpt_dir} (run in the folder of the run to resume: "
                          "hydra.run.dir=<its folder>)")
    return None


def keep_earlier_rows(loggers: list[Logger], ckpt_path: str) -> None:
    """Lightning's CSV logger deletes metrics.csv when it starts; on resume, the rows logged before the
    checkpoint's step go back in first, so the file holds one curve and the resumed steps continue it."""
    step = torch.load(ckpt_path, mmap=True, weights_only=True, map_location="cpu")["global_step"]
    for lg in loggers:
        path = Path(lg.log_dir) / "metrics.csv" if isinstance(lg, CSVLogger) else None
        if path is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) < step]
            lg.experiment.metrics[:0] = rows
