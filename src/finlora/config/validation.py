"""`validate`: a composed config merged into its schema, every check run, all problems in one error."""

from __future__ import annotations

from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finlora.config.schema import Config
from finlora.errors import ConfigError

T = TypeVar("T")


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
