"""The base model, its quantization and the adapter trained on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from finlora.config.checks import EMBEDDED_MODELS, EMBEDDED_PREFIX, check, looks_like_path
from finlora.config.enums import AdapterMethod, DoraImpl, FourBitType, Int8Compute


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
            check(problems, name[len(EMBEDDED_PREFIX):] in EMBEDDED_MODELS, "model.name_or_path",
                   f"unknown embedded model {name!r}; embedded models: {list(EMBEDDED_MODELS)}")
        elif looks_like_path(name):
            check(problems, Path(name).expanduser().is_dir(), "model.name_or_path",
                   f"local model folder {name!r} does not exist")
        return problems

    @property
    def embedded(self) -> str | None:
        name = self.name_or_path
        return name[len(EMBEDDED_PREFIX):] if name.startswith(EMBEDDED_PREFIX) else None


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
        check(problems, self.bits in (None, 4, 8), "quant.bits", f"must be null, 4 or 8, got {self.bits}")
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
            check(problems, self.r > 0, "adapter.r", f"must be a positive integer, got {self.r}")
            check(problems, 0 < self.alpha < math.inf, "adapter.alpha", f"must be > 0 and finite, got {self.alpha}")
            check(problems, 0 <= self.dropout < 1, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
            check(problems, len(self.target_modules) > 0, "adapter.target_modules", "must name at least one module")
        scale = self.magnitude_lr_scale
        check(problems, scale > 0, "adapter.magnitude_lr_scale", f"must be > 0, got {scale}")
        check(problems, scale <= 0 or scale == 1 or self.method is AdapterMethod.dora, "adapter.magnitude_lr_scale",
               f"only DoRA has magnitude vectors; with adapter.method={self.method.value} it must stay 1, got {scale}")
        return problems

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)
