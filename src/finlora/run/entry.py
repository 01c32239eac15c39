"""The body of `train.py`, `eval.py`, `export.py` and `predict.py`: run the work, and turn what it raised into an
exit status.

The entry imports nothing heavy: torch and the rest load inside the task function, so `--help`,
`--cfg job` and a refused config answer at once. A single run exits with the status of a finlora error
(`finlora.errors`: 2 for bad input, 3 for a run fault, 128 + the signal for an interrupted run), printing
its message without a traceback and into the run's log file; any other exception keeps its traceback. A
command line that Hydra cannot compose (an unknown group option or key) exits with status 2 and Hydra's
message, which lists the options that exist. Inside a multirun each job is recorded (`job.json`), and a
failed job never ends the sweep, except when a signal stopped it: then the user or the scheduler is
stopping the whole sweep.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

import finlora.run.sweep  # noqa: F401  (registers ${finlora.ray_job:…}, which conf/hydra/launcher/ray.yaml uses)
from finlora.config.store import register_schemas
from finlora.errors import FinloraError, FolderInUse, Interrupted, MissingObjective, as_fault
from finlora.run.job import JobRecord, prepare_job, tag_run
from finlora.run.lock import LOCK_FILE, RunLock

log = logging.getLogger(__name__)
register_schemas()  # the schemas that train.yaml, eval.yaml, export.yaml and predict.yaml compose into
# What Hydra writes into a run folder before the run starts, and the run's lock (`finlora.run.lock`).
HYDRA_FILES = {".hydra", "train.log", "eval.log", "export.log", "predict.log", LOCK_FILE}


def cli(main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function: Hydra's composition errors exit with status 2 (Hydra's own: 1)."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of exiting 1, so the type can be told apart
    try:
        main()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as err:
        cause = f"\n{err.__cause__}" if err.__cause__ and str(err.__cause__) not in str(err) else ""
        print(f"finlora: {err}{cause}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, OSError) as err:  # before a run started: Hydra making a run folder on a full disk
        if (fault := as_fault(err)) is None:
            raise
        fail(fault)


def fail(err: FinloraError) -> NoReturn:
    """Print the error's message and exit with its status."""
    print(f"finlora: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


def run(work: Callable[[DictConfig], dict | None], cfg: DictConfig) -> dict:
    """`work(cfg)`'s summary; {} for a failed job of a multirun."""
    hydra = HydraConfig.get()
    lightning_lines_once()
    if hydra.mode is not RunMode.MULTIRUN:
        try:
            tag_run(cfg, hydra)
            return work(cfg) or {}
        except (FinloraError, KeyboardInterrupt, OSError) as caught:
            if (err := as_fault(caught)) is None:
                raise
            _log_to_files(f"finlora: {err}")
            _drop_if_unstarted(Path(hydra.runtime.output_dir))
            fail(err)
    try:  # a job rerun by `report.py --rerun-failed` while it still runs, or twice at once
        lock = RunLock.take(Path(hydra.runtime.output_dir))
    except FolderInUse as err:
        print(f"finlora: {err}", file=sys.stderr)
        return {}
    job = JobRecord.start(hydra)
    try:
        prepare_job(cfg, hydra)
        summary = work(cfg) or {}
        if "objective" in summary and summary["objective"] is None and not _grid(hydra):
            raise MissingObjective(missing_objective(cfg, summary["objective_metric"]))  # no value for the sweeper
        job.succeeded(summary)
        return summary
    except (FinloraError, KeyboardInterrupt, OSError) as caught:
        if (err := as_fault(caught)) is None:
            log.exception("job %d failed", hydra.job.num)
            job.failed(caught, 1)
            return {}
        print(f"finlora: {err}", file=sys.stderr)
        _log_to_files(f"finlora: {err}")
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
        lock.release()


def lightning_lines_once() -> None:
    """Lightning's `lightning` logger prints each line on the terminal through a handler of its own, then passes it
    on to Hydra's (the terminal again, and the run's log file): every INFO line twice. Where Hydra's handlers are
    set, Lightning's own goes."""
    import lightning  # noqa: F401  (its handler is added on import: it must be there to be removed)

    own = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in [h for h in own.handlers if type(h) is logging.StreamHandler]:
            own.removeHandler(handler)


def _grid(hydra: DictConfig) -> bool:
    """Whether the sweep is Hydra's basic grid sweeper, which does not use the jobs' return values."""
    return str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper")


def missing_objective(cfg: DictConfig, metric: str) -> str:
    """Why a sweep job has no value for the sweeper, and what to change."""
    t = cfg.trainer
    return (f"sweep.objective={metric} was not logged by this job, so the sweeper has no value for "
            f"it (its adapter and metrics.json are kept). val/* metrics need a validation: it runs at the end of "
            f"each epoch unless trainer.val_every_n_steps is set, and trainer.max_steps={t.max_steps} can end the "
            f"run inside the first epoch (trainer.val_every_n_steps={t.val_every_n_steps}); set "
            "trainer.val_every_n_steps, or choose a sweep.objective this run logs (see its csv/metrics.csv)")


def _log_to_files(message: str) -> None:
    """The error into the run's log file (Hydra's file handler), not a second time onto the terminal."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _drop_if_unstarted(run_dir: Path) -> None:
    """A run refused before it wrote anything of its own leaves no folder behind (Hydra made it, with only
    its config copies and the log); a folder with anything else in it is kept as it is."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_FILES:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
