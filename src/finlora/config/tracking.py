"""What a run keeps and reports: checkpoints, loggers, folders, and the metric a sweep optimizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from finlora import metric_names as names
from finlora.config.checks import check
from finlora.config.enums import Direction


@dataclass
class CheckpointConfig:
    """last.ckpt (adapter, optimizer, schedule, loop and data position) is always the newest."""

    every_n_steps: int = 50  # write last.ckpt every N optimizer steps (and at the end, and on SIGTERM / Ctrl-C)
    keep_last: int = 0  # step-NNNNNN.ckpt files kept besides last.ckpt; older ones are deleted
    keep_best: int = 1  # best-*.ckpt files kept by `monitor` (0: none; needs data.val_size > 0)
    monitor: str = names.VAL_LOSS  # or a task score logged during training, e.g. val/sentiment/accuracy
    mode: str = "min"  # min | max: which end of `monitor` is best

    def problems(self) -> list[str]:
        problems: list[str] = []
        check(problems, self.every_n_steps > 0, "checkpoint.every_n_steps", f"must be > 0, got {self.every_n_steps}")
        check(problems, self.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")
        check(problems, self.keep_best >= 0, "checkpoint.keep_best", f"must be >= 0, got {self.keep_best}")
        check(problems, self.mode in ("min", "max"), "checkpoint.mode", f"must be min or max, got {self.mode!r}")
        return problems


@dataclass
class LoggerConfig:
    """Where metrics go besides the CSV log that every run keeps: each tracker its own switch, so that the
    logger group's options combine (`logger=[wandb,tensorboard]` sets both)."""

    wandb: bool = False  # Weights & Biases (`logger=wandb`, train.py's default); the keys below are its settings
    tensorboard: bool = False  # TensorBoard event files in <run dir>/tensorboard (`logger=tensorboard`)
    project: str = "finlora"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; null: WANDB_MODE, else online with a key, else offline
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        problems: list[str] = []
        check(problems, self.mode in (None, "online", "offline", "disabled"), "logger.mode",
               f"must be null, online, offline or disabled, got {self.mode!r}")
        return problems


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "???"  # FinLoRA's data, with train/ and test/
    cache_dir: str = "???"  # converted embedded models
    compile_cache: str = "???"  # torch.compile's kernels (trainer.compile), shared by the jobs of a sweep


@dataclass
class SweepConfig:
    """What a hyperparameter search (`hydra/sweeper=optuna`) optimizes: `train.py` returns this metric's value
    at the end of the run, and a sweep job that did not log it fails, saying why."""

    objective: str | None = None  # a metric the run logs (`finlora.metric_names`): val/fpb/accuracy, …; null: val/loss
    direction: Direction = Direction.minimize

    @property
    def metric(self) -> str:
        return self.objective or names.VAL_LOSS  # unchecked by default: a run without validation has no val/loss
