"""Lightning internals: the fit loop's optimizer-step count, its accumulation test and its kept loader, the logger
connector's logging decision; torch LR schedulers' last learning rates. Checked on lightning 2.6.6 and torch 2.11 and
2.13."""

from __future__ import annotations

from typing import Any


def steps_taken(trainer: Any) -> int:
    """Optimizer steps done so far in this fit, resumed ones included (`fit_loop.epoch_loop._batches_that_stepped`,
    what Lightning's own `log_every_n_steps` counts)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def accumulating(trainer: Any) -> bool:
    """Whether the current micro-batch is not the last of its optimizer step (`epoch_loop._should_accumulate`)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def logs_this_step(trainer: Any) -> bool | None:
    """Whether Lightning writes this batch's logged values (`_logger_connector.should_update_logs`); None outside a
    Lightning fit (a trainer without a logger connector)."""
    connector = getattr(trainer, "_logger_connector", None)
    return None if connector is None else connector.should_update_logs


def drop_kept_loader(trainer: Any) -> None:
    """Forget the loader the fit loop set up (`fit_loop._combined_loader`), so that it builds one again, after the
    restore of a checkpoint (the position in the epoch included)."""
    trainer.fit_loop._combined_loader = None


def set_last_lr(scheduler: Any, lrs: list[float]) -> None:
    """What `scheduler.get_last_lr()` returns (`_last_lr`), after finlora set the groups' rates itself."""
    scheduler._last_lr = lrs


def set_wandb_mode(logger: Any, mode: str) -> None:
    """The `mode` a WandbLogger passes to `wandb.init` when it starts its run (`WandbLogger._wandb_init`)."""
    logger._wandb_init["mode"] = mode


def set_wandb_run(logger: Any, run: Any) -> None:
    """Replace the run a WandbLogger writes to (`WandbLogger._experiment`), e.g. by W&B's no-op run."""
    logger._experiment = run
