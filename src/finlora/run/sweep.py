"""The end of a Hydra multirun, and what each job of a Ray sweep asks for.

Each job records itself (`finlora.run.job`); when every job has run, `SweepSummary` prints the table of
jobs, writes the report (`finlora.run.report`) and prints the command that reruns the failed jobs.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from finlora.compat.hydra import grandparent
from finlora.run.job import SWEPT_ENV

# conf/hydra/launcher/ray.yaml shares its name with the plugin's schema on purpose: the schema still checks it.
warnings.filterwarnings("ignore", message=r"\n?'hydra/launcher/ray' is validated against ConfigStore schema")


def ray_job(resource: str, *, _parent_: DictConfig) -> int:
    """`${finlora.ray_job:gpus}` and `:cpus` in conf/hydra/launcher/ray.yaml: what each job asks Ray for, from
    the `init` options beside it. Locally: one GPU per job if there are GPUs (declared in `init.num_gpus`, else
    what torch sees), and the CPUs shared among the GPUs; no GPUs: every CPU, one job at a time. On a cluster
    (`init.address`), which this process cannot see: one GPU and one CPU."""
    import torch

    init = grandparent(_parent_).init
    if init.get("address"):
        return 1
    gpus = init.get("num_gpus")
    gpus = torch.cuda.device_count() if gpus is None else int(gpus)
    if resource == "gpus":
        return int(gpus > 0)
    cpus = int(init.get("num_cpus") or os.cpu_count() or 1)
    return max(1, cpus // gpus) if gpus else cpus


OmegaConf.register_new_resolver("finlora.ray_job", ray_job)


class SweepSettings(Callback):
    """At the start of a multirun: the swept keys go to the job folders' names first (`job_suffix`), and
    `hydra/sweeper=optuna` (hydra-optuna-sweeper, the `sweeps` extra) optimizes in `sweep.direction`, its study
    named after the script unless `hydra.sweeper.study_name` is given. Set here, before Hydra builds the
    sweeper: a config file named like the plugin's own entry cannot add to it (that entry has a defaults list)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweeper = config.hydra.sweeper
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()] + list(sweeper.get("params") or {})
        os.environ[SWEPT_ENV] = ",".join(swept)
        if not str(sweeper.get("_target_", "")).endswith("OptunaSweeper") or "sweep" not in config:
            return
        with read_write(sweeper), open_dict(sweeper):
            sweeper.direction = getattr(config.sweep.direction, "value", config.sweep.direction)  # Enum or name
            if sweeper.get("study_name") is None:
                sweeper.study_name = config.hydra.job.name


class SweepSummary(Callback):
    """At the end of a multirun: the table of every job, the report, the rerun command; exit status 1 when a
    job failed, so that scripts see it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from finlora.run.report import load_sweep, print_table, write_report

        sweep = load_sweep(Path(str(config.hydra.sweep.dir)))
        if not sweep.jobs:
            return
        write_report(sweep)
        print_table(sweep)
        failed = sweep.failed
        if failed:
            print(f"{len(failed)} of {len(sweep.jobs)} jobs failed; rerun them (each in its own folder) with:\n"
                  f"  python scripts/report.py {sweep.dir} --rerun-failed", file=sys.stderr)
            sys.exit(1)
