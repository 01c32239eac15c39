"""Experiment loggers: W&B (offline unless told otherwise, and never the reason a run stops; one W&B run per
run folder, resumed when the run is), TensorBoard, either or both, and always a local CSV. Each gets the run's
config as its hyperparameters, and the end-of-run figures."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from finlora.compat.lightning import logs_this_step, set_wandb_mode, set_wandb_run, steps_taken
from finlora.config import LoggerConfig
from finlora.outputs import write_text

log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb_id.txt"  # in the run folder: the W&B run that a rerun in the same folder resumes


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """The CSV logger comes first: Lightning writes its checkpoints under the first logger's folder,
    and the local metrics file is what the run summary and sweep reports read."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="csv")]
    if cfg.wandb:
        mode = wandb_mode(cfg)
        if mode == "online" and (problem := wandb_unreachable()):
            log.warning("W&B could not start (%s); continuing with W&B offline, metrics in csv/metrics.csv", problem)
            mode = "offline"
        # Under Hydra, W&B's default process start can hang; thread start is the documented fix.
        os.environ.setdefault("WANDB_START_METHOD", "thread")
        os.environ["WANDB_MODE"] = mode
        loggers.append(ResilientWandbLogger(name=run_name, save_dir=str(run_dir), project=cfg.project,
                                            entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), config=config,
                                            offline=mode == "offline", id=wandb_run_id(run_dir), resume="allow"))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
    for lg in loggers:
        if not isinstance(lg, WandbLogger):  # W&B has the config from its start
            lg.log_hyperparams(config)  # hparams.yaml; TensorBoard's hparams view gets it with the final metrics
    return loggers


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, made and kept on the first start: a resumed run (or a failed sweep
    job rerun in its folder) continues its W&B run instead of starting another."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own form
    write_text(path, run_id + "\n")
    return run_id


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
    """End-of-run figures into the W&B run summary, where sweep and parallel-coordinate views read them, and
    into TensorBoard's hparams view beside the hyperparameters."""
    for lg in loggers:
        if isinstance(lg, ResilientWandbLogger):
            lg.update_summary({k: v for k, v in summary.items() if v is not None})
        elif isinstance(lg, TensorBoardLogger):
            numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, int | float)}
            lg.log_hyperparams(dict(lg.hparams), metrics=numbers)


def log_adapter(loggers: list[Logger], folder: Path, name: str, metadata: dict) -> None:
    """The saved adapter (or model) folder as a W&B artifact of type `model`; an offline run keeps it for
    `wandb sync`."""
    for lg in loggers:
        if isinstance(lg, ResilientWandbLogger):
            lg.log_folder(folder, name, metadata)


def log_predictions(loggers: list[Logger], key: str, rows: list[dict]) -> None:
    """Per-example predictions as a W&B table (the JSONL file next to the metrics is the local copy)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and rows:
            columns = list(rows[0])
            lg.log_table(key=key, columns=columns, data=[[row[c] for c in columns] for row in rows])


def finish(loggers: list[Logger]) -> None:
    """Write what the loggers still hold (the test metrics reach the CSV log here) and close the W&B run, so
    the next job of a multirun starts a run of its own."""
    for lg in loggers:
        lg.save()
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
                set_wandb_mode(self, fallback)
                os.environ["WANDB_MODE"] = fallback
        return super().experiment  # W&B's disabled mode is a no-op run that cannot fail

    def _give_up(self, err: Exception) -> None:
        import wandb

        log.warning("W&B failed mid-run (%s: %s); training goes on, metrics stay in csv/metrics.csv",
                    type(err).__name__, err)
        set_wandb_run(self, wandb.init(mode="disabled"))

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

    def log_folder(self, folder: Path, name: str, metadata: dict) -> None:
        import wandb

        try:
            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "-", name), type="model", metadata=metadata)
            artifact.add_dir(str(folder))
            self.experiment.log_artifact(artifact)
        except Exception as err:
            self._give_up(err)

    def update_summary(self, values: dict[str, Any]) -> None:
        try:
            self.experiment.summary.update(values)
        except Exception as err:
            self._give_up(err)


def logs_now(trainer: Any) -> bool:
    """Whether what a training batch logs reaches anyone: Lightning writes the values every `log_every_n_steps`
    optimizer steps (`compat.lightning.logs_this_step`, true for each micro-batch of such a step), and the run's
    summary reads the last batch's. Logged at any other batch, a value is overwritten unseen after Lightning has
    spent host time on it, which a host-bound step cannot spare. Outside a Lightning fit (a hook called by itself),
    always."""
    logs = logs_this_step(trainer)
    if logs is None:
        return True
    return logs or ends_fit(trainer, steps_taken(trainer) + 1)


def ends_fit(trainer: Any, steps: int) -> bool:
    """Whether the fit ends with the current batch, `steps` being the optimizer steps done once it is: the last
    step (`trainer.max_steps`), or the last batch of the last epoch."""
    return steps == trainer.max_steps or (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                                          and trainer.current_epoch + 1 >= (trainer.max_epochs or 1))


class LastStepLogs(Callback):
    """Has Lightning write the last step's values (those `logs_now` logs it for, and the learning rate, which
    Lightning's LearningRateMonitor logs as a logging step starts): it writes a step's logs only every
    `log_every_n_steps` steps, so a run ending between two lost its last values, and one shorter than that with
    no validation (`trainer.max_steps=1`) wrote no csv/metrics.csv at all. Set from the last step's start (its
    first micro-batch; at the end of an epoch, its last), put back before anything else reads it (validation,
    the fit's end)."""

    def __init__(self) -> None:
        self._every: int | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (self._every is None and trainer.log_every_n_steps and not logs_this_step(trainer)
                and ends_fit(trainer, steps_taken(trainer) + 1)):
            self._every, trainer.log_every_n_steps = trainer.log_every_n_steps, 1

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._restore(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore(trainer)

    def _restore(self, trainer: Any) -> None:
        if self._every is not None:
            trainer.log_every_n_steps, self._every = self._every, None
