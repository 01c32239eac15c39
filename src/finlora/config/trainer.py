"""How training runs: the data's length and batching, and the Lightning trainer's settings."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from finlora.config.checks import check
from finlora.config.enums import Batching, Compile, NonFinitePolicy, Scheduler, TrainPrompt


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
        check(problems, self.max_length >= 16, "data.max_length", f"must be >= 16, got {self.max_length}")
        check(problems, self.val_size >= 0, "data.val_size", f"must be >= 0, got {self.val_size}")
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
        check(problems, self.accelerator in ("auto", "cpu", "gpu", "cuda", "mps"), "trainer.accelerator",
               f"must be auto, cpu, gpu, cuda or mps, got {self.accelerator!r}")
        check(problems, self.accelerator != "mps" or sys.platform == "darwin", "trainer.accelerator",
               f"mps is Apple's GPU (macOS); this is {sys.platform}: use auto, cpu or gpu")
        check(problems, _devices_ok(self.devices), "trainer.devices",
               f"must be auto, -1 (every GPU), a count > 0 or a list of device indices, got {self.devices!r}")
        check(problems, _strategy_ok(self.strategy), "trainer.strategy",
               f"unknown strategy {self.strategy!r}; use auto, ddp, fsdp or another of Lightning's strategy names")
        check(problems, self.precision in (None, "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
               "trainer.precision",
               f"must be null, 32-true, bf16-mixed, 16-mixed or bf16-true, got {self.precision!r}")
        check(problems, self.max_steps == -1 or self.max_steps > 0, "trainer.max_steps", "must be -1 or > 0")
        check(problems, self.max_epochs > 0, "trainer.max_epochs", "must be > 0")
        check(problems, self.batch_size > 0, "trainer.batch_size", "must be > 0")
        check(problems, self.grad_accum > 0, "trainer.grad_accum", "must be > 0")
        check(problems, self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        check(problems, 0 <= self.weight_decay < math.inf, "trainer.weight_decay",
               f"must be >= 0 and finite, got {self.weight_decay}")
        check(problems, self.num_workers >= 0, "trainer.num_workers", f"must be >= 0, got {self.num_workers}")
        check(problems, self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        check(problems, self.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0 disables clipping)")
        check(problems, self.val_every_n_steps is None or self.val_every_n_steps > 0,
               "trainer.val_every_n_steps", "must be null or > 0")
        check(problems, self.log_every_n_steps > 0, "trainer.log_every_n_steps", "must be > 0")
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
