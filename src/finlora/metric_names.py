"""The names of the metrics a run logs, in one place: each module that logs a metric takes its name from here,
and the config check of `checkpoint.monitor`, `callbacks.<name>.monitor` and `sweep.objective` compares them
with `logged(cfg)`, built from the same names, before anything loads (a misspelt name is refused then, not
at the first validation)."""

from __future__ import annotations

from difflib import get_close_matches
from typing import TYPE_CHECKING

from finlora.metrics import SCORE_NAMES

if TYPE_CHECKING:
    from finlora.config import Config

TRAIN_LOSS = "train/loss"
ANSWER_TOKENS = "train/answer_tokens"
GRAD_NORM = "train/grad_norm"
PADDING_FRACTION = "train/padding_fraction"
TOKENS_PER_S = "train/tokens_per_s"
TRAIN = (TRAIN_LOSS, ANSWER_TOKENS, GRAD_NORM, PADDING_FRACTION, TOKENS_PER_S)
VAL_LOSS = "val/loss"
# Lightning's LearningRateMonitor names the learning rate after the schedule (`module.configure_optimizers` names
# it so): the same name whichever AdamW class runs; `/pg1`, `/pg2` follow when there are several groups
LEARNING_RATE = "lr-AdamW"
VAL_SKIPPED = ("n",)  # a validation sample's size is fixed: not logged


def val_score(task: str, name: str) -> str:
    """A task score generated and scored at each validation (`callbacks.TaskScore`)."""
    return f"val/{task}/{name}"


def test_score(test_set: str, name: str) -> str:
    """A test set's score after training, or from `eval.py` (`evaluate.evaluate_sets`)."""
    return f"test/{test_set}/{name}"


def learning_rates(groups: int) -> list[str]:
    """The learning rate of each of AdamW's `groups` parameter groups, as Lightning names them."""
    return [LEARNING_RATE] if groups == 1 else [f"{LEARNING_RATE}/pg{i}" for i in range(1, groups + 1)]


def logged(cfg: Config) -> list[str]:
    """Every metric a training run with this config logs: the training step's, the learning rates, the
    validation loss with a validation split, the task's scores with in-training scoring, and each test set's
    with a test stage."""
    groups = 2 if cfg.adapter.magnitude_lr_scale != 1 else 1  # `module.param_groups`
    names = [*TRAIN, *learning_rates(groups)]
    if cfg.data.val_size > 0:
        names.append(VAL_LOSS)
    if cfg.scores_in_training:
        test_set = cfg.task.test[0]  # what TaskScore scores by
        names += [val_score(cfg.task.name, n) for n in SCORE_NAMES[test_set.kind] if n not in VAL_SKIPPED]
    if cfg.tests_after_training:
        names += [test_score(t.name, n) for t in cfg.task.test for n in SCORE_NAMES[t.kind]]
    return names


def problems(key: str, metric: str, cfg: Config, validation: bool = False) -> list[str]:
    """Why `metric`, the value of `key`, names no metric this run logs (`validation`: none of its validation
    metrics), with the closest names it does log."""
    every = logged(cfg)
    names = [n for n in every if n.startswith("val/") or not validation]
    if metric in names:
        return []
    if not names:
        return [f"{key}: this run logs no validation metric, so not {metric!r} (validation needs data.val_size > 0)"]
    close = get_close_matches(metric, names, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"it logs {', '.join(names)}"
    if metric in every:  # logged, but not at validation
        return [f"{key}: {metric!r} is not a validation metric; {hint}"]
    return [f"{key}: this run does not log {metric!r}; {hint}"]
