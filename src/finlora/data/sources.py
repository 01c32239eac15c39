"""Rows → checked records: a task entry's JSONL file, read here (FinLoRA's context/target records by default,
errors by file and line), or anything `datasets` loads (local data files, `save_to_disk` folders, hub data sets;
errors by split and row). A task entry's `columns` maps its rows onto records; `format: chat` takes
{role, content} messages whose prompt the tokenizer's chat template renders (`finlora.prompts`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from finlora.config import DATA_SUFFIXES, DatasetSource, RecordFormat, Rows
from finlora.errors import DataError
from finlora.prompts import INSTRUCTION_PROMPT, MESSAGES

log = logging.getLogger(__name__)
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # a folder that `save_to_disk` wrote (a DatasetDict, a Dataset)
SOURCE_KEY = "_source"  # each record's "file:line", for errors found after reading (an answer too long to fit)


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
