"""Typed schema of finlora's Hydra config, and the source of every default.

The dataclasses are registered with Hydra's ConfigStore as the schema of `train.yaml`, `eval.yaml`, `export.yaml`
and `predict.yaml` (`store`), so every config group is typed and the YAML files under `conf/` hold only what differs
from the defaults written here. Value ranges are checked in each section's `problems()`, collected by `validate()`
into one error naming every offending key, before any model or data is loaded.

One job a module, in the order a config is read:
- `enums`: the choices, plain Enums that import nothing else;
- `checks`: checks shared by the sections (problem collector, tokens in values, run names, paths);
- `model`, `task`, `trainer`, `evaluation`, `tracking`: the sections;
- `schema`: the top-level schemas and the checks that span sections;
- `store`: their registration with Hydra; `validation`: `validate`.

Every name is importable from `finlora.config` itself. The enums are imported with the package; the first other
name read from it loads the schema and registers it with Hydra, so that `finlora.config.enums` (and an enum from
`finlora.config`) costs no Hydra import and registers nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from finlora.config.enums import (
    AdapterMethod,
    Batching,
    Compile,
    DecodeCompile,
    Direction,
    DoraImpl,
    EvalSample,
    ExportFormat,
    FourBitEval,
    FourBitType,
    GgufType,
    HalfDtype,
    Int8Compute,
    Int8Cpu,
    NonFinitePolicy,
    RecordFormat,
    Scheduler,
    TaskKind,
    TrainPrompt,
)

if TYPE_CHECKING:
    from finlora.config.checks import (
        COMMIT_KEYS,
        EMBEDDED_MODELS,
        EMBEDDED_PREFIX,
        RUN_NAME,
        SECRET_ENV,
        SEED_MAX,
        TOKEN_PATTERNS,
        check,
        flat,
        looks_like_path,
        run_name_problems,
        saved_adapter_problems,
        token_problems,
    )
    from finlora.config.evaluation import (
        DecodeSettings,
        DuringTraining,
        EvalSettings,
        SavedAdapterConfig,
        TrainEvalSettings,
    )
    from finlora.config.model import (
        AdapterConfig,
        ModelConfig,
        QuantConfig,
    )
    from finlora.config.schema import (
        Config,
        EvalConfig,
        ExportConfig,
        PredictConfig,
        RunConfig,
    )
    from finlora.config.store import (
        register_schemas,
    )
    from finlora.config.task import (
        DATA_SUFFIXES,
        Columns,
        DatasetSource,
        DataSource,
        Rows,
        TaskConfig,
        TestSet,
    )
    from finlora.config.tracking import (
        CheckpointConfig,
        LoggerConfig,
        PathsConfig,
        SweepConfig,
    )
    from finlora.config.trainer import (
        DataConfig,
        TrainerConfig,
    )
    from finlora.config.validation import (
        validate,
    )

# The module of each name that loads with the schema.
_HOMES: dict[str, tuple[str, ...]] = {
    "checks": ("COMMIT_KEYS", "EMBEDDED_MODELS", "EMBEDDED_PREFIX", "RUN_NAME", "SECRET_ENV", "SEED_MAX",
               "TOKEN_PATTERNS", "check", "flat", "looks_like_path", "run_name_problems", "saved_adapter_problems",
               "token_problems"),
    "model": ("AdapterConfig", "ModelConfig", "QuantConfig"),
    "task": ("DATA_SUFFIXES", "Columns", "DataSource", "DatasetSource", "Rows", "TaskConfig", "TestSet"),
    "trainer": ("DataConfig", "TrainerConfig"),
    "evaluation": ("DecodeSettings", "DuringTraining", "EvalSettings", "SavedAdapterConfig", "TrainEvalSettings"),
    "tracking": ("CheckpointConfig", "LoggerConfig", "PathsConfig", "SweepConfig"),
    "schema": ("Config", "EvalConfig", "ExportConfig", "PredictConfig", "RunConfig"),
    "store": ("register_schemas",),
    "validation": ("validate",),
}

__all__ = ["AdapterConfig", "AdapterMethod", "Batching", "COMMIT_KEYS", "CheckpointConfig", "Columns", "Compile",
           "Config", "DATA_SUFFIXES", "DataConfig", "DataSource", "DatasetSource", "DecodeCompile", "DecodeSettings",
           "Direction", "DoraImpl", "DuringTraining", "EMBEDDED_MODELS", "EMBEDDED_PREFIX", "EvalConfig",
           "EvalSample", "EvalSettings", "ExportConfig", "ExportFormat", "FourBitEval", "FourBitType", "GgufType",
           "HalfDtype", "Int8Compute", "Int8Cpu", "LoggerConfig", "ModelConfig", "NonFinitePolicy", "PathsConfig",
           "PredictConfig", "QuantConfig", "RUN_NAME", "RecordFormat", "Rows", "RunConfig", "SECRET_ENV", "SEED_MAX",
           "SavedAdapterConfig", "Scheduler", "SweepConfig", "TOKEN_PATTERNS", "TaskConfig", "TaskKind", "TestSet",
           "TrainEvalSettings", "TrainPrompt", "TrainerConfig", "check", "flat", "looks_like_path",
           "register_schemas", "run_name_problems", "saved_adapter_problems", "token_problems", "validate"]


def __getattr__(name: str) -> Any:
    """A name of the schema: on first use, every module of the schema loads and the schemas are registered with
    Hydra (what `conf/*.yaml` compose into)."""
    if not any(name in names for names in _HOMES.values()):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module, names in _HOMES.items():
        loaded = importlib.import_module(f"{__name__}.{module}")
        globals().update({n: getattr(loaded, n) for n in names})
    globals()["register_schemas"]()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
