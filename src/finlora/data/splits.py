"""Records → a task's training, validation and test rows: validation held out in proportion to each file,
repetitions applied, and the checks that need every file at once (too many rows, repeated rows, targets outside
the labels, training rows that are also test rows).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from finlora.config import DataConfig, TaskConfig, TaskKind, TestSet
from finlora.data.sources import SOURCE_KEY, read_rows
from finlora.errors import ConfigError, DataError

log = logging.getLogger(__name__)
MAX_TRAIN_ROWS = 10_000_000  # training rows (repetitions included) a run prepares: 8 a step for over a million steps
REPEATS_WARNED = 100  # a training row seen more often than this an epoch is warned of


@dataclass
class TaskData:
    """The records of one task: training rows (repetitions applied), validation rows, and the rows of
    each test set."""

    train: list[dict]
    val: list[dict]
    test: list[tuple[TestSet, list[dict]]]


def load_task(task: TaskConfig, data: DataConfig, data_dir: str | Path) -> TaskData:
    """Read a task's files and hold out validation rows.

    Validation rows are drawn from each file before its repetition, in proportion to its size (largest
    remainders, so exactly `data.val_size` in all), and any training row whose context is also a
    validation row is dropped, so a mixture never validates on a text it trains on.
    """
    sources = [(read_rows(src, data_dir, f"task.train[{i}]"), src.repeat) for i, src in enumerate(task.train)]
    check_size(task, [len(rows) for rows, _ in sources])
    rng = random.Random(data.seed)
    shuffled = []
    for rows, _ in sources:
        order = list(range(len(rows)))
        rng.shuffle(order)
        shuffled.append([rows[i] for i in order])
    n_val = proportional([len(rows) for rows, _ in sources], data.val_size)
    val = [row for rows, k in zip(shuffled, n_val, strict=True) for row in rows[:k]]
    held_out = {row["context"] for row in val}
    train = [row for rows, k, (_, repeat) in zip(shuffled, n_val, sources, strict=True)
             for row in rows[k:] if row["context"] not in held_out for _ in range(repeat)]
    warn_repeats(task.name, [(rows[k:], repeat) for rows, k, (_, repeat) in zip(shuffled, n_val, sources, strict=True)],
                 held_out)
    rng.shuffle(train)
    test = load_test_sets(task, data_dir)
    if task.train and not train:
        raise DataError(f"task {task.name}: no training rows left after holding out {data.val_size}")
    distinct = [row for rows, _ in sources for row in rows]
    warn_unknown_labels(task, distinct)
    check_overlap(distinct, test, data.allow_test_overlap)
    return TaskData(train, val, test)


def check_size(task: TaskConfig, sizes: list[int]) -> None:
    """Refuse, before any row is copied, training files whose rows × repeat exceed `MAX_TRAIN_ROWS` (a run would
    hang making and shuffling them), naming the largest repeat of each file that fits."""
    total = sum(n * src.repeat for n, src in zip(sizes, task.train, strict=True))
    if total <= MAX_TRAIN_ROWS:
        return
    problems = [f"task.train[{i}].repeat: {src.origin}'s {n:,} rows × {src.repeat} make {total:,} training rows, "
                f"more than the {MAX_TRAIN_ROWS:,} a run prepares; "
                f"repeat ≤ {(MAX_TRAIN_ROWS - total + n * src.repeat) // n} fits"
                for i, (n, src) in enumerate(zip(sizes, task.train, strict=True)) if src.repeat > 1]
    raise ConfigError.listing(problems or [f"task.train: {total:,} training rows, more than the {MAX_TRAIN_ROWS:,} a "
                                           "run prepares"])


def warn_repeats(name: str, kept: list[tuple[list[dict], int]], held_out: set[str]) -> None:
    """One warning line for training rows an epoch shows more than `REPEATS_WARNED` times (a file's copies
    times its repeat, over every file): rows a model learns by heart."""
    seen: Counter[str] = Counter()
    first: dict[str, str] = {}
    for rows, repeat in kept:
        for row in rows:
            if row["context"] not in held_out:
                seen[row["context"]] += repeat
                first.setdefault(row["context"], row[SOURCE_KEY])
    if often := [c for c, n in seen.items() if n > REPEATS_WARNED]:
        most = max(often, key=seen.__getitem__)
        log.warning("task %s: %d training row%s more than %d times each (%d at most, %s); repeat or copies in the "
                    "file", name, len(often), " occurs" if len(often) == 1 else "s occur", REPEATS_WARNED, seen[most],
                    first[most])


def load_test_sets(task: TaskConfig, data_dir: str | Path) -> list[tuple[TestSet, list[dict]]]:
    """Each test set of a task with its records. A label set's targets must be among its `labels`: any other
    could never be predicted, and would score 0% without a word."""
    sets = [(test_set, read_rows(test_set, data_dir, f"task.test[{i}]")) for i, test_set in enumerate(task.test)]
    for test_set, records in sets:
        if outside := _outside(records, test_set.labels if test_set.kind is TaskKind.label else []):
            raise DataError(f"{len(outside)} targets of test set {test_set.name} are not among its labels "
                            f"{test_set.labels} (e.g. {_examples(outside)}); fix the file or the task's labels")
    return sets


def warn_unknown_labels(task: TaskConfig, train: list[dict]) -> None:
    """Training targets outside the labels of a task whose test sets are all label sets: counted per target and
    warned about (a mixture may train on more answers than it tests), never refused."""
    if not task.test or any(t.kind is not TaskKind.label for t in task.test):
        return
    labels = sorted({label for t in task.test for label in t.labels})
    if outside := _outside(train, labels):
        counts = Counter(row["target"] for row in outside)
        log.warning("%d of %d training rows have targets outside the test labels %s (%s; e.g. %s)", len(outside),
                    len(train), labels, ", ".join(f"{t!r}: {n}" for t, n in counts.most_common(5)), _examples(outside))


def check_overlap(train: list[dict], test: list[tuple[TestSet, list[dict]]], allowed: bool) -> None:
    """Refuse training rows whose context is also a test row's (the test would score memorized answers), unless
    `data.allow_test_overlap`; then they are counted in a warning."""
    tested = {row["context"]: row[SOURCE_KEY] for _, records in test for row in records}
    shared = [row for row in train if row["context"] in tested]
    if not shared:
        return
    first = f"{shared[0][SOURCE_KEY]} = {tested[shared[0]['context']]}"
    if not allowed:
        raise DataError(f"{len(shared)} of {len(train)} training rows are also test rows (e.g. {first}); remove them "
                        "from the training file, or set data.allow_test_overlap=true to train on them anyway")
    log.warning("data.allow_test_overlap: %d of %d training rows are also test rows (e.g. %s)", len(shared),
                len(train), first)


def _outside(records: list[dict], labels: list[str]) -> list[dict]:
    """Records whose target is none of `labels` (compared as scoring does: stripped, lower-cased)."""
    known = {label.strip().lower() for label in labels}
    return [row for row in records if row["target"].strip().lower() not in known] if known else []


def _examples(records: list[dict], most: int = 3) -> str:
    return ", ".join(f"{row[SOURCE_KEY]}: {row['target']!r}" for row in records[:most])


def proportional(sizes: list[int], total: int) -> list[int]:
    """Split `total` over `sizes` in proportion, by largest remainders, never more than a size."""
    grand = sum(sizes)
    total = min(total, grand)
    if not grand:
        return [0] * len(sizes)
    exact = [total * n / grand for n in sizes]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
