"""Typed schema of finlora's Hydra config, and the source of every default.

The dataclasses are registered with Hydra's ConfigStore as the schema of `train.yaml`, `eval.yaml`, `export.yaml`
and `predict.yaml` when this package is imported (`store`), so every config group is typed and the YAML files under
`conf/` hold only what differs from the defaults written here. Value ranges are checked in each section's
`problems()`, collected by `validate()` into one error naming every offending key, before any model or data is
loaded.

One job a module, in the order a config is read:
- `enums`: the choices (plain Enums, importing nothing else);
- `checks`: checks shared by the sections (problem collector, tokens in values, run names, paths);
- `model`, `task`, `trainer`, `evaluation`, `tracking`: the sections;
- `schema`: the top-level schemas and the checks that span sections;
- `store`: their registration with Hydra; `validation`: `validate`.
Every name is importable from `finlora.config` itself.
"""

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
from finlora.config.evaluation import (
    DecodeSettings,
    DuringTraining,
    EvalSettings,
    SavedAdapterConfig,
    TrainEvalSettings,
)
from finlora.config.model import AdapterConfig, ModelConfig, QuantConfig
from finlora.config.schema import Config, EvalConfig, ExportConfig, PredictConfig, RunConfig
from finlora.config.store import register_schemas
from finlora.config.task import DATA_SUFFIXES, Columns, DatasetSource, DataSource, Rows, TaskConfig, TestSet
from finlora.config.tracking import CheckpointConfig, LoggerConfig, PathsConfig, SweepConfig
from finlora.config.trainer import DataConfig, TrainerConfig
from finlora.config.validation import validate

register_schemas()

__all__ = [
    "COMMIT_KEYS", "DATA_SUFFIXES", "EMBEDDED_MODELS", "EMBEDDED_PREFIX", "RUN_NAME", "SECRET_ENV", "SEED_MAX",
    "TOKEN_PATTERNS", "AdapterConfig", "AdapterMethod", "Batching", "CheckpointConfig", "Columns", "Compile", "Config",
    "DataConfig", "DataSource", "DatasetSource", "DecodeCompile", "DecodeSettings", "Direction", "DoraImpl",
    "DuringTraining", "EvalConfig", "EvalSample", "EvalSettings", "ExportConfig", "ExportFormat", "FourBitEval",
    "FourBitType", "GgufType", "HalfDtype", "Int8Compute", "Int8Cpu", "LoggerConfig", "ModelConfig", "NonFinitePolicy",
    "PathsConfig", "PredictConfig", "QuantConfig", "RecordFormat", "Rows", "RunConfig", "SavedAdapterConfig",
    "Scheduler", "SweepConfig", "TaskConfig", "TaskKind", "TestSet", "TrainEvalSettings", "TrainPrompt",
    "TrainerConfig", "check", "flat", "looks_like_path", "register_schemas", "run_name_problems",
    "saved_adapter_problems", "token_problems", "validate",
]
