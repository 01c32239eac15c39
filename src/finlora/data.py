"""Task data: rows → checked records → train/validation splits → loaders of token batches.

Rows come from JSONL files read here (FinLoRA's context/target records by default, errors by file and line)
or from anything `datasets` loads (local data files, `save_to_disk` folders, hub data sets; errors by split and
row); a task entry's `columns` maps its rows onto records, and `format: chat` takes {role, content} messages
whose prompt the tokenizer's chat template renders (`finlora.prompts`). Every source is read and checked
completely before any model is loaded, so a malformed row fails in seconds, named, rather than after a
minute of model loading. The loaders decide which examples share a batch and in what order (and resume
mid-epoch); `finlora.batching` decides the tensors a batch becomes.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from finlora.batching import pack, pack_static, pad_right, static_widths, with_stats
from finlora.config import (
    DATA_SUFFIXES,
    Batching,
    DataConfig,
    DatasetSource,
    RecordFormat,
    Rows,
    TaskConfig,
    TaskKind,
    TestSet,
    TrainPrompt,
)
from finlora.errors import ConfigError, DataError
from finlora.prompts import IGNORE_INDEX, INSTRUCTION_PROMPT, MESSAGES, Encoded, encode_example

log = logging.getLogger(__name__)
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # a folder that `save_to_disk` wrote (a DatasetDict, a Dataset)
SOURCE_KEY = "_source"  # each record's "file:line", for errors found after reading (an answer too long to fit)
MAX_TRAIN_ROWS = 10_000_000  # training rows (repetitions included) a run prepares: 8 a step for over a million steps
REPEATS_WARNED = 100  # a training row seen more often than this an epoch is warned of


def read_rows(rows: Rows, data_dir: str | Path, key: str) -> list[dict]:
    """The checked records of one task entry (`key`, e.g. task.train[0]): its JSONL file, read here, or its
    `datasets` source."""
    if rows.file is not None:
        return read_jsonl(Path(data_dir) / rows.file, rows, key)
    return read_source(rows, key)


def read_jsonl(path: Path, rows: Rows | None = None, key: str = "task") -> list[dict]:
    """Every record of a JSONL file (UTF-8, a byte-order mark allowed), each made by `to_record` as `rows`
    says (FinLoRA's context/target by default) and named by its file and line."""
    parsed = list(json_lines(path))
    return checked_records(parsed, rows or Rows(), key, str(path), lambda n: f"{path}:{n}", "line")


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


def read_source(rows: Rows, key: str) -> list[dict]:
    """Every row of a `datasets` source (`rows.source`) as a record, named by its split and row index (from 0).
    The columns `rows.columns` names are checked once, against the ones the data has."""
    src = rows.source
    dataset = load_source(src, f"{key}.source")
    c = rows.columns
    wanted = {"messages": c.messages} if rows.format is RecordFormat.chat else {
        "context": c.context, "target": c.target, **({"instruction": c.instruction} if c.instruction else {})}
    origin = f"{src.path} (split {src.split})"
    for field_name, column in wanted.items():
        if column not in dataset.column_names:
            raise DataError(f"{key}.columns.{field_name}: no column {column!r} in {origin}; its columns: "
                            f"{', '.join(dataset.column_names)}")
    table = dataset.select_columns(list(dict.fromkeys(wanted.values()))).to_list()
    return checked_records(enumerate(table), rows, key, origin, lambda i: f"{origin} row {i}", "row")


def load_source(src: DatasetSource, key: str) -> Any:
    """The split of a `datasets` source: a folder written by `save_to_disk` (`load_from_disk`), a data file or
    folder, or a hub data set (`load_dataset`). `datasets` is imported here only, so a FinLoRA task starts
    without it. Any failure is one line naming `key` (a hub id offline, a wrong split)."""
    import datasets

    path = Path(src.path).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in SAVED_MARKERS):
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if src.split not in saved:
                    raise DataError(f"{key}.split: {src.path} has no split {src.split!r}; its splits: "
                                    f"{', '.join(saved)}")
                return saved[src.split]
            if src.split not in ("train", str(saved.split)):
                raise DataError(f"{key}.split: {src.path} holds one data set (saved from a Dataset, not a "
                                f"DatasetDict), so it has no split {src.split!r}; leave {key}.split unset")
            return saved
        if path.is_file():
            builder = DATA_SUFFIXES[path.suffix.lower()]
            return datasets.load_dataset(builder, data_files=str(path), split=src.split,
                                         **({"features": csv_as_text(path)} if builder == "csv" else {}))
        return datasets.load_dataset(str(path) if path.is_dir() else src.path, src.name, split=src.split,
                                     revision=src.revision)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (ConnectionError offline, ValueError for a split)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "" if src.local else ("; a hub data set needs the network the first time (then it is cached): "
                                      "download it once online, or give a local file or save_to_disk folder")
        raise DataError(f"{key}.path: cannot load {src.path!r} (split {src.split!r}): {first}{where}") from None


def csv_as_text(path: Path) -> Any:
    """Every column of a CSV file as text, as written (pandas would read an answer 007 as 7, 1.50 as 1.5)."""
    import datasets

    with path.open(encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def checked_records(rows: Iterable[tuple[int, dict]], spec: Rows, key: str, origin: str,
                    where: Callable[[int], str], unit: str) -> list[dict]:
    """`to_record` of each (position, row), refusing none at all; NaN or infinite targets are counted in a
    warning naming their positions (`unit`: line or row)."""
    records, non_finite = [], []
    for n, row in rows:
        value = row.get(spec.columns.target) if spec.format is RecordFormat.finlora else None
        if isinstance(value, float) and not math.isfinite(value):
            non_finite.append(n)
        records.append(to_record(row, spec, where(n), key))
    if not records:
        raise DataError(f"{origin}: no records (empty data set)")
    if non_finite:
        log.warning("%s: %d target%s NaN or infinite (%s %s); the model learns to answer it as text", origin,
                    len(non_finite), " is" if len(non_finite) == 1 else "s are", unit,
                    ", ".join(map(str, non_finite[:5])))
    return records


def to_record(row: dict, spec: Rows, where: str, key: str) -> dict:
    """One row as a record: `context` (the prompt; for a chat row its prompt messages as JSON, what identifies it
    for the validation split and the test overlap), `target` (the answer), for a chat row `MESSAGES`, and
    `SOURCE_KEY` (`where`). Columns as `spec.columns` names them; a missing or empty one is refused by `where`."""
    c = spec.columns
    if spec.format is RecordFormat.chat:
        _has(row, [c.messages], where, key, "messages")
        prompt, answer = chat_turns(row[c.messages], c.messages, where)
        return {MESSAGES: prompt, "context": json.dumps(prompt, ensure_ascii=False), "target": answer,
                SOURCE_KEY: where}
    names = [c.context, c.target] + ([c.instruction] if c.instruction else [])
    _has(row, names, where, key, "context, target or instruction")
    context = _text(row[c.context], c.context, where)
    if c.instruction:
        context = INSTRUCTION_PROMPT.format(_text(row[c.instruction], c.instruction, where), context)
    return {"context": context, "target": _target(row[c.target], where, c.target), SOURCE_KEY: where}


def _has(row: dict, names: list[str], where: str, key: str, fields: str) -> None:
    if missing := [n for n in names if n not in row]:
        raise DataError(f"{where}: record has no {' or '.join(map(repr, missing))} (its keys: "
                        f"{', '.join(map(repr, row)) or 'none'}; {key}.columns.<{fields}> name the keys to read)")


def _text(value: object, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {name!r} must be a non-empty string")
    return value


def chat_turns(messages: object, name: str, where: str) -> tuple[list[dict], str]:
    """A chat row's prompt messages (every one before the last) and its answer (the last, the assistant's),
    each message reduced to its role and content."""
    shape = f"{where}: {name!r} must be a list of {{role, content}} messages ending with the assistant's answer"
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{shape}, at least one message before it; got {json.dumps(messages, default=str)[:60]}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{shape}; message {i} is {json.dumps(m, default=str)[:60]}")
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"{shape}; the last one has role {last['role']!r} and content {last['content'][:40]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], last["content"]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing a key given twice (json keeps the last one without a word)."""
    keys = [k for k, _ in pairs]
    if repeated := sorted({k for k in keys if keys.count(k) > 1}):
        raise DataError(f"duplicate key {', '.join(map(repr, repeated))} in one record")
    return dict(pairs)


def _target(value: object, where: str, name: str = "target") -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str) and value.strip():
        return value
    shown = json.dumps(value, default=str)[:40]
    raise DataError(f"{where}: {name!r} must be a non-empty string (or a number), got {shown}")


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
    """Refuse, before any row is copied, training files whose rows × repeat exceed `MAX_TRAIN_ROWS` (repeat:
    100000 hung in making and shuffling 362,800,000 rows), naming the largest repeat of each file that fits."""
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
    The validation loss uses the training prompt (`data.train_prompt`); every generated score `eval.prompt`."""

    def __init__(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                 batch_size: int, shuffle_seed: int, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        if cfg.train_prompt is not TrainPrompt.plain:
            log.warning("data.train_prompt=%s: training (and val/loss) on FinLoRA's [INST] … [/INST] prompt; every "
                        "generated score (in-training and test) uses eval.prompt (raw unless set)",
                        cfg.train_prompt.value)
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
