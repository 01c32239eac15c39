"""What a Hydra multirun (`python train.py -m ...`) adds around each job, and the summary at its end.

Each job records itself in `job.json` (status, error, the device it saw, start and end), names its W&B
run after its overrides and groups it under the sweep's name. A failing job is recorded and the sweep
goes on: Hydra's launchers would otherwise stop the sweep on the first job that exits, and report a
failed job only by raising at the end. When every job has run, `SweepSummary` prints the table of jobs,
writes the report (`finlora.report`) and prints the command that reruns the failed jobs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from finlora.cli import guarded
from finlora.config import ConfigError
from finlora.outputs import write_json

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
# A job stopped by Ctrl-C or SIGTERM ends the whole sweep: the user or the scheduler is stopping it.
STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
# conf/hydra/launcher/ray.yaml shares its name with the plugin's schema on purpose: the schema still checks it.
warnings.filterwarnings("ignore", message=r"\n?'hydra/launcher/ray' is validated against ConfigStore schema")


def run_job(work: Callable[[DictConfig], dict | None], cfg: DictConfig) -> dict:
    """`guarded(work, cfg)`; inside a multirun, also record the job and never let its failure end the sweep.
    Returns the run's summary, or {} for a failed job."""
    hydra = HydraConfig.get()
    if hydra.mode is not RunMode.MULTIRUN:
        return guarded(work, cfg) or {}
    job_dir = Path(hydra.runtime.output_dir)
    record: dict[str, Any] = {
        "overrides": list(hydra.overrides.task), "status": "running",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "host": socket.gethostname(),
        "pid": os.getpid(), "started": time.time()}
    write_json(job_dir / JOB_FILE, record)
    summary: dict = {}

    def checked(c: DictConfig) -> dict:
        problem = multi_device_problem(c.trainer.devices) if "trainer" in c else None
        if problem:
            raise ConfigError(problem)
        name_job(c, hydra)
        return work(c) or {}

    try:
        summary = guarded(checked, cfg)
        record["status"] = "ok"
    except SystemExit as exit:  # `guarded` printed the reason; the exception it turned into an exit holds it
        record |= {"status": "failed", "exit_code": exit.code, "error": str(exit.__context__ or "")}
        if exit.code in STOP_CODES:
            raise
    except Exception as err:
        log.exception("job %d failed", hydra.job.num)
        record |= {"status": "failed", "exit_code": 1, "error": f"{type(err).__name__}: {err}"}
    finally:
        record |= {"ended": time.time(), "device": summary.get("device"), **_gpu()}
        write_json(job_dir / JOB_FILE, record)
        if "wandb" in sys.modules:  # stop W&B's service while it is alive, not in an exiting Ray worker's atexit
            sys.modules["wandb"].teardown()
    return summary


def multi_device_problem(devices: Any) -> str | None:
    """Why a job with this device count cannot run inside a multirun, if it cannot. Lightning's DDP launcher
    starts each extra rank by re-running the command line, which under `-m` starts the whole sweep once more
    per rank; a sweep spreads one device per job instead."""
    if devices in (1, "1") or (isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1):
        return None
    return (f"trainer.devices={devices} inside a sweep (-m): Lightning's DDP would re-run the "
            "command for each extra rank, and each rank would start the sweep again. Sweep with one device per "
            "job (trainer.devices=1, hydra/launcher=ray puts each job on its own GPU), or run the multi-GPU "
            "job on its own without -m")


def name_job(cfg: DictConfig, hydra: DictConfig) -> None:
    """W&B: group = the sweep's folder name, run name = the job's overrides (unless run_name or logger.group
    were set), tags = the config's plus adapter, quant and task."""
    overridden = {o.lstrip("+~").split("=", 1)[0] for o in hydra.overrides.task}
    choices = hydra.runtime.choices
    with open_dict(cfg):
        if "run_name" not in overridden and hydra.job.override_dirname:
            cfg.run_name = hydra.job.override_dirname
        if cfg.logger.get("group") is None:
            cfg.logger.group = Path(hydra.sweep.dir).name
        extra = [f"adapter:{choices.get('adapter')}", f"quant:{choices.get('quant')}", f"task:{cfg.task.name}"]
        cfg.logger.tags = list(dict.fromkeys([*cfg.logger.get("tags", []), *extra]))


def ray_job(resource: str, *, _parent_: DictConfig) -> int:
    """`${finlora.ray_job:gpus}` and `:cpus` in conf/hydra/launcher/ray.yaml: what each job asks Ray for, from
    the `init` options beside it. Locally: one GPU per job if there are GPUs (declared in `init.num_gpus`, else
    what torch sees), and the CPUs shared among the GPUs; no GPUs: every CPU, one job at a time. On a cluster
    (`init.address`), which this process cannot see: one GPU and one CPU."""
    import torch

    init = _parent_._get_parent().init
    if init.get("address"):
        return 1
    gpus = init.get("num_gpus")
    gpus = torch.cuda.device_count() if gpus is None else int(gpus)
    if resource == "gpus":
        return int(gpus > 0)
    cpus = int(init.get("num_cpus") or os.cpu_count() or 1)
    return max(1, cpus // gpus) if gpus else cpus


OmegaConf.register_new_resolver("finlora.ray_job", ray_job)


def _gpu() -> dict:
    """The GPU this job's torch saw, by name and UUID (what tells two GPUs apart across processes)."""
    import torch

    if not torch.cuda.is_initialized():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu_name": props.name, "gpu_uuid": str(getattr(props, "uuid", ""))}


class SweepSummary(Callback):
    """At the end of a multirun: the table of every job, the report, the rerun command; exit status 1 when a
    job failed, so that scripts see it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from finlora.report import load_sweep, print_table, write_report

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
