"""The body of `train.py` and `eval.py`: run the work, and turn what it raised into an exit status.

A single run exits with the status of a finlora error (`finlora.errors`: 2 for bad input, 3 for a run fault,
128 + the signal for an interrupted run), printing its message without a traceback; any other exception
keeps its traceback. Inside a multirun each job is recorded (`job.json`), and a failed job never ends the
sweep, except when a signal stopped it: then the user or the scheduler is stopping the whole sweep.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import finlora.run.sweep  # noqa: F401  (registers ${finlora.ray_job:…}, which conf/hydra/launcher/ray.yaml uses)
from finlora.errors import FinloraError, Interrupted
from finlora.run.job import JobRecord, prepare_job

log = logging.getLogger(__name__)


def run(work: Callable[[DictConfig], dict | None], cfg: DictConfig) -> dict:
    """`work(cfg)`'s summary; {} for a failed job of a multirun."""
    hydra = HydraConfig.get()
    if hydra.mode is not RunMode.MULTIRUN:
        try:
            return work(cfg) or {}
        except FinloraError as err:
            print(f"finlora: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
    job = JobRecord.start(hydra)
    try:
        prepare_job(cfg, hydra)
        summary = work(cfg) or {}
        job.succeeded(summary)
        return summary
    except FinloraError as err:
        print(f"finlora: {err}", file=sys.stderr)
        job.failed(err, err.exit_code)
        if isinstance(err, Interrupted):
            sys.exit(err.exit_code)
        return {}
    except Exception as err:
        log.exception("job %d failed", hydra.job.num)
        job.failed(err, 1)
        return {}
    finally:
        job.close()
