"""A sweep read back from the files its jobs wrote: its jobs (each with its command-line overrides, record, config
and metrics), the jobs its command line planned that have not started, and the cells that group the seeds of one
setting. Reads files only (no W&B, no training).

Each job folder holds `.hydra/overrides.yaml` and `.hydra/hydra.yaml` (Hydra), `job.json`
(`finlora.run.job`), and, as far as the job got, `config.yaml`, `metrics.json` and `csv/metrics.csv`
(`finlora.train`).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import OmegaConf

from finlora import metric_names as names
from finlora.errors import DataError
from finlora.run.job import JOB_FILE, job_suffix
from finlora.run.lock import SWEEP_LOCK_FILE, holder
from finlora.run.stats import Stats, seed_stats

# Keys that differ between the jobs of any sweep by design (a folder and a name per job; tags name the
# adapter and quant choices), never evidence of a job run under other settings.
PER_JOB_KEYS = ("output_dir", "run_name", "logger.tags")


# Config groups whose options set keys outside their own package.
GLOBAL_GROUPS = ("experiment",)


SEED_KEY = "seed"  # swept to repeat a cell, never to define one


LIVE = ("running", "waiting")  # a job whose process holds its folder, or one a live sweep has yet to start


@dataclass
class Job:
    dir: Path
    overrides: dict[str, str]  # key (or config group) -> value, as typed on the command line
    raw_overrides: list[str]
    record: dict[str, Any]  # job.json
    metrics: dict[str, Any]  # metrics.json

    @property
    def status(self) -> str:
        status = self.record.get("status")
        if status == "running":  # without its closing record: still going (its lock is held), or killed
            return "running" if self.holder is not None else "crashed"
        return status or ("ok" if self.metrics else "no record")

    @cached_property
    def holder(self) -> dict[str, Any] | None:
        """The live process that runs this job now (`finlora.run.lock`), or None."""
        return holder(self.dir)

    @property
    def device(self) -> str:
        """The torch device the run used and, where Ray or SLURM assigned one, the GPU the job was given."""
        gpu = self.record.get("cuda_visible_devices")
        device = str(self.record.get("device") or "-")
        return f"{device} (GPU {gpu})" if gpu not in (None, "") else device

    @property
    def wall_s(self) -> float | None:
        rec = self.record
        return round(rec["ended"] - rec["started"], 1) if "ended" in rec and "started" in rec else None

    @cached_property
    def config(self) -> dict[str, Any]:
        path = self.dir / "config.yaml"
        return _flatten(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else {}

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged metric from the job's CSV log."""
        path = self.dir / "csv" / "metrics.csv"
        if not path.is_file():
            return [], []
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get(key)]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]

    def rerun_command(self, script: Path) -> list[str]:
        """The command that runs this job again, alone, in its own folder (where a checkpoint resumes it). The
        folder is the rerun's whole sweep folder, so the sweep's own `multirun.yaml` is never rewritten."""
        return [sys.executable, str(script), "-m", f"hydra.sweep.dir={hydra_quoted(str(self.dir.resolve()))}",
                "hydra.sweep.subdir=.", *self.raw_overrides]


def hydra_quoted(value: str) -> str:
    """`value` as one quoted string of a Hydra override, whatever characters it holds (a path with `'` in it):
    quotes escaped, and the backslashes before a quote or at the end doubled, as Hydra's grammar reads them."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


@dataclass
class Sweep:
    dir: Path
    jobs: list[Job]
    script: Path  # train.py or eval.py, the command that ran the sweep
    search: bool = False  # a search (hydra/sweeper=optuna): each job is a trial, not a cell of a grid
    swept: list[str] = field(init=False)
    no_plots: str | None = field(init=False, default=None)  # why `write_report` drew no plot, if it drew none
    unexplained: dict[str, list[Any]] = field(init=False)  # keys that differ but were not swept -> values

    def __post_init__(self) -> None:
        keys = sorted({k for j in self.jobs for k in j.overrides})
        self.swept = [k for k in keys if len({j.overrides.get(k) for j in self.jobs}) > 1]
        self.unexplained = unexplained_differences([j.config for j in self.jobs if j.config], self.swept)

    @property
    def failed(self) -> list[Job]:
        """The jobs that did not finish and are not under way: what `--rerun-failed` runs again."""
        return [j for j in self.jobs if j.status not in ("ok", *LIVE)]

    @property
    def live(self) -> list[Job]:
        """The jobs still running, and those a live sweep has yet to start: never rerun beside it."""
        return [j for j in self.jobs if j.status in LIVE]

    @property
    def cells(self) -> list[Cell]:
        """The finished jobs grouped by every swept key except the seed."""
        return group_cells([j for j in self.jobs if j.status == "ok"], [k for k in self.swept if k != SEED_KEY])

    @property
    def metric_keys(self) -> list[str]:
        """The summary metrics worth a column: losses and each test set's scores."""
        found = {k for j in self.jobs for k, v in j.metrics.items() if isinstance(v, int | float)}
        tests = sorted(k for k in found
                       if k.startswith(names.TEST_PREFIX) and not k.endswith(("/n", "/unparsable_rate")))
        return [k for k in ("steps", "final_train_loss", "final_val_loss") if k in found] + tests

    def consistency(self) -> str:
        """The sentence the report gives about what the jobs share."""
        if len(self.jobs) < 2:
            return "One job: nothing to compare."
        swept = ", ".join(f"`{k}`" for k in self.swept) or "nothing"
        if any(k.split("/")[-1] in GLOBAL_GROUPS for k in self.swept):
            return f"Swept: {swept}; an experiment preset can set any key, so differences are not checked."
        if not self.unexplained:
            return f"Swept: {swept}. The jobs' configs differ only in the swept keys."
        extra = "; ".join(f"`{k}`: {', '.join(map(str, v))}" for k, v in self.unexplained.items())
        return f"Swept: {swept}. **Warning**: the jobs also differ in keys that were not swept: {extra}."


def load_sweep(sweep_dir: Path) -> Sweep:
    """Every job of the sweep, in job order: each job folder (one with `.hydra/overrides.yaml`) directly under
    `sweep_dir`, and, for a sweep of Hydra's basic sweeper, each job its command line asked for that has not
    started: "waiting" while the sweep's process still runs, else "never started" (the sweep was killed before
    it). A path that is not a folder is a `DataError`."""
    if not sweep_dir.is_dir():
        raise DataError(f"{shlex.quote(str(sweep_dir))} is {'not a folder' if sweep_dir.exists() else 'missing'}: "
                        "give a sweep's folder (outputs/sweeps/<time>)")
    parser = OverridesParser.create()
    jobs = []
    for d in sorted(sweep_dir.iterdir(), key=job_order):
        path = d / ".hydra" / "overrides.yaml"
        if path.is_file():
            raw = [str(o) for o in OmegaConf.load(path)]
            jobs.append(Job(d, _by_key(parser, raw), raw, _read_json(d / JOB_FILE), _read_json(d / "metrics.json")))
    sweep_file = sweep_dir / "multirun.yaml"
    hydra = OmegaConf.load(sweep_file).hydra if sweep_file.is_file() else OmegaConf.load(
        jobs[0].dir / ".hydra" / "hydra.yaml").hydra if jobs else None
    script = Path(hydra.runtime.cwd) / f"{hydra.job.name}.py" if hydra else Path("train.py")
    if jobs and sweep_file.is_file() and str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        started = {job_order(j.dir)[0] for j in jobs}
        command = parser.parse_overrides(list(hydra.overrides.task))
        planned = sweep_jobs(command)
        exclude = list(hydra.job.config.override_dirname.exclude_keys)
        swept = [o.key_or_group for o in command if o.is_sweep_override()]
        pending = "waiting" if holder(sweep_dir, SWEEP_LOCK_FILE) is not None else "never started"
        for num, raw in enumerate(planned):
            if num not in started:
                jobs.append(Job(sweep_dir / f"{num}_{job_suffix(raw, exclude, swept)}", _by_key(parser, raw), raw,
                                {"status": pending}, {}))
        jobs.sort(key=lambda j: job_order(j.dir))
    search = bool(hydra) and str(hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper")
    return Sweep(sweep_dir, jobs, script, search)


def sweep_jobs(overrides: list[Override]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper runs for a command line's parsed `overrides`, each as its override strings, in
    the sweeper's order, from Hydra's public override API: one list of values a key (a sweep's, else its one value;
    a key given again keeps its first place and its last values), and every combination of them, the last key
    varying fastest. A sweep the basic sweeper cannot enumerate (an interval) is refused as it refuses it."""
    values: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(f"BasicSweeper does not support sweep type : {override.value_type.name}")
    return [list(job) for job in itertools.product(*values.values())]


def _by_key(parser: OverridesParser, raw: list[str]) -> dict[str, str]:
    return {o.key_or_group.replace("/", "."): o.get_value_element_as_str() for o in parser.parse_overrides(raw)}


def unexplained_differences(configs: list[dict[str, Any]], swept: list[str]) -> dict[str, list[Any]]:
    """Keys whose values differ between the flattened configs but that no swept key (or config group)
    covers, with the distinct values seen."""
    out: dict[str, list[Any]] = {}
    for key in sorted({k for c in configs for k in c}):
        if key in PER_JOB_KEYS or any(key == s or key.startswith(s + ".") for s in swept):
            continue
        values = list(dict.fromkeys(json.dumps(c.get(key), default=str) for c in configs))
        if len(values) > 1:
            out[key] = [json.loads(v) for v in values]
    return out


@dataclass
class Cell:
    """Finished jobs that share a value for each of `values`' keys: the seeds of one setting."""

    values: dict[str, str]
    jobs: list[Job]

    def stats(self, metric: str) -> Stats | None:
        found = [j.metrics[metric] for j in self.jobs if isinstance(j.metrics.get(metric), int | float)]
        return seed_stats(found) if found else None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={readable(v)}" for k, v in self.values.items()) or "all jobs"


def group_cells(jobs: list[Job], keys: list[str]) -> list[Cell]:
    """The jobs grouped by their (command-line) values of `keys`, in the order each group first appears."""
    cells: dict[tuple[str, ...], Cell] = {}
    for job in jobs:
        values = {k: job.overrides.get(k, "-") for k in keys}
        cells.setdefault(tuple(values.values()), Cell(values, [])).jobs.append(job)
    return list(cells.values())


def readable(value: str, digits: int = 3) -> str:
    """A value as typed on the command line, numbers written short: Optuna's 0.0012345678901234567 as 0.00123."""
    number = as_number(value)
    if number is None or re.fullmatch(r"[+-]?\d+", value.strip()):
        return value
    return f"{number:.{digits}g}"


def as_number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _read_json(path: Path) -> dict[str, Any]:
    """The file's object, {} if it is missing; one that is cut short or damaged is said in one line and counts
    as missing (the job's status then says "no record"; `--rerun-failed` runs it again)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        print(f"report: {shlex.quote(str(path))} cannot be read ({err}); the job counts as having no record",
              file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def job_order(path: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)_", path.name)
    return (int(m.group(1)) if m else sys.maxsize, path.name)
