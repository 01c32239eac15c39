"""Experiment loggers: W&B (offline unless told otherwise), TensorBoard, and always a local CSV."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from finlora.config import LoggerConfig, LoggerKind, wandb_mode
from finlora.faults import ResilientWandbLogger


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """The CSV logger comes first: Lightning writes its checkpoints under the first logger's folder,
    and the local metrics file is what the run summary and sweep reports read."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="csv")]
    if cfg.kind is LoggerKind.wandb:
        mode = wandb_mode(cfg)
        # Under Hydra, W&B's default process start can hang; thread start is the documented fix.
        os.environ.setdefault("WANDB_START_METHOD", "thread")
        os.environ["WANDB_MODE"] = mode
        loggers.append(ResilientWandbLogger(name=run_name, save_dir=str(run_dir), project=cfg.project,
                                            entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), config=config,
                                            offline=mode == "offline"))
    elif cfg.kind is LoggerKind.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def log_summary(loggers: list[Logger], summary: dict) -> None:
    """End-of-run figures into the W&B run summary, where sweep and parallel-coordinate views read them."""
    for lg in loggers:
        if isinstance(lg, ResilientWandbLogger):
            lg.update_summary({k: v for k, v in summary.items() if v is not None})


def log_predictions(loggers: list[Logger], key: str, rows: list[dict]) -> None:
    """Per-example predictions as a W&B table (the JSONL file next to the metrics is the local copy)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and rows:
            columns = list(rows[0])
            lg.log_table(key=key, columns=columns, data=[[row[c] for c in columns] for row in rows])


def finish(loggers: list[Logger]) -> None:
    """Close the W&B run, so the next job of a multirun starts a run of its own."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
