"""Typed schema of finlora's Hydra config, and the source of every default.

The dataclasses below are registered with Hydra's ConfigStore as the schema of `train.yaml`, `export.yaml` and
`eval.yaml`, so every config group is typed: a wrong type or an unknown key fails while Hydra composes
the config (`--cfg job` included), naming the key, and the YAML files under `conf/` hold only what differs
from the defaults written here. Value ranges are checked in each section's `problems()`, collected by
`validate()` into one error naming every offending key, before any model or data is loaded. Hydra 1.3
pins omegaconf < 2.4, which has no `Literal`; choices are Enums instead.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finlora import metric_names as names
from finlora.errors import ConfigError

T = TypeVar("T")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("smollm2-135m-instruct",)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
TOKEN_PATTERNS = (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
                  re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{40}(?![0-9A-Za-z])"))  # W&B API key
COMMIT_KEYS = ("model.revision",)  # a 40-hex value there is a commit hash, not a W&B key
# A run folder's name ends in run_name: one folder name, no separators or dots to climb out of outputs/runs/
RUN_NAME = re.compile(r"[A-Za-z0-9_+=,:@-][A-Za-z0-9._+=,:@-]{0,127}")
SEED_MAX = 2**32 - 1  # numpy's seeds, which Lightning's seed_everything sets too


class AdapterMethod(Enum):
    lora = "lora"
    dora = "dora"
    none = "none"  # full fine-tuning of every weight


class DoraImpl(Enum):
    finlora = "finlora"
    peft = "peft"


class Scheduler(Enum):
    """The learning rate after warmup (`trainer.warmup_steps`)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Batching(Enum):
    """How training examples become batches (`finlora.batching` says what each costs)."""

    auto = "auto"  # static where the step is recorded as CUDA graphs, else packed (`finlora.plan`)
    padded = "padded"
    grouped = "grouped"
    packed = "packed"
    static = "static"  # packed into one row of a few fixed widths: what compiled code and CUDA graphs reuse


class Compile(Enum):
    """How the training step runs on a GPU (`trainer.compile`)."""

    auto = "auto"  # inductor on the decoder layers for a recorded run long enough to pay for it, else eager
    eager = "eager"  # PyTorch as written
    inductor = "inductor"  # torch.compile: fused kernels, fewer launches
    cudagraphs = "cudagraphs"  # torch.compile(mode="reduce-overhead"): forward and backward replayed as CUDA graphs


class Int8Compute(Enum):
    """How an 8-bit base computes (`quant.int8_compute`; `finlora.quant.int8`)."""

    auto = "auto"  # weight_only on a CUDA GPU, llm_int8 on the CPU
    weight_only = "weight_only"  # the int8 weight dequantized for one 16-bit product: recordable, no host waits
    llm_int8 = "llm_int8"  # bitsandbytes' LLM.int8 matmul (int8 activations, outlier columns)


class NonFinitePolicy(Enum):
    stop = "stop"  # stop with the step and the last good checkpoint
    skip = "skip"  # drop the optimizer step whose loss or gradients are not finite


class TaskKind(str, Enum):
    """How a task's answers are parsed and scored (`finlora.metrics`)."""

    label = "label"
    numeric = "numeric"
    tags = "tags"
    text = "text"


class FourBitType(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class TrainPrompt(Enum):
    """A prompt style (`finlora.prompts`): what training sees (`data.train_prompt`) and what the test sets are
    scored on (`eval.prompt`); both default to the raw `context`, FinLoRA's evaluation prompt."""

    plain = "plain"  # the raw context: training and evaluation see the same prompt
    finlora_inst = "finlora_inst"  # FinLoRA's training format, "[INST] {context} [/INST]": an ablation


def _check(problems: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append(f"{key}: {message}")


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED_PREFIX + EMBEDDED_MODELS[0]  # a hub id, a local folder, or embedded:<name>
    revision: str | None = None
    trust_remote_code: bool = False
    hub_id: str | None = None  # the hub id of a local folder's model, written into saved adapters (portable)

    def problems(self) -> list[str]:
        problems: list[str] = []
        name = self.name_or_path
        if name.startswith(EMBEDDED_PREFIX):
            _check(problems, name[len(EMBEDDED_PREFIX):] in EMBEDDED_MODELS, "model.name_or_path",
                   f"unknown embedded model {name!r}; embedded models: {list(EMBEDDED_MODELS)}")
        elif looks_like_path(name):
            _check(problems, Path(name).expanduser().is_dir(), "model.name_or_path",
                   f"local model folder {name!r} does not exist")
        return problems

    @property
    def embedded(self) -> str | None:
        name = self.name_or_path
        return name[len(EMBEDDED_PREFIX):] if name.startswith(EMBEDDED_PREFIX) else None


def token_problems(node: Any, key: str = "") -> list[str]:
    """Config values that hold a token (one of SECRET_ENV's values, or shaped like one): tokens are read from
    the environment only, never from the config, which is saved to the run folder and logged to W&B."""
    if isinstance(node, dict):
        return [p for name, value in node.items() for p in token_problems(value, f"{key}.{name}".lstrip("."))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in token_problems(value, f"{key}[{i}]")]
    secrets = [os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 8]
    text = str(node)
    patterns = TOKEN_PATTERNS[:1] if key in COMMIT_KEYS else TOKEN_PATTERNS
    leaked = any(p.search(text) for p in patterns) or any(s in text for s in secrets)
    return [f"{key}: looks like a token; set it in the environment ({', '.join(SECRET_ENV)})"] if leaked else []


def flat(node: dict, key: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}; lists and empty sections are values."""
    out: dict[str, Any] = {}
    for name, value in node.items():
        full = f"{key}.{name}" if key else name
        out |= flat(value, full) if isinstance(value, dict) and value else {full: value}
    return out


def looks_like_path(name: str) -> bool:
    """A hub id is `org/name`; anything absolute, relative-dotted, home-based or present on disk is a path."""
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1


@dataclass
class QuantConfig:
    bits: int | None = None  # null: the base weights stay in the trainer's precision; 8: LLM.int8; 4: 4-bit
    quant_type: FourBitType = FourBitType.nf4  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too
    int8_compute: Int8Compute = Int8Compute.auto  # 8-bit only: weight_only, llm_int8, or auto (by device)

    def weight_only_int8(self, device_type: str) -> bool:
        """Whether an 8-bit base computes through its dequantized weight on `device_type` (cpu, cuda)."""
        return self.bits == 8 and (self.int8_compute is Int8Compute.weight_only or (
            self.int8_compute is Int8Compute.auto and device_type == "cuda"))

    def problems(self) -> list[str]:
        problems: list[str] = []
        _check(problems, self.bits in (None, 4, 8), "quant.bits", f"must be null, 4 or 8, got {self.bits}")
        return problems


@dataclass
class AdapterConfig:
    method: AdapterMethod = AdapterMethod.dora
    impl: DoraImpl = DoraImpl.finlora  # DoRA only: finlora's faster implementation, or peft's own
    r: int = 8
    alpha: float = 16.0  # scale s = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05
    # FinLoRA's choice; [all-linear] adapts every linear layer
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    rslora: bool = False
    # DoRA only: the magnitude vectors learn at trainer.lr × this, in an optimizer group of their own (FinLoRA's
    # docs blame DoRA's lag on a learning rate shared with the low-rank matrices); 1: one group, as before
    magnitude_lr_scale: float = 1.0

    def problems(self) -> list[str]:
        problems: list[str] = []
        if self.method is not AdapterMethod.none:
            _check(problems, self.r > 0, "adapter.r", f"must be a positive integer, got {self.r}")
            _check(problems, 0 < self.alpha < math.inf, "adapter.alpha", f"must be > 0 and finite, got {self.alpha}")
            _check(problems, 0 <= self.dropout < 1, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
            _check(problems, len(self.target_modules) > 0, "adapter.target_modules", "must name at least one module")
        scale = self.magnitude_lr_scale
        _check(problems, scale > 0, "adapter.magnitude_lr_scale", f"must be > 0, got {scale}")
        _check(problems, scale <= 0 or scale == 1 or self.method is AdapterMethod.dora, "adapter.magnitude_lr_scale",
               f"only DoRA has magnitude vectors; with adapter.method={self.method.value} it must stay 1, got {scale}")
        return problems

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)


class RecordFormat(Enum):
    """What a row of a task's data holds (`finlora.data`, `finlora.prompts`)."""

    finlora = "finlora"  # a prompt (`columns.context`, maybe behind an instruction) and its answer (`columns.target`)
    chat = "chat"  # {role, content} messages ending with the assistant's answer, in the tokenizer's chat template


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
            _check(problems, path.exists(), f"{key}.path", f"no such file or folder: {self.path!r}")
            _check(problems, not path.is_file() or path.suffix.lower() in DATA_SUFFIXES, f"{key}.path",
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
        _check(problems, (self.file is None) != (self.source is None), key,
               "give a file (FinLoRA JSONL, relative to paths.data_dir) or a source (a datasets source), "
               + ("not both" if self.file is not None else "got neither"))
        if self.source is not None:
            problems += self.source.problems(f"{key}.source")
        c = self.columns
        names = [c.messages] if self.format is RecordFormat.chat else [c.context, c.target, c.instruction]
        _check(problems, all(n is None or n.strip() for n in names), f"{key}.columns", "a column name is empty")
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
        _check(problems, self.kind is not TaskKind.label or len(self.labels) >= 2, f"{key}.labels",
               "a label task needs at least two labels")
        _check(problems, self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
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
            _check(problems, src.repeat >= 1, f"task.train[{i}].repeat", f"must be >= 1, got {src.repeat}")
        names = [t.name for t in self.test]
        _check(problems, len(names) == len(set(names)), "task.test", f"test set names repeat: {names}")
        for i, test in enumerate(self.test):
            problems += test.problems(f"task.test[{i}]")
        return problems


@dataclass
class DataConfig:
    max_length: int = 256  # prompt + answer tokens; longer prompts are cut in the middle (counted and reported)
    val_size: int = 200  # examples held out of the training files for validation (before any repetition)
    seed: int = 42  # fixes the validation split (the top-level seed fixes init and shuffling)
    batching: Batching = Batching.auto  # auto | padded | grouped (by length) | packed (whole examples per row) | static
    train_prompt: TrainPrompt = TrainPrompt.plain  # finlora_inst: train on FinLoRA's [INST] wrap, evaluate on raw
    allow_test_overlap: bool = False  # train on rows that are also test rows (refused unless set)

    def problems(self) -> list[str]:
        problems: list[str] = []
        _check(problems, self.max_length >= 16, "data.max_length", f"must be >= 16, got {self.max_length}")
        _check(problems, self.val_size >= 0, "data.val_size", f"must be >= 0, got {self.val_size}")
        return problems


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto: the GPU if there is one, else the CPU
    devices: Any = 1
    strategy: str = "auto"
    precision: str | None = None  # null: bf16-mixed on a GPU that supports it, else 32-true
    max_steps: int = -1
    max_epochs: int = 1
    batch_size: int = 8  # examples per micro-batch, whatever the batching
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: Scheduler = Scheduler.cosine
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    val_every_n_steps: int | None = None  # null: once per epoch
    log_every_n_steps: int = 10
    num_workers: int = 0
    on_nonfinite_loss: NonFinitePolicy = NonFinitePolicy.stop
    compile: Compile = Compile.auto  # GPU only; cudagraphs needs data.batching=static and grad_accum=1
    compile_regions: bool = False  # compile the layers, one compilation for all: quicker to compile, slower steps
    capture: bool | None = None  # GPU only: forward and backward recorded as CUDA graphs once per batch shape,
    # replayed; the optimizer's update (gradient norm, clipping, AdamW) too. null: on a GPU wherever it can be recorded
    extra: dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer argument (`finlora.extensions`)

    def problems(self) -> list[str]:
        problems: list[str] = []
        _check(problems, self.accelerator in ("auto", "cpu", "gpu", "cuda", "mps"), "trainer.accelerator",
               f"must be auto, cpu, gpu, cuda or mps, got {self.accelerator!r}")
        _check(problems, self.accelerator != "mps" or sys.platform == "darwin", "trainer.accelerator",
               f"mps is Apple's GPU (macOS); this is {sys.platform}: use auto, cpu or gpu")
        _check(problems, _devices_ok(self.devices), "trainer.devices",
               f"must be auto, -1 (every GPU), a count > 0 or a list of device indices, got {self.devices!r}")
        _check(problems, _strategy_ok(self.strategy), "trainer.strategy",
               f"unknown strategy {self.strategy!r}; use auto, ddp, fsdp or another of Lightning's strategy names")
        _check(problems, self.precision in (None, "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
               "trainer.precision",
               f"must be null, 32-true, bf16-mixed, 16-mixed or bf16-true, got {self.precision!r}")
        _check(problems, self.max_steps == -1 or self.max_steps > 0, "trainer.max_steps", "must be -1 or > 0")
        _check(problems, self.max_epochs > 0, "trainer.max_epochs", "must be > 0")
        _check(problems, self.batch_size > 0, "trainer.batch_size", "must be > 0")
        _check(problems, self.grad_accum > 0, "trainer.grad_accum", "must be > 0")
        _check(problems, self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        _check(problems, 0 <= self.weight_decay < math.inf, "trainer.weight_decay",
               f"must be >= 0 and finite, got {self.weight_decay}")
        _check(problems, self.num_workers >= 0, "trainer.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(problems, self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        _check(problems, self.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(problems, self.val_every_n_steps is None or self.val_every_n_steps > 0,
               "trainer.val_every_n_steps", "must be null or > 0")
        _check(problems, self.log_every_n_steps > 0, "trainer.log_every_n_steps", "must be > 0")
        return problems

    def optimizer_steps(self, train_rows: int) -> int:
        """The optimizer steps a run over `train_rows` examples an epoch takes: `max_steps`, or its epochs."""
        by_epochs = -(-train_rows // (self.batch_size * self.grad_accum)) * self.max_epochs
        return min(by_epochs, self.max_steps) if self.max_steps > 0 else by_epochs

    def schedule_warnings(self, train_rows: int) -> list[str]:
        """Settings the run's length makes pointless (the run goes on): a warmup it never finishes, a
        validation interval it never reaches. `train_rows`: training examples an epoch takes."""
        batches = self.max_epochs * -(-train_rows // self.batch_size)
        if self.max_steps > 0:
            batches = min(batches, self.max_steps * self.grad_accum)
        steps = self.optimizer_steps(train_rows)
        warnings = []
        if self.warmup_steps > steps:
            warnings.append(f"trainer.warmup_steps: {self.warmup_steps} is more than the run's {steps} optimizer "
                            "steps; the learning rate never reaches trainer.lr")
        if self.val_every_n_steps and self.val_every_n_steps > batches:
            warnings.append(f"trainer.val_every_n_steps: {self.val_every_n_steps} is more than the run's {batches} "
                            "batches; no validation runs (set it lower, or null: once per epoch)")
        return warnings


def _devices_ok(devices: Any) -> bool:
    """What Lightning's `devices` takes: auto, -1, a count, a list of indices, or those written as a string."""
    if isinstance(devices, str) and devices != "auto":
        parts = [p.strip() for p in devices.strip().rstrip(",").split(",")]
        if not all(p.lstrip("-").isdigit() for p in parts):
            return False
        devices = [int(p) for p in parts] if "," in devices else int(parts[0])
    if isinstance(devices, list | tuple):
        return bool(devices) and all(type(d) is int and d >= 0 for d in devices) and len(set(devices)) == len(devices)
    return devices == "auto" or (type(devices) is int and (devices == -1 or devices > 0))


def _strategy_ok(strategy: str) -> bool:
    """finlora's own (auto, ddp, fsdp), else one of Lightning's registered names (imported only then: a refused
    config must answer without loading torch)."""
    if strategy in ("auto", "ddp", "fsdp"):
        return True
    from lightning.pytorch.strategies import StrategyRegistry

    return strategy in StrategyRegistry


@dataclass
class CheckpointConfig:
    """last.ckpt (adapter, optimizer, schedule, loop and data position) is always the newest."""

    every_n_steps: int = 50  # write last.ckpt every N optimizer steps (and at the end, and on SIGTERM / Ctrl-C)
    keep_last: int = 0  # step-NNNNNN.ckpt files kept besides last.ckpt; older ones are deleted
    keep_best: int = 1  # best-*.ckpt files kept by `monitor` (0: none; needs data.val_size > 0)
    monitor: str = "val/loss"  # or a task score logged during training, e.g. val/sentiment/accuracy
    mode: str = "min"  # min | max: which end of `monitor` is best

    def problems(self) -> list[str]:
        problems: list[str] = []
        _check(problems, self.every_n_steps > 0, "checkpoint.every_n_steps", f"must be > 0, got {self.every_n_steps}")
        _check(problems, self.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")
        _check(problems, self.keep_best >= 0, "checkpoint.keep_best", f"must be >= 0, got {self.keep_best}")
        _check(problems, self.mode in ("min", "max"), "checkpoint.mode", f"must be min or max, got {self.mode!r}")
        return problems


@dataclass
class LoggerConfig:
    """Where metrics go besides the CSV log that every run keeps: each tracker its own switch, so that the
    logger group's options combine (`logger=[wandb,tensorboard]` sets both)."""

    wandb: bool = False  # Weights & Biases (`logger=wandb`, train.py's default); the keys below are its settings
    tensorboard: bool = False  # TensorBoard event files in <run dir>/tensorboard (`logger=tensorboard`)
    project: str = "finlora"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; null: WANDB_MODE, else online with a key, else offline
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        problems: list[str] = []
        _check(problems, self.mode in (None, "online", "offline", "disabled"), "logger.mode",
               f"must be null, online, offline or disabled, got {self.mode!r}")
        return problems


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "???"  # FinLoRA's data, with train/ and test/
    cache_dir: str = "???"  # converted embedded models
    compile_cache: str = "???"  # torch.compile's kernels (trainer.compile), shared by the jobs of a sweep


class EvalSample(Enum):
    """Which `eval.limit` rows of a test set are scored."""

    stratified = "stratified"  # a seeded random sample with the labels in the file's proportions (label tasks)
    random = "random"  # a seeded random sample
    first = "first"  # the first rows of the file (FinLoRA's files are grouped: rarely representative)


class Int8Cpu(Enum):
    """How an 8-bit base computes its matmuls while generating on the CPU (`finlora.evaluate`)."""

    llm_int8 = "llm_int8"  # LLM.int8: inputs quantized, outlier columns chosen per batch (scores move with the batch)
    dequant = "dequant"  # bitsandbytes' CPU training path: weights dequantized, inputs kept (batch-invariant)
    bf16 = "bf16"  # a bf16 copy, weights dequantized once, adapter merged: fast (~2% of answers move with the batch)


class FourBitEval(Enum):
    """How a 4-bit base (NF4 or FP4) computes while generating, on any device (`finlora.evaluate`)."""

    kernel = "kernel"  # bitsandbytes' 4-bit layers as loaded (transformers compiles no bitsandbytes model)
    dense = "dense"  # a copy of the 4-bit layers dequantized once to the compute dtype, adapter kept unmerged on top
    auto = "auto"  # dense when that copy takes at most half of the free memory, else kernel (a log line says which)


class DecodeCompile(Enum):
    """How the decode step is compiled on a static cache, on CUDA (`eval.decode_compile`; docs/benchmarks.md)."""

    recorded = "recorded"  # the traced step recorded as a CUDA graph by finlora (`capture.recorded_backend`): no
    # compiling after the trace, weights and KV cache read in place; the quickest first pass, what one job runs
    cudagraphs = "cudagraphs"  # Dynamo's CUDA-graph backend, the model's own kernels: about 9 s, every job
    inductor = "inductor"  # Inductor's fused kernels in CUDA graphs: about 25 s more the first time (then cached),
    # a fifth faster afterwards: for long evaluations and a sweep's later jobs


@dataclass
class DecodeSettings:
    """How answers are generated (`evaluate.generate_sets`): the same keys in eval.py, train.py and predict.py."""

    batch_size: Any = "auto"  # rows generated together: an int, or auto (CUDA: the most that fit in free memory)
    static_cache: bool = True  # CUDA: a static KV cache and a compiled decode step (false: a growing cache, eager)
    decode_compile: DecodeCompile = DecodeCompile.recorded  # how that step is compiled (`DecodeCompile`)
    int8_cpu: Int8Cpu = Int8Cpu.bf16  # an 8-bit base on the CPU (`Int8Cpu`)
    four_bit: FourBitEval = FourBitEval.auto  # a 4-bit base (`FourBitEval`): recorded in every <set>_metrics.json
    share_prefix: bool = True  # CPU: the prompts' common prefix computed once per test set (not under LLM.int8)
    prompt: TrainPrompt = TrainPrompt.plain  # finlora_inst: generate from the [INST] wrap (FinLoRA scored raw prompts)

    def problems(self) -> list[str]:
        problems: list[str] = []
        _check(problems, self.batch_size == "auto" or (type(self.batch_size) is int and self.batch_size > 0),
               "eval.batch_size", f"must be auto or an integer > 0, got {self.batch_size!r}")
        return problems


@dataclass
class EvalSettings(DecodeSettings):
    limit: int | None = None  # score N rows of each test set (quick checks), drawn as `sample` says
    sample: EvalSample = EvalSample.stratified
    seed: int = 42  # the sample's seed: the same seed, the same rows

    def problems(self) -> list[str]:
        problems = super().problems()
        _check(problems, self.limit is None or self.limit > 0, "eval.limit", "must be null or > 0")
        return problems


@dataclass
class DuringTraining:
    size: int = 200  # held-out rows generated on and scored at every validation (0: validation loss only)
    # of those rows (or of the held-out rows, when size is 0), the first N shown as text at every validation: prompt,
    # target and answer, as a W&B table and in samples/val_step<N>.jsonl; 0: none
    samples: int = 4


@dataclass
class TrainEvalSettings(EvalSettings):
    enabled: bool = True  # generate on the task's test sets at the end of training and score them
    during_training: DuringTraining = field(default_factory=DuringTraining)

    def problems(self) -> list[str]:
        problems = super().problems()
        _check(problems, self.during_training.size >= 0, "eval.during_training.size", "must be >= 0")
        _check(problems, self.during_training.samples >= 0, "eval.during_training.samples", "must be >= 0 (0: none)")
        return problems


class Direction(Enum):
    minimize = "minimize"
    maximize = "maximize"


@dataclass
class SweepConfig:
    """What a hyperparameter search (`hydra/sweeper=optuna`) optimizes: `train.py` returns this metric's value
    at the end of the run, and a sweep job that did not log it fails, saying why."""

    objective: str | None = None  # a metric the run logs (`finlora.metric_names`): val/fpb/accuracy, …; null: val/loss
    direction: Direction = Direction.minimize

    @property
    def metric(self) -> str:
        return self.objective or "val/loss"  # unchecked by default: a run without validation has no val/loss


def run_name_problems(name: str) -> list[str]:
    problems: list[str] = []
    _check(problems, bool(RUN_NAME.fullmatch(name)), "run_name",
           "must be 1 to 128 of the characters A-Z a-z 0-9 . _ - + = , : @ (one folder name, not starting with "
           f"a dot), got {name[:60]!r}" + (f"… ({len(name)} characters)" if len(name) > 60 else ""))
    return problems


@dataclass
class RunConfig:
    """What a training run and an evaluation share: the base model, the task, where things are, the logger."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "run"
    output_dir: str = "???"

    def problems(self) -> list[str]:
        problems: list[str] = []
        problems += run_name_problems(self.run_name)
        _check(problems, not self.task.reads_data_dir or Path(self.paths.data_dir).is_dir(), "paths.data_dir",
               f"data folder {self.paths.data_dir!r} does not exist (set FINLORA_DATA_DIR or paths.data_dir)")
        for section in (self.model, self.quant, self.task, self.logger):
            problems += section.problems()
        return problems


@dataclass
class Config(RunConfig):
    """`train.py`: fine-tune the base model with an adapter (or fully) on a task."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: TrainEvalSettings = field(default_factory=TrainEvalSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: …, args} (`finlora.extensions`)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 42  # weights init, dropout and the order of training batches
    ckpt_path: str | None = None  # a checkpoint file, or last; null: a rerun in a run folder resumes its last.ckpt
    # what a resume may change from the checkpoint's run: config keys (trainer.lr) and training files as the task
    # names them (train/fpb_train.jsonl), each recorded old → new with the step; anything else changed is refused
    resume_changes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        problems = super().problems()
        _check(problems, not (self.quant.bits and self.adapter.method is AdapterMethod.none), "quant.bits",
               "full fine-tuning (adapter=none) cannot train quantized weights; use quant=none")
        _check(problems, 0 <= self.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}], got {self.seed}")
        _check(problems, bool(self.task.train), "task.train",
               f"task {self.task.name!r} has no training files (it is for evaluation only: use eval.py)")
        _check(problems, self.ckpt_path in (None, "last") or Path(self.ckpt_path).is_file(), "ckpt_path",
               f"checkpoint {self.ckpt_path!r} does not exist (or use last)")
        for section in (self.adapter, self.data, self.trainer, self.eval, self.checkpoint):
            problems += section.problems()
        chat = [f"task.train[{i}]" for i, src in enumerate(self.task.train) if src.format is RecordFormat.chat]
        _check(problems, not chat or self.data.train_prompt is TrainPrompt.plain, "data.train_prompt",
               f"{self.data.train_prompt.value} wraps a FinLoRA context, and {', '.join(chat)} has format chat, whose "
               "prompt is the tokenizer's chat template: use data.train_prompt=plain")
        names = flat(asdict(self)).keys() | {src.origin for src in self.task.train}
        unknown = [k for k in self.resume_changes if k not in names]
        _check(problems, not unknown, "resume_changes", f"{unknown} name no config key or training file of this run")
        t = self.trainer
        _check(problems, not (t.capture and t.compile is Compile.cudagraphs), "trainer.capture",
               "trainer.compile=cudagraphs records CUDA graphs already: capture goes with trainer.compile=eager "
               "or inductor")
        _check(problems, not (t.capture and t.strategy == "fsdp"), "trainer.capture",
               "FSDP gathers each layer's weights into fresh memory around its forward, which a recorded graph would "
               "not follow: use trainer.capture=false, or trainer.strategy=ddp")
        graphs = "trainer.capture" if t.capture else "trainer.compile" if t.compile is Compile.cudagraphs else None
        _check(problems, not graphs or self.data.batching in (Batching.static, Batching.auto), graphs,
               "CUDA graphs replay fixed shapes: set data.batching=static "
               f"(got data.batching={self.data.batching.value})")
        _check(problems, not graphs or t.grad_accum == 1, graphs,
               "CUDA graphs replay the backward into the same memory each micro-batch, so gradients cannot "
               "accumulate: use trainer.grad_accum=1 with a larger trainer.batch_size "
               f"(got trainer.grad_accum={t.grad_accum})")
        return problems + self.extension_problems() + self.metric_problems() + token_problems(asdict(self))

    @property
    def scores_in_training(self) -> bool:
        """Whether each validation also generates on held-out rows and logs the task's scores (`TaskScore`)."""
        return (self.data.val_size > 0 and self.eval.during_training.size > 0 and bool(self.task.test)
                and self.trainer.strategy != "fsdp")

    @property
    def tests_after_training(self) -> bool:
        """Whether the run ends by scoring the task's test sets (not under FSDP: generation runs on one GPU)."""
        return self.eval.enabled and bool(self.task.test) and self.trainer.strategy != "fsdp"

    def extension_problems(self) -> list[str]:
        """`trainer.extra` and `callbacks`: their targets and arguments."""
        from finlora.extensions import callback_problems, trainer_extra_problems

        return trainer_extra_problems(self.trainer.extra) + callback_problems(self.callbacks)

    def logged_metrics(self) -> list[str]:
        """Every metric this run logs (`finlora.metric_names`): the training step's, the learning rates, the
        validation loss with a validation split, the task's scores with in-training scoring, and each test set's
        with a test stage."""
        groups = 2 if self.adapter.magnitude_lr_scale != 1 else 1  # `module.param_groups`
        logged = [*names.TRAIN, *names.learning_rates(groups)]
        if self.data.val_size > 0:
            logged.append(names.VAL_LOSS)
        if self.scores_in_training:  # scored as the first test set is (`callbacks.TaskScore`)
            logged += [names.val_score(self.task.name, n) for n in names.SCORE_NAMES[self.task.test[0].kind.value]
                       if n not in names.VAL_SKIPPED]
        if self.tests_after_training:
            logged += [names.test_score(t.name, n) for t in self.task.test for n in names.SCORE_NAMES[t.kind.value]]
        return logged

    def metric_problems(self) -> list[str]:
        """Each metric named by `sweep.objective`, a callback's `monitor` or (when it keeps best checkpoints)
        `checkpoint.monitor` that this run will not log, with the closest names it will."""
        monitors = [(f"callbacks.{n}.monitor", c["monitor"]) for n, c in self.callbacks.items()
                    if isinstance(c, dict) and isinstance(c.get("monitor"), str)]
        metrics = [*([("sweep.objective", self.sweep.objective)] if self.sweep.objective else []), *monitors]
        if self.checkpoint.keep_best and self.data.val_size > 0:
            metrics.append(("checkpoint.monitor", self.checkpoint.monitor))
        logged = self.logged_metrics()
        problems = []
        for key, metric in metrics:
            offered = [n for n in logged if n.startswith("val/")] if key == "checkpoint.monitor" else logged
            if metric in offered:
                continue
            close = get_close_matches(metric, offered, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"it logs {', '.join(offered)}"
            problems.append(f"{key}: {metric!r} is not a validation metric; {hint}" if metric in logged
                            else f"{key}: this run does not log {metric!r}; {hint}")
        return problems


@dataclass
class SavedAdapterConfig:
    """`eval.py`: how a saved DoRA adapter is computed; its adapter_config.json says the rest."""

    impl: DoraImpl = DoraImpl.finlora


@dataclass
class EvalConfig(RunConfig):
    """`eval.py`: a base model, optionally with a saved adapter (or merged), on a task's test sets."""

    eval: EvalSettings = field(default_factory=EvalSettings)
    adapter: SavedAdapterConfig = field(default_factory=SavedAdapterConfig)
    adapter_path: str | None = None
    merge: bool = False  # merge the adapter into the base weights (a plain model, no adapter at inference)
    accelerator: str = "auto"
    precision: str | None = None  # null: bf16-mixed on a GPU, else 32-true

    def problems(self) -> list[str]:
        problems = super().problems()
        _check(problems, bool(self.task.test), "task.test", f"task {self.task.name!r} has no test sets")
        problems += saved_adapter_problems(self.adapter_path, self.merge, self.quant.bits)
        problems += self.eval.problems()
        return problems + token_problems(asdict(self))


class ExportFormat(Enum):
    """What `export.py` writes (`finlora.export`)."""

    merged = "merged"  # a transformers model folder: the adapter folded into the base weights
    gguf = "gguf"  # one GGUF file for llama.cpp and its kin (Ollama, LM Studio), Llama-architecture bases


class HalfDtype(Enum):
    """The 16-bit dtype a merged model's weights are stored in."""

    bf16 = "bf16"
    f16 = "f16"


class GgufType(Enum):
    """The GGUF file's type for its matrices (norms and other vectors stay float32, as llama.cpp writes them)."""

    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"  # llama.cpp's 8-bit blocks: 32 weights and one f16 scale each, about half of f16's size


@dataclass
class ExportConfig:
    """`export.py`: a saved adapter merged into the base it was trained on (loaded unquantized), written as a
    transformers folder or a GGUF file, with a model card; optionally uploaded to the Hugging Face Hub."""

    adapter_path: str = "???"  # the `adapter/` folder of a training run
    format: ExportFormat = ExportFormat.merged
    dtype: HalfDtype = HalfDtype.bf16  # format=merged: the weights' dtype
    gguf_type: GgufType = GgufType.f16  # format=gguf: f16, bf16 or q8_0
    out_dir: str | None = None  # null: <run folder>/<format> (merged/ or gguf/), beside the adapter
    overwrite: bool = False  # replace an existing out_dir (refused otherwise)
    push_to_hub: str | None = None  # a Hub repo id (org/name): upload the folder there once written (needs network)
    private: bool = True  # push_to_hub: a repo created by the upload is private
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "export"
    output_dir: str = "???"

    @property
    def target(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.adapter_path).resolve().parent / self.format.value

    def problems(self) -> list[str]:
        problems: list[str] = []
        adapter = Path(self.adapter_path)
        for name in ("adapter_config.json", "base_model.json"):
            if not (adapter / name).is_file():
                problems.append(f"adapter_path: {adapter / name} does not exist; give the adapter/ folder of a "
                                f"finlora training run (it holds adapter_config.json and base_model.json)")
                break
        _check(problems, self.overwrite or not self.target.exists(), "out_dir",
               f"{self.target} exists; set overwrite=true to replace it, or out_dir=… to write elsewhere")
        if self.push_to_hub is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
                _check(problems, "/" in self.push_to_hub, "push_to_hub",
                       f"must be a repo id org/name (or user/name), got {self.push_to_hub!r}")
            except HFValidationError as err:
                problems.append(f"push_to_hub: {str(err).splitlines()[0]}")
        return problems + token_problems(asdict(self))


def saved_adapter_problems(adapter_path: str | None, merge: bool, bits: int | None) -> list[str]:
    """`adapter_path` and `merge` of eval.py and predict.py."""
    problems: list[str] = []
    if adapter_path is not None:
        _check(problems, (Path(adapter_path) / "adapter_config.json").is_file(), "adapter_path",
               f"{adapter_path!r} is not a saved adapter (no adapter_config.json)")
    _check(problems, not merge or adapter_path is not None, "merge", "merging needs an adapter_path")
    _check(problems, not (merge and bits), "merge", "merging into quantized weights loses precision; use quant=none "
           "to merge")
    return problems


@dataclass
class PredictConfig:
    """`predict.py`: answers from a base model, optionally with a saved adapter (or merged), for the prompts of a
    JSONL file or typed one a line (`interactive`), generated with evaluation's prompt and decoding."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)  # unless given: the quantization the adapter trained on
    paths: PathsConfig = field(default_factory=PathsConfig)
    adapter: SavedAdapterConfig = field(default_factory=SavedAdapterConfig)
    adapter_path: str | None = None
    merge: bool = False
    input: str | None = None  # JSONL: {"context": …} (FinLoRA's, an "instruction" optional) or {"prompt": …} a line
    output: str | None = None  # the answers' JSONL; null: <run folder>/predictions.jsonl
    interactive: bool = False  # a prompt a line on stdin, each answer printed, until end of input
    max_new_tokens: int = 32  # answer tokens at most (a row also stops at EOS)
    eval: DecodeSettings = field(default_factory=DecodeSettings)  # decoding, with eval.py's keys
    accelerator: str = "auto"
    precision: str | None = None  # null: bf16-mixed on a GPU, else 32-true
    run_name: str = "predict"
    output_dir: str = "???"

    def problems(self) -> list[str]:
        problems = self.model.problems() + self.quant.problems()
        problems += run_name_problems(self.run_name)
        _check(problems, (self.input is not None) != self.interactive, "input",
               "give input=<file.jsonl> or interactive=true (one of the two)")
        _check(problems, self.input is None or Path(self.input).is_file(), "input",
               f"{self.input!r} is not a file")
        _check(problems, self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        problems += saved_adapter_problems(self.adapter_path, self.merge, self.quant.bits)
        problems += self.eval.problems()
        return problems + token_problems(asdict(self))


# The schemas of conf/train.yaml, eval.yaml, export.yaml and predict.yaml (each lists its schema first in its
# defaults).
# `trainer.extra` and `callbacks` take keys of the user's choosing without a `+`.
_train_schema = OmegaConf.structured(Config)
OmegaConf.set_struct(_train_schema.trainer.extra, False)
OmegaConf.set_struct(_train_schema.callbacks, False)
ConfigStore.instance().store(name="train_schema", node=_train_schema)
ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
ConfigStore.instance().store(name="export_schema", node=ExportConfig)
ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


def validate(cfg: DictConfig, schema: type[T] = Config) -> T:  # type: ignore[assignment]
    """Merge the composed config into the schema and run every check. Type errors stop at the first one
    (omegaconf's merge does); value problems are all collected into one ConfigError.

    Hydra composes into the schema already, but a `+key=value` override adds a key even to a typed node;
    merged as plain values into the schema, such a key is refused by name.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg))
        OmegaConf.resolve(merged)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        raise ConfigError(f"invalid config: {key}: {msg}" if key else f"invalid config: {msg}") from None
    problems = config.problems()
    if problems:
        raise ConfigError.listing(problems)
    return config
