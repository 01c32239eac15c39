"""A task: its training rows, its test sets, and how a row maps onto a record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finlora.config.checks import check, looks_like_path
from finlora.config.enums import RecordFormat, TaskKind, TrainPrompt

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # datasets' loader of each


@dataclass
class Columns:
    """Which column (or JSON key) of a row holds each part of a record."""

    context: str = "context"  # the prompt, as the model sees it (FinLoRA's "Instruction: …\nInput: …\nAnswer: ")
    target: str = "target"  # the answer
    # set: the prompt is FinLoRA's "Instruction: {instruction}\nInput: {context}\nAnswer: " (prompts.INSTRUCTION_PROMPT)
    instruction: str | None = None
    messages: str = "messages"  # format: chat


@dataclass
class DatasetSource:
    """Rows that `datasets` loads: a local data file, a folder written by `save_to_disk`, or a hub data set."""

    # a .json/.jsonl/.csv/.parquet file or a save_to_disk folder (absolute, or from the working directory), or a hub id
    path: str = "???"
    split: str = "train"  # with datasets' slicing for files and hub sets (train[:90%]); a saved DatasetDict: a split
    name: str | None = None  # a hub data set's configuration
    revision: str | None = None  # a hub data set's branch, tag or commit

    @property
    def local(self) -> bool:
        """A file or folder on this machine (a hub id otherwise): present, path-like, or with a data file's suffix."""
        return looks_like_path(self.path) or Path(self.path).suffix.lower() in DATA_SUFFIXES

    def problems(self, key: str) -> list[str]:
        problems: list[str] = []
        path = Path(self.path).expanduser()
        if self.local:
            check(problems, path.exists(), f"{key}.path", f"no such file or folder: {self.path!r}")
            check(problems, not path.is_file() or path.suffix.lower() in DATA_SUFFIXES, f"{key}.path",
                   f"{self.path!r}: a data file must end in one of {', '.join(DATA_SUFFIXES)}")
        return problems


@dataclass(kw_only=True)
class Rows:
    """Where a task's rows come from and what they hold: a JSONL file that finlora reads (`file`, its errors by
    line), or anything `datasets` loads (`source`, its errors by split and row); `columns` maps them onto a record."""

    file: str | None = None  # a JSONL file, relative to paths.data_dir (or absolute)
    source: DatasetSource | None = None  # or rows that `datasets` loads
    columns: Columns = field(default_factory=Columns)
    format: RecordFormat = RecordFormat.finlora

    @property
    def origin(self) -> str:
        """How errors, the model card and `resume_changes` name these rows: the file, or the source and its split."""
        return self.file if self.file is not None else f"{self.source.path}[{self.source.split}]"

    def rows_problems(self, key: str) -> list[str]:
        problems: list[str] = []
        check(problems, (self.file is None) != (self.source is None), key,
               "give a file (FinLoRA JSONL, relative to paths.data_dir) or a source (a datasets source), "
               + ("not both" if self.file is not None else "got neither"))
        if self.source is not None:
            problems += self.source.problems(f"{key}.source")
        c = self.columns
        names = [c.messages] if self.format is RecordFormat.chat else [c.context, c.target, c.instruction]
        check(problems, all(n is None or n.strip() for n in names), f"{key}.columns", "a column name is empty")
        return problems


@dataclass
class DataSource(Rows):
    repeat: int = 1  # up-weights a file of a mixture


@dataclass
class TestSet(Rows):
    """One evaluation set: its rows, how its answers are scored, and how long an answer may be."""

    name: str = "???"
    kind: TaskKind = TaskKind.label
    labels: list[str] = field(default_factory=list)
    max_new_tokens: int = 8

    def problems(self, key: str) -> list[str]:
        problems = self.rows_problems(key)
        check(problems, self.kind is not TaskKind.label or len(self.labels) >= 2, f"{key}.labels",
               "a label task needs at least two labels")
        check(problems, self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
        return problems


@dataclass
class TaskConfig:
    name: str = "???"
    train: list[DataSource] = field(default_factory=list)  # [] for an evaluation-only task
    test: list[TestSet] = field(default_factory=list)

    @property
    def reads_data_dir(self) -> bool:
        """Whether a file of the task is relative to paths.data_dir (a task of datasets sources needs none)."""
        return any(r.file is not None and not Path(r.file).is_absolute() for r in [*self.train, *self.test])

    def prompt(self, rows: list[Rows], style: TrainPrompt = TrainPrompt.plain) -> str:
        """What the summary says the prompt of `rows` is: the chat template if any is chat, else `style`."""
        return "chat_template" if any(r.format is RecordFormat.chat for r in rows) else style.value

    def problems(self) -> list[str]:
        problems: list[str] = []
        for i, src in enumerate(self.train):
            problems += src.rows_problems(f"task.train[{i}]")
            check(problems, src.repeat >= 1, f"task.train[{i}].repeat", f"must be >= 1, got {src.repeat}")
        names = [t.name for t in self.test]
        check(problems, len(names) == len(set(names)), "task.test", f"test set names repeat: {names}")
        for i, test in enumerate(self.test):
            problems += test.problems(f"task.test[{i}]")
        return problems
