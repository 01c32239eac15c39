"""One job of a Hydra multirun: its folder's name (`job_suffix`), its record (`job.json`: status, error, the
device it saw, start and end) and what it sets before it runs (its W&B names and tags, and the refusal of
several devices); a single run's W&B group and tags (`tag_run`)."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from finlora.errors import ConfigError
from finlora.outputs import write_json

JOB_FILE = "job.json"

SUFFIX_CHARS = 40
SWEPT_ENV = "FINLORA_SWEPT"  # the swept keys, set at the start of a multirun, inherited by its job processes


def job_suffix(overrides: list[str], exclude: list[str] | None = None, swept: list[str] | None = None) -> str:
    """`${finlora.job_suffix:…}` in conf/hydra/default.yaml: the readable part of a sweep job's folder name,
    after its number: `key=value` of each override by its last key part, the swept keys first, as many as fit
    in SUFFIX_CHARS, then `+N` for the N left out (a job folder named after every override hit the file-name
    limit). Path values (`exclude`) are left out; job.json and .hydra/overrides.yaml keep every override. The
    swept keys are the sweep's (`sweep.SweepSettings` sets them at its start) unless given."""
    swept = os.environ.get(SWEPT_ENV, "").split(",") if swept is None else swept
    pairs = [o.lstrip("+~").partition("=")[::2] for o in overrides]
    pairs = sorted((p for p in pairs if p[0] not in (exclude or [])), key=lambda p: p[0] not in swept)
    items = [re.sub(r"[^A-Za-z0-9._=+,:@-]", "-", f"{re.split(r'[./]', k)[-1]}={v}")[:SUFFIX_CHARS] for k, v in pairs]
    shown: list[str] = []
    while len(shown) < len(items) and len(",".join([*shown, items[len(shown)]])) <= SUFFIX_CHARS:
        shown.append(items[len(shown)])
    rest = len(items) - len(shown)
    return ",".join(shown) + (f"+{rest}" if rest else "")


OmegaConf.register_new_resolver("finlora.job_suffix", job_suffix)


class JobRecord:
    """`job.json` in the job's folder: written as "running" when the job starts, and again when it ends. A
    record left "running" tells of a process that was killed."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def start(cls, hydra: DictConfig) -> JobRecord:
        record = cls(Path(hydra.runtime.output_dir) / JOB_FILE, {
            "overrides": list(hydra.overrides.task), "status": "running",
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "host": socket.gethostname(),
            "pid": os.getpid(), "started": time.time()})
        write_json(record.path, record.data)
        return record

    def succeeded(self, summary: dict) -> None:
        self.data |= {"status": "ok", "device": summary.get("device")}

    def failed(self, err: BaseException, exit_code: int) -> None:
        self.data |= {"status": "failed", "exit_code": exit_code, "error": f"{type(err).__name__}: {err}"}

    def close(self) -> None:
        """Write the final record; stop W&B's service while it is alive, not in an exiting Ray worker's atexit."""
        self.data |= {"ended": time.time(), **_gpu()}
        self.data.setdefault("device", None)
        write_json(self.path, self.data)
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()


def prepare_job(cfg: DictConfig, hydra: DictConfig) -> None:
    """Refuse several devices in a job, name the job's W&B run, and share one compile cache in the sweep."""
    problem = multi_device_problem(cfg.trainer.devices) if "trainer" in cfg else None
    if problem:
        raise ConfigError(problem)
    name_job(cfg, hydra)
    if "paths" in cfg and "compile_cache" in cfg.paths:
        with open_dict(cfg):
            cfg.paths.compile_cache = str(Path(hydra.sweep.dir) / "compile_cache")


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
    """W&B, in a sweep: run name = the job's folder name (its number and a short part of its overrides) unless
    run_name was set; group = the sweep's folder name unless logger.group was set; tags as `tag_run`."""
    overridden = {o.lstrip("+~").split("=", 1)[0] for o in hydra.overrides.task}
    with open_dict(cfg):
        if "run_name" not in overridden:
            cfg.run_name = Path(hydra.runtime.output_dir).name
        if cfg.logger.get("group") is None:
            cfg.logger.group = Path(hydra.sweep.dir).name
    tag_run(cfg, hydra)


def tag_run(cfg: DictConfig, hydra: DictConfig) -> None:
    """W&B tags = the config's plus adapter, quant and task; for a single run with no logger.group, the group is
    the experiment preset, else the task, so that runs of one study sit together. A command without a logger
    (`export.py`, `predict.py`) has none to tag."""
    if "logger" not in cfg:
        return
    choices = hydra.runtime.choices
    with open_dict(cfg):
        if cfg.logger.get("group") is None:
            cfg.logger.group = choices.get("experiment") or cfg.task.name
        extra = [f"adapter:{choices.get('adapter')}", f"quant:{choices.get('quant')}", f"task:{cfg.task.name}"]
        cfg.logger.tags = list(dict.fromkeys([*cfg.logger.get("tags", []), *extra]))


def _gpu() -> dict:
    """The GPU this job's torch saw, by name and UUID (what tells two GPUs apart across processes)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu_name": props.name, "gpu_uuid": str(getattr(props, "uuid", ""))}
