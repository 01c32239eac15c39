"""Task data: FinLoRA JSONL files → checked records → train/validation splits → loaders of token batches.

Files are read and checked completely before any model is loaded, so a malformed line fails in
seconds with its file and line number rather than after a minute of model loading. The loaders decide
which examples share a batch and in what order (and resume mid-epoch); `finlora.batching` decides the
tensors a batch becomes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from finlora.batching import pack, pack_static, pad_right, static_widths, with_stats
from finlora.config import Batching, DataConfig, TaskConfig, TaskKind, TestSet, TrainPrompt
from finlora.errors import ConfigError, DataError
from finlora.prompts import IGNORE_INDEX, Encoded, encode_example

log = logging.getLogger(__name__)
REQUIRED_KEYS = ("context", "target")
SOURCE_KEY = "_source"  # each record's "file:line", for errors found after reading (an answer too long to fit)
MAX_TRAIN_ROWS = 10_000_000  # training rows (repetitions included) a run prepares: 8 a step for over a million steps
REPEATS_WARNED = 100  # a training row seen more often than this an epoch is warned of


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a FinLoRA JSONL file (UTF-8, a byte-order mark allowed), each checked for a string
    `context` and a non-empty `target`; a number as target is read as its shortest JSON form (1.50 → "1.5").
    Each record also gets its `SOURCE_KEY`."""
    records, non_finite = [], []
    for lineno, record in json_lines(path):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise DataError(f"{path}:{lineno}: record has no {' or '.join(repr(k) for k in missing)}")
        if not isinstance(record["context"], str) or not record["context"].strip():
            raise DataError(f"{path}:{lineno}: 'context' must be a non-empty string")
        if isinstance(record["target"], float) and not math.isfinite(record["target"]):
            non_finite.append(lineno)
        record["target"] = _target(record["target"], f"{path}:{lineno}")
        record[SOURCE_KEY] = f"{path}:{lineno}"
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records (empty data set)")
    if non_finite:
        log.warning("%s: %d target%s NaN or infinite (line %s); the model learns to answer it as text", path,
                    len(non_finite), " is" if len(non_finite) == 1 else "s are", ", ".join(map(str, non_finite[:5])))
    return records


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Each non-blank line of a JSONL file (UTF-8, a byte-order mark allowed) as (line number, JSON object); a line
    that is not one is a `DataError` naming `file:line`."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            except DataError as err:
                raise DataError(f"{path}:{lineno}: {err}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing a key given twice (json keeps the last one without a word)."""
    keys = [k for k, _ in pairs]
    if repeated := sorted({k for k in keys if keys.count(k) > 1}):
        raise DataError(f"duplicate key {', '.join(map(repr, repeated))} in one record")
    return dict(pairs)


def _target(value: object, where: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str) and value.strip():
        return value
    shown = json.dumps(value)[:40]
    raise DataError(f"{where}: 'target' must be a non-empty string (or a number), got {shown}")


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
    root = Path(data_dir)
    sources = [(read_jsonl(root / src.file), src.repeat) for src in task.train]
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
    """Refuse, before any row is copied, training files whose rows × repeat exceed `MAX_TRAIN_ROWS` (repeat:
    100000 hung in making and shuffling 362,800,000 rows), naming the largest repeat of each file that fits."""
    total = sum(n * src.repeat for n, src in zip(sizes, task.train, strict=True))
    if total <= MAX_TRAIN_ROWS:
        return
    problems = [f"task.train[{i}].repeat: {src.file}'s {n:,} rows × {src.repeat} make {total:,} training rows, "
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
    sets = [(test_set, read_jsonl(Path(data_dir) / test_set.file)) for test_set in task.test]
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


class EncodedDataset(Dataset):
    """Records tokenized once up front (before the model loads: an answer too long to fit is refused by its
    file and line), with the training prompt `style`; the truncation count is reported in the run summary."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 style: TrainPrompt = TrainPrompt.plain) -> None:
        cache: dict[int, Encoded] = {}  # a mixture repeats rows: encode each distinct one once
        self.items = []
        for record in records:
            key = id(record)
            if key not in cache:
                try:
                    cache[key] = encode_example(tokenizer, record, max_length, style)
                except DataError as err:
                    raise DataError(f"{record.get(SOURCE_KEY, 'a record')}: {err}") from None
            self.items.append(cache[key])
        self.num_truncated = sum(e.truncated for e in cache.values())
        self.num_distinct = len(cache)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


class TaskDataModule(L.LightningDataModule):
    """Training batches as `data.batching` says (validation keeps its order); each carries its `BatchStats`.
    `pin_memory` (for a GPU): batches copy to the device without the host waiting for the GPU.
    The validation loss uses the training prompt (`data.train_prompt`); every generated score the raw one."""

    def __init__(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                 batch_size: int, shuffle_seed: int, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        if cfg.train_prompt is not TrainPrompt.plain:
            log.warning("data.train_prompt=%s: training (and val/loss) on FinLoRA's [INST] … [/INST] prompt; every "
                        "generated score (in-training and test) uses the raw prompt", cfg.train_prompt.value)
        self.train_set = EncodedDataset(data.train, tokenizer, cfg.max_length, cfg.train_prompt)
        self.val_set = EncodedDataset(data.val, tokenizer, cfg.max_length, cfg.train_prompt)
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = shuffle_seed
        self.batching = cfg.batching
        self.row_length = cfg.max_length
        self.pin_memory = pin_memory
        self.static_widths = static_widths(batch_size, cfg.max_length)

    @cached_property
    def label_slots(self) -> int:
        """A static batch's loss slots: room for the most labels any batch of the data can hold."""
        distinct = {id(e): e for e in self.train_set.items + self.val_set.items}.values()
        return self.batch_size * max((sum(t != IGNORE_INDEX for t in e.labels) for e in distinct), default=1)

    def _loader(self, dataset: EncodedDataset, shuffle: bool) -> DataLoader:
        static = self.batching is Batching.static
        inner = (partial(pack_static, pad_id=self.pad_id, widths=self.static_widths) if static
                 else partial(pack, pad_id=self.pad_id, row_length=self.row_length) if self.batching is Batching.packed
                 else partial(pad_right, pad_id=self.pad_id))
        grouped = shuffle and self.batching is Batching.grouped
        sampler = (LengthGroupedSampler([len(e.input_ids) for e in dataset.items], self.batch_size, self.seed)
                   if grouped else None)
        collate = partial(with_stats, inner, label_slots=self.label_slots if static else None)
        return ResumableLoader(dataset, batch_size=self.batch_size, shuffle=shuffle and not grouped,
                               sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
                               pin_memory=self.pin_memory,
                               generator=torch.Generator().manual_seed(self.seed) if shuffle and not grouped else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []


class LengthGroupedSampler(Sampler[int]):
    """Indices whose consecutive runs of `batch_size` have similar lengths, in a seeded order that changes
    with the epoch (Lightning calls `set_epoch`). Only the last batch of the epoch can be short."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega_batches: int = 64) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start:start + self.mega], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()] + short
        return (i for batch in shuffled for i in batch)


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
