"""The names of the metrics a run logs, in one place: each module that logs a metric takes its name from here,
and the config check of `checkpoint.monitor`, `callbacks.<name>.monitor` and `sweep.objective`
(`Config.logged_metrics`) builds the run's list from the same names, before anything loads (a misspelt name is
refused then, not at the first validation). Imports nothing of finlora: every module may use it."""

from __future__ import annotations

VAL_PREFIX = "val/"  # every validation metric (what `checkpoint.monitor` may name)
TEST_PREFIX = "test/"  # every test set's score
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
VAL_SAMPLES = "val/samples"  # a W&B table of a few generated answers at each validation, not a metric
VAL_SKIPPED = ("n",)  # a validation sample's size is fixed: not logged
# What `metrics.score` returns for each kind of task (`config.TaskKind`'s values), in this order.
SCORE_NAMES = {"label": ("accuracy", "f1", "f1_parsed", "unparsable_rate", "n"),
               "numeric": ("accuracy", "unparsable_rate", "n"),
               "tags": ("accuracy", "n", "n_entities"),
               "text": ("rouge_l_f1", "n")}


def val_score(task: str, name: str) -> str:
    """A task score generated and scored at each validation (`callbacks.TaskScore`)."""
    return f"val/{task}/{name}"


def test_score(test_set: str, name: str) -> str:
    """A test set's score after training, or from `eval.py` (`evaluate.evaluate_sets`)."""
    return f"test/{test_set}/{name}"


def learning_rates(groups: int) -> list[str]:
    """The learning rate of each of AdamW's `groups` parameter groups, as Lightning names them."""
    return [LEARNING_RATE] if groups == 1 else [f"{LEARNING_RATE}/pg{i}" for i in range(1, groups + 1)]


def test_predictions(test_set: str) -> str:
    """A test set's generated answers, logged as a table (`evaluate.evaluate_sets`), not a metric."""
    return f"test/{test_set}/predictions"
