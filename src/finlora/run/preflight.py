"""Checks that run before Hydra creates a run folder or writes its `.hydra/` copies of the config: a
refused command leaves nothing behind, and a token typed on the command line is never written to disk. Then
the run's folder (or the sweep's) is locked for this process (`finlora.run.lock`): a second process started
on it is refused before it writes anything there."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from finlora.config import Config, EvalConfig, ExportConfig, PredictConfig, token_problems, validate
from finlora.embedded import check as check_embedded
from finlora.errors import ConfigError, FinloraError, as_fault
from finlora.run.entry import fail
from finlora.run.lock import SWEEP_LOCK_FILE, hold

SCHEMAS = {"train": Config, "eval": EvalConfig, "export": ExportConfig, "predict": PredictConfig}


def override_tokens(config: DictConfig) -> list[str]:
    """Tokens in any value of the command line, Hydra's own overrides included (`+hydra.job.env_set.HF_TOKEN=…`
    would be written into `.hydra/hydra.yaml` and `overrides.yaml`), each named by its key."""
    overrides = [*config.hydra.overrides.hydra, *config.hydra.overrides.task]
    return token_problems(dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o))


class Preflight(Callback):
    """A single run: its whole config is validated (every value check of `finlora.config`), and an embedded model's
    package must be there unless the model was converted already (`finlora.embedded`). A sweep: its jobs'
    configs are validated as each job starts, and a sweeper direction other than `sweep.direction` is refused.
    Both: every value on the command line, Hydra's included, is checked for tokens."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        schema = SCHEMAS.get(config_name or "")
        if schema is None:
            return
        HydraConfig.instance().set_config(config)
        task = copy.deepcopy(config)
        with open_dict(task):
            del task["hydra"]
            task.output_dir = str(config.hydra.run.dir)  # Hydra sets its runtime folder only when the job starts
        try:
            if tokens := override_tokens(config):
                raise ConfigError.listing(tokens)
            checked = validate(task, schema)
            check_embedded(checked.model.embedded, checked.paths.cache_dir)
            hold(Path(config.hydra.run.dir))
        except (FinloraError, OSError) as err:  # OSError: the folder cannot be made (read-only, full disk)
            fail(as_fault(err))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problems = override_tokens(config)
        given = {o.split("=", 1)[1] for o in config.hydra.overrides.hydra if o.startswith("hydra.sweeper.direction=")}
        wanted = getattr(config.get("sweep", {}).get("direction"), "value", None)
        if wanted and given - {wanted}:
            problems.append(f"hydra.sweeper.direction: {given.pop()} contradicts sweep.direction={wanted}; set "
                            "sweep.direction only (the sweeper follows it)")
        if problems:
            fail(ConfigError.listing(problems))
        try:  # `report.py --rerun-failed` leaves the jobs of a live sweep to it
            hold(Path(config.hydra.sweep.dir), SWEEP_LOCK_FILE)
        except (FinloraError, OSError) as err:
            fail(as_fault(err))
