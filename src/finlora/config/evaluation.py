"""How answers are generated and scored: in eval.py and predict.py, and in and after training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finlora.config.checks import check
from finlora.config.enums import DecodeCompile, DoraImpl, EvalSample, FourBitEval, Int8Cpu, TrainPrompt


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
        check(problems, self.batch_size == "auto" or (type(self.batch_size) is int and self.batch_size > 0),
               "eval.batch_size", f"must be auto or an integer > 0, got {self.batch_size!r}")
        return problems


@dataclass
class EvalSettings(DecodeSettings):
    limit: int | None = None  # score N rows of each test set (quick checks), drawn as `sample` says
    sample: EvalSample = EvalSample.stratified
    seed: int = 42  # the sample's seed: the same seed, the same rows

    def problems(self) -> list[str]:
        problems = super().problems()
        check(problems, self.limit is None or self.limit > 0, "eval.limit", "must be null or > 0")
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
        check(problems, self.during_training.size >= 0, "eval.during_training.size", "must be >= 0")
        check(problems, self.during_training.samples >= 0, "eval.during_training.samples", "must be >= 0 (0: none)")
        return problems


@dataclass
class SavedAdapterConfig:
    """`eval.py`: how a saved DoRA adapter is computed; its adapter_config.json says the rest."""

    impl: DoraImpl = DoraImpl.finlora
