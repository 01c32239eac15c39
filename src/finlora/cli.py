"""What `train.py` does around `train()`: a clean one-paragraph error and a non-zero exit for bad input."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from finlora.config import ConfigError
from finlora.data import DataError
from finlora.train import train


def run(cfg: DictConfig) -> float | None:
    """Train; return the final validation loss for a sweeper. Bad input exits with status 2 and its message."""
    try:
        summary = train(cfg)
    except (ConfigError, DataError) as err:
        print(f"finlora: {err}", file=sys.stderr)
        sys.exit(2)
    return summary.get("final_val_loss")
