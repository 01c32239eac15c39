"""Task data: FinLoRA JSONL files → checked records → train/validation splits → token batches.

Files are read and checked completely before any model is loaded, so a malformed line fails in
seconds with its file and line number rather than after a minute of model loading.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from finlora.batching import LengthGroupedSampler, pack, with_stats
from finlora.checkpoints import ResumableLoader
from finlora.config import Batching, DataConfig, TaskConfig, TestSet
from finlora.prompts import IGNORE_INDEX, Encoded, encode_example

REQUIRED_KEYS = ("context", "target")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a FinLoRA JSONL file, each checked for `context` and `target`."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in REQUIRED_KEYS if k not in record]
            if missing:
                raise DataError(f"{path}:{lineno}: record has no {' or '.join(repr(k) for k in missing)}")
            if not isinstance(record["context"], str):
                raise DataError(f"{path}:{lineno}: 'context' must be a string")
            records.append(record)
    if not records:
        raise DataError(f"{path}: no records (empty data set)")
    return records


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
    rng = random.Random(data.seed)
    shuffled = []
    for rows, _ in sources:
        order = list(range(len(rows)))
        rng.shuffle(order)
        shuffled.append([rows[i] for i in order])
    n_val = _proportional([len(rows) for rows, _ in sources], data.val_size)
    val = [row for rows, k in zip(shuffled, n_val, strict=True) for row in rows[:k]]
    held_out = {row["context"] for row in val}
    train = [row for rows, k, (_, repeat) in zip(shuffled, n_val, sources, strict=True)
             for row in rows[k:] if row["context"] not in held_out for _ in range(repeat)]
    rng.shuffle(train)
    test = [(test_set, read_jsonl(root / test_set.file)) for test_set in task.test]
    if task.train and not train:
        raise DataError(f"task {task.name}: no training rows left after holding out {data.val_size}")
    return TaskData(train, val, test)


def _proportional(sizes: list[int], total: int) -> list[int]:
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
    """Records tokenized once up front; the truncation count is reported in the run summary."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        cache: dict[int, Encoded] = {}  # a mixture repeats rows: encode each distinct one once
        self.items = []
        for record in records:
            key = id(record)
            if key not in cache:
                cache[key] = encode_example(tokenizer, record, max_length)
            self.items.append(cache[key])
        self.num_truncated = sum(e.truncated for e in cache.values())
        self.num_distinct = len(cache)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TaskDataModule(L.LightningDataModule):
    """Training batches as `data.batching` says (validation keeps its order); each carries its `BatchStats`."""

    def __init__(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                 batch_size: int, shuffle_seed: int, num_workers: int = 0) -> None:
        super().__init__()
        self.train_set = EncodedDataset(data.train, tokenizer, cfg.max_length)
        self.val_set = EncodedDataset(data.val, tokenizer, cfg.max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = shuffle_seed
        self.batching = cfg.batching
        self.row_length = cfg.max_length

    def _loader(self, dataset: EncodedDataset, shuffle: bool) -> DataLoader:
        inner = (partial(pack, pad_id=self.pad_id, row_length=self.row_length) if self.batching is Batching.packed
                 else partial(collate, pad_id=self.pad_id))
        grouped = shuffle and self.batching is Batching.grouped
        sampler = (LengthGroupedSampler([len(e.input_ids) for e in dataset.items], self.batch_size, self.seed)
                   if grouped else None)
        return ResumableLoader(dataset, batch_size=self.batch_size, shuffle=shuffle and not grouped,
                               sampler=sampler, num_workers=self.num_workers, collate_fn=partial(with_stats, inner),
                               generator=torch.Generator().manual_seed(self.seed) if shuffle and not grouped else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []
