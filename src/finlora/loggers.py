"""Experiment loggers: W&B (offline unless told otherwise, and never the reason a run stops),
TensorBoard, and always a local CSV."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from finlora.config import LoggerConfig, LoggerKind

log = logging.getLogger(__name__)


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """The CSV logger comes first: Lightning writes its checkpoints under the first logger's folder,
    and the local metrics file is what the run summary and sweep reports read."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="csv")]
    if cfg.kind is LoggerKind.wandb:
        mode = wandb_mode(cfg)
        if mode == "online" and (problem := wandb_unreachable()):
            log.warning("W&B could not start (%s); continuing with W&B offline, metrics in csv/metrics.csv", problem)
            mode = "offline"
        # Under Hydra, W&B's default process start can hang; thread start is the documented fix.
        os.environ.setdefault("WANDB_START_METHOD", "thread")
        os.environ["WANDB_MODE"] = mode
        loggers.append(ResilientWandbLogger(name=run_name, save_dir=str(run_dir), project=cfg.project,
                                            entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), config=config,
                                            offline=mode == "offline"))
    elif cfg.kind is LoggerKind.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def wandb_mode(cfg: LoggerConfig) -> str:
    """Offline unless the user has said otherwise, so a run never stalls asking for a login."""
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why W&B's server cannot be reached, or None. Asked before `wandb.init`, which retries an unreachable
    server for about a minute and a half before it gives up."""
    import wandb

    url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as err:
        return f"cannot reach {url}: {err}"
    return None


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
