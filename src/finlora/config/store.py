"""The schemas registered with Hydra's ConfigStore, under the names that conf/train.yaml, eval.yaml, export.yaml and
predict.yaml list first in their defaults: every config group composes typed, so a wrong type or an unknown key fails
while Hydra composes (`--cfg job` included), naming the key."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from finlora.config.schema import Config, EvalConfig, ExportConfig, PredictConfig


def register_schemas() -> None:
    """Store the four schemas (again: storing a name twice replaces it). `trainer.extra` and `callbacks` take keys of
    the user's choosing without a `+`."""
    train_schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(train_schema.trainer.extra, False)
    OmegaConf.set_struct(train_schema.callbacks, False)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=train_schema)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(name="predict_schema", node=PredictConfig)
