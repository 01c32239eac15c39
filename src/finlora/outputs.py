"""Writing results so that a crash mid-write never leaves a half-written file where a good one was."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from finlora.errors import CannotWrite


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` (two renames: a kill between
    them leaves `.<name>.old`, which the next `atomic_dir` on `target` puts back). Temporary folders that a
    killed save left are removed first; the files of the finished folder read like any other (0644)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        old = target.with_name(f".{target.name}.old")
        if old.exists() and not target.exists():  # a kill between the two renames below: the old folder comes back
            os.replace(old, target)
        for stale in target.parent.glob(f".{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as err:
        if fault := CannotWrite.of(err, target):
            raise fault from err
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder should read like any other
    try:
        yield tmp
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes its files private
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if fault := CannotWrite.of(err, target, _size(tmp)):
            raise fault from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text(path, json.dumps(data, indent=2, default=str))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, written atomically."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_text(path: Path, text: str) -> None:
    """Write text atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file beside `path` that, once written, is fsynced and renamed onto `path`: a reader, or a
    process killed mid-write, never sees half a file, and the previous file stays until the rename. A full
    disk or read-only folder is a `CannotWrite` naming `path`."""
    tmp, written = None, 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            try:
                yield f
            finally:
                written = f.tell()
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and (fault := CannotWrite.of(err, path, written)):
            raise fault from err
        raise


def replace_section(path: Path, section: str) -> None:
    """Put a markdown `## ...` section into `path` in place of the section with the same heading, or at
    the end; the file's other sections (other people's benchmarks) stay as they are."""
    heading = section.splitlines()[0]
    parts = re.split(r"(?m)^(?=## )", path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n")
    if heading in (p.splitlines()[0] for p in parts if p):
        parts = [section if p and p.splitlines()[0] == heading else p for p in parts]
    else:
        parts.append(section)
    write_text(path, "\n".join(p.strip("\n") + "\n" for p in parts if p.strip()))
