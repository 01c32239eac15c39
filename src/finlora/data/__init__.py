"""Task data: rows → checked records → train/validation splits → loaders of token batches.

Every source is read and checked completely before any model is loaded, so a malformed row fails in seconds,
named, rather than after the model has loaded. One module a step, in data-path order:

- `sources`: a task entry's rows (JSONL or `datasets`) as checked records, each named by its file and line.
- `splits`: a task's records as training, validation and test rows, with the checks across files.
- `datamodule`: the records tokenized once, and the Lightning data module that batches them.
- `loaders`: the order of an epoch's examples, and the loader that resumes mid-epoch.
"""

from finlora.data.datamodule import EncodedDataset, TaskDataModule
from finlora.data.loaders import LengthGroupedSampler, ResumableLoader
from finlora.data.sources import (
    SAVED_MARKERS,
    SOURCE_KEY,
    chat_turns,
    checked_records,
    csv_as_text,
    json_lines,
    load_source,
    read_jsonl,
    read_rows,
    read_source,
    to_record,
)
from finlora.data.splits import (
    MAX_TRAIN_ROWS,
    REPEATS_WARNED,
    TaskData,
    check_overlap,
    check_size,
    load_task,
    load_test_sets,
    proportional,
    warn_repeats,
    warn_unknown_labels,
)

__all__ = [
    "MAX_TRAIN_ROWS", "REPEATS_WARNED", "SAVED_MARKERS", "SOURCE_KEY", "EncodedDataset", "LengthGroupedSampler",
    "ResumableLoader", "TaskData", "TaskDataModule", "chat_turns", "check_overlap", "check_size", "checked_records",
    "csv_as_text", "json_lines", "load_source", "load_task", "load_test_sets", "proportional", "read_jsonl",
    "read_rows", "read_source", "to_record", "warn_repeats", "warn_unknown_labels",
]
