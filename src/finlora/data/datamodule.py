"""Records → tokens → the Lightning data module: every record encoded once, before the model loads, and the
training and validation loaders built as `data.batching` says (`finlora.batching` makes the tensors).
"""

from __future__ import annotations

import logging
from functools import cached_property, partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from finlora.batching import pack, pack_static, pad_right, static_widths, with_stats
from finlora.config import Batching, DataConfig, TrainPrompt
from finlora.data.loaders import LengthGroupedSampler, ResumableLoader
from finlora.data.sources import SOURCE_KEY
from finlora.data.splits import TaskData
from finlora.errors import DataError
from finlora.prompts import IGNORE_INDEX, Encoded, encode_example

log = logging.getLogger(__name__)


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

    def loader(self, dataset: EncodedDataset, shuffle: bool) -> DataLoader:
        """`dataset`'s batches as `data.batching` says, shuffled (training) or in order (validation)."""
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
        return self.loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.val_set, shuffle=False) if len(self.val_set) else []
