"""What `train.py` and `eval.py` do around the work: a one-paragraph error and exit status 2 for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig

from finlora.config import ConfigError
from finlora.data import DataError
from finlora.faults import RunFault

R = TypeVar("R")


def guarded(work: Callable[[DictConfig], R], cfg: DictConfig) -> R:
    """Run `work(cfg)`; bad input exits with status 2, a run fault with its own status, each with its message
    and without a traceback."""
    try:
        return work(cfg)
    except (ConfigError, DataError) as err:
        print(f"finlora: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFault as err:  # a fault with its own advice (a signal, a non-finite loss, GPU memory)
        print(f"finlora: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
