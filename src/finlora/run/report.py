"""A finished sweep, read back from the files its jobs wrote: a table of jobs, whether they differ only in
the swept keys, the seeds of each cell aggregated (mean, standard deviation, 95% Student-t interval), plots,
and the commands that rerun failed jobs. Reads files only (no W&B, no training); `scripts/report.py` is the
command, and reruns failed jobs.

Each job folder holds `.hydra/overrides.yaml` and `.hydra/hydra.yaml` (Hydra), `job.json`
(`finlora.run.job`), and, as far as the job got, `config.yaml`, `metrics.json` and `csv/metrics.csv`
(`finlora.train`).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from finlora.errors import DataError
from finlora.outputs import write_text
from finlora.run.job import JOB_FILE, job_suffix
from finlora.run.lock import SWEEP_LOCK_FILE, holder

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
        tests = sorted(k for k in found if k.startswith("test/") and not k.endswith(("/n", "/unparsable_rate")))
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
    for d in sorted(sweep_dir.iterdir(), key=_job_order):
        path = d / ".hydra" / "overrides.yaml"
        if path.is_file():
            raw = [str(o) for o in OmegaConf.load(path)]
            jobs.append(Job(d, _by_key(parser, raw), raw, _read_json(d / JOB_FILE), _read_json(d / "metrics.json")))
    sweep_file = sweep_dir / "multirun.yaml"
    hydra = OmegaConf.load(sweep_file).hydra if sweep_file.is_file() else OmegaConf.load(
        jobs[0].dir / ".hydra" / "hydra.yaml").hydra if jobs else None
    script = Path(hydra.runtime.cwd) / f"{hydra.job.name}.py" if hydra else Path("train.py")
    if jobs and sweep_file.is_file() and hydra.sweeper._target_.endswith("BasicSweeper"):
        started = {_job_order(j.dir)[0] for j in jobs}
        command = parser.parse_overrides(list(hydra.overrides.task))
        planned = BasicSweeper.split_arguments(command, None)[0]
        exclude = list(hydra.job.config.override_dirname.exclude_keys)
        swept = [o.key_or_group for o in command if o.is_sweep_override()]
        pending = "waiting" if holder(sweep_dir, SWEEP_LOCK_FILE) is not None else "never started"
        for num, raw in enumerate(planned):
            if num not in started:
                jobs.append(Job(sweep_dir / f"{num}_{job_suffix(raw, exclude, swept)}", _by_key(parser, raw), raw,
                                {"status": pending}, {}))
        jobs.sort(key=lambda j: _job_order(j.dir))
    search = bool(hydra) and str(hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper")
    return Sweep(sweep_dir, jobs, script, search)


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


@dataclass(frozen=True)
class Stats:
    """One metric over n runs: the mean, the sample standard deviation and the 95% interval of the mean,
    mean ± t(0.975, n−1)·std/√n (Student t, for the few seeds a cell has); no spread with one run."""

    n: int
    mean: float
    std: float | None = None
    low: float | None = None
    high: float | None = None

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        """`mean ± std [low, high]`, each value times `scale` (100 for percent)."""
        f = f"{{:.{digits}f}}".format
        if self.std is None:
            return f"{f(self.mean * scale)} (n=1)"
        return f"{f(self.mean * scale)} ± {f(self.std * scale)} [{f(self.low * scale)}, {f(self.high * scale)}]"


def seed_stats(values: list[float]) -> Stats:
    """`Stats` of the values of one cell (one per seed)."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Stats(n, mean)
    std = statistics.stdev(values)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half)


def difference_stats(a: list[float], b: list[float]) -> Stats:
    """mean(a) − mean(b) with a 95% Welch interval; the degrees of freedom are min(n_a, n_b) − 1, the
    conservative choice (wider than Welch–Satterthwaite's) that needs no fractional t quantile. `std` is the
    standard error of the difference. No interval unless both sides have two values or more."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2:
        return Stats(min(len(a), len(b)), diff)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    half = t_quantile(0.975, min(len(a), len(b)) - 1) * se
    return Stats(min(len(a), len(b)), diff, se, diff - half, diff + half)


def t_quantile(p: float, df: int) -> float:
    """The p quantile (p > 0.5) of Student's t with integer df, by bisection on its closed-form distribution
    function (Abramowitz & Stegun 26.7.3–4): no scipy needed where the study runs."""
    level = 2 * p - 1  # P(|T| < t)
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with integer df (the closed form below): one-sided p-values of a t test."""
    return 0.5 + math.copysign(_t_central(abs(t), df) / 2, t)


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with df degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    c2, series, term = math.cos(theta) ** 2, 0.0, 1.0
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 c² + … + 2·4…(df−3) / 3·5…(df−2) c^(df−3)))
        for k in range(1, (df - 1) // 2 + 1):
            series, term = series + term, term * c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    for k in range(1, df // 2 + 1):  # even: sinθ (1 + 1/2 c² + … + 1·3…(df−3) / 2·4…(df−2) c^(df−2))
        series, term = series + term, term * c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * series


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


def cell_rows(sweep: Sweep) -> tuple[list[str], list[list[str]]] | None:
    """The per-cell table (header, rows), or None when no cell has more than one finished job."""
    cells = sweep.cells
    if not any(len(c.jobs) > 1 for c in cells):
        return None
    metrics = [k for k in sweep.metric_keys if k != "steps"]
    header = [*(k for k in sweep.swept if k != SEED_KEY), "seeds", *metrics]
    body = [[*cell.values.values(), ",".join(j.overrides.get(SEED_KEY, "-") for j in cell.jobs),
             *(s.text() if (s := cell.stats(m)) else "-" for m in metrics)] for cell in cells]
    return header, body


def rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """The table's header and one row per job, as text (shared by the terminal and markdown tables)."""
    metrics = sweep.metric_keys
    header = ["job", *sweep.swept, "status", "device", *metrics, "wall s"]
    body = []
    for job in sweep.jobs:
        cells = [job.dir.name.split("_", 1)[0], *(readable(job.overrides.get(k, "-"), 4) for k in sweep.swept),
                 job.status,
                 job.device, *(_fmt(job.metrics.get(k)) for k in metrics), _fmt(job.wall_s)]
        body.append(cells)
    return header, body


def print_table(sweep: Sweep) -> None:
    table = Table(title=f"sweep {sweep.dir}")
    header, body = rows(sweep)
    for col in header:
        table.add_column(col, justify="left" if col in ("status", "device") else "right")
    for cells in body:
        table.add_row(*cells, style=None if cells[header.index("status")] == "ok" else "red")
    console = Console(width=max(120, 14 * len(header)))
    console.print(table)
    if aggregated := cell_rows(sweep):
        cells = Table(title="per cell: mean ± std [95% t interval] over seeds")
        for col in aggregated[0]:
            cells.add_column(col, justify="right")
        for row in aggregated[1]:
            cells.add_row(*row)
        console.print(cells)
    console.print(sweep.consistency())
    if sweep.no_plots:
        console.print(sweep.no_plots)
    for job in sweep.failed:
        console.print(f"[red]{job.dir.name}[/red]: {job.status}: {_one_line(job.record.get('error'))}")
    console.print(f"report: {sweep.dir / 'report.md'}")


def write_report(sweep: Sweep) -> Path:
    """`report.md` with the table, the consistency check, the plots and the failed jobs' rerun commands."""
    header, body = rows(sweep)
    ok = len(sweep.jobs) - len(sweep.failed)
    lines = [f"# Sweep `{sweep.dir.name}`", "",
             f"{len(sweep.jobs)} jobs: {ok} finished, {len(sweep.failed)} did not. {sweep.consistency()}", "",
             *markdown_table(header, body), ""]
    if aggregated := cell_rows(sweep):
        lines += ["## Per cell: mean ± standard deviation over seeds [95% Student-t interval of the mean]", "",
                  *markdown_table(*aggregated), ""]
    plots = [_plot_trials(sweep), _plot_params(sweep)] if sweep.search else [_plot_cells(sweep)]
    plots.append(_plot_curves(sweep))
    for name, title in plots:
        if name:
            lines += [f"![{title}]({name})", ""]
    sweep.no_plots = None if any(name for name, _ in plots) else "No plots: " + "; ".join(why for _, why in plots) + "."
    if sweep.no_plots:
        lines += [sweep.no_plots, ""]
    if sweep.failed:
        rerun = f"python scripts/report.py {shlex.quote(str(sweep.dir))} --rerun-failed"
        lines += ["## Jobs that did not finish", "", f"Rerun them all: `{rerun}`; or one:", ""]
        for job in sweep.failed:
            lines += [f"- `{job.dir.name}` ({job.status}): {_one_line(job.record.get('error'))}",
                      f"  `{shlex.join(job.rerun_command(sweep.script))}`"]
    path = sweep.dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body)]


def _plot_cells(sweep: Sweep) -> tuple[str | None, str]:
    """Each summary metric per cell (the seeds' mean, the 95% interval as error bar): against the LoRA rank
    when it was swept, one line per adapter × base bit width (× any other swept key but the seed), else one
    point per cell."""
    cells = [c for c in sweep.cells if any(j.config for j in c.jobs)]
    metrics = [k for k in sweep.metric_keys if k != "steps" and k != "final_train_loss"]
    if not cells:
        return None, "no job finished, so there is no metric per setting to plot"
    if not metrics:
        return None, ("the jobs logged no validation loss or test score to compare settings by (give them a "
                      "validation split that is reached, data.val_size and trainer.val_every_n_steps, or eval.enabled)")
    plt = _pyplot()
    seeds = any(len(c.jobs) > 1 for c in cells)
    by_r = "adapter.r" in sweep.swept
    others = [k for k in sweep.swept if k.split(".")[0] not in ("adapter", "quant") and k != SEED_KEY]
    cols = min(3, len(metrics))
    fig, axes = plt.subplots(-(-len(metrics) // cols), cols, figsize=(4.5 * cols, 3.6 * -(-len(metrics) // cols)),
                             squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        series: dict[str, list[tuple[Any, Stats]]] = {}
        for i, cell in enumerate(cells):
            if (stats := cell.stats(metric)) is None:
                continue
            config = next(j.config for j in cell.jobs if j.config)
            bits = config.get("quant.bits")
            label = " ".join([str(config.get("adapter.method")), f"{bits}-bit" if bits else "unquantized",
                              *(f"{k}={readable(cell.values[k])}" for k in others)]) if by_r else cell.label
            series.setdefault(label, []).append((config.get("adapter.r") if by_r else i, stats))
        for label, points in sorted(series.items()):
            points.sort(key=lambda p: p[0])
            errors = [[p[1].mean - p[1].low if p[1].low is not None else 0 for p in points],
                      [p[1].high - p[1].mean if p[1].high is not None else 0 for p in points]]
            ax.errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=errors, marker="o", capsize=3,
                        label=label)
        if by_r:
            ax.set_xlabel("adapter.r")
        else:
            ax.set_xticks(range(len(cells)), [c.label for c in cells], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric} (mean, 95% interval over seeds)" if seeds else metric, fontsize=9)
        if by_r:
            ax.legend(fontsize=7)
    name = "metric_vs_r.png" if by_r else "metric_by_cell.png"
    return _save(fig, sweep.dir / name), "metric vs r" if by_r else "metric per cell"


def _plot_curves(sweep: Sweep) -> tuple[str | None, str]:
    """Training and validation loss against the optimizer step, one line per job, one colour per cell (the
    seeds of a setting share it)."""
    curves = [(j, key, *j.curve(key)) for j in sweep.jobs for key in ("train/loss", "val/loss")]
    if not any(steps for _, _, steps, _ in curves):
        return None, "no job's csv/metrics.csv holds a train/loss or val/loss value"
    plt = _pyplot()
    cells = group_cells(sweep.jobs, [k for k in sweep.swept if k != SEED_KEY])
    colour = {id(j): f"C{i % 10}" for i, c in enumerate(cells) for j in c.jobs}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key in zip(axes[0], ("train/loss", "val/loss"), strict=True):
        for job, k, steps, values in curves:
            if k == key and steps:
                label = " ".join(f"{s}={readable(job.overrides.get(s, '-'))}" for s in sweep.swept) or job.dir.name
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label,
                        color=colour[id(job)])
        ax.set_xlabel("optimizer step")
        _whole_ticks(ax, [s for _, k, steps, _ in curves if k == key for s in steps])
        ax.set_title(key)
        ax.legend(fontsize=7)
    return _save(fig, sweep.dir / "loss_curves.png"), "loss curves"


def _trials(sweep: Sweep) -> list[tuple[int, Job, float]]:
    """(trial number, job, objective) of each finished trial of a search, in trial order."""
    return [(_job_order(j.dir)[0], j, float(j.metrics["objective"])) for j in sweep.jobs
            if j.status == "ok" and isinstance(j.metrics.get("objective"), int | float)]


def _objective_name(trials: list[tuple[int, Job, float]]) -> str:
    return str(trials[0][1].metrics.get("objective_metric") or "objective")


def _plot_trials(sweep: Sweep) -> tuple[str | None, str]:
    """A search's objective per trial, in the order the trials ran, with the best so far as a step line (in
    `sweep.direction`, which the jobs' configs record)."""
    trials = _trials(sweep)
    if not trials:
        return None, "no trial finished with its objective (metrics.json's `objective`)"
    plt = _pyplot()
    maximize = trials[0][1].config.get("sweep.direction") == "maximize"
    numbers, values = [t[0] for t in trials], [t[2] for t in trials]
    best = [max(values[:i + 1]) if maximize else min(values[:i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(numbers, values, "o", label="trial")
    ax.step(numbers, best, where="post", color="C1", label=f"best so far ({'max' if maximize else 'min'})")
    ax.set_xlabel("trial")
    _whole_ticks(ax, numbers)
    ax.set_ylabel(_objective_name(trials))
    ax.set_title(f"{_objective_name(trials)} per trial", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, sweep.dir / "objective_per_trial.png"), "objective per trial"


def _plot_params(sweep: Sweep) -> tuple[str | None, str]:
    """A search's objective against each searched parameter, one panel each: numbers on a numeric axis (a
    logarithmic one where the values span two decades or more), choices as categories, values written short."""
    trials = _trials(sweep)
    params = [k for k in sweep.swept if k != SEED_KEY]
    if not trials or not params:
        return None, ("no trial finished with its objective" if not trials else "no parameter was searched")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.6), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], params, strict=True):
        raw = [j.overrides.get(key, "-") for _, j, _ in trials]
        values = [t[2] for t in trials]
        numbers = [_number(v) for v in raw]
        if all(n is not None for n in numbers):
            ax.scatter(numbers, values)
            if min(numbers) > 0 and max(numbers) >= 100 * min(numbers):
                ax.set_xscale("log")
            if all(n.is_integer() for n in numbers):  # a rank, a step count: whole ticks
                _whole_ticks(ax, [int(n) for n in numbers])
            ax.xaxis.set_major_formatter(_short_ticks())
        else:
            levels = sorted(set(raw))
            ax.scatter([levels.index(v) for v in raw], values)
            ax.set_xticks(range(len(levels)), [readable(v) for v in levels], rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(key)
    axes[0][0].set_ylabel(_objective_name(trials))
    fig.suptitle(f"{_objective_name(trials)} against each searched parameter ({len(trials)} trials)", fontsize=9)
    return _save(fig, sweep.dir / "objective_vs_params.png"), "objective against each parameter"


def readable(value: str, digits: int = 3) -> str:
    """A value as typed on the command line, numbers written short: Optuna's 0.0012345678901234567 as 0.00123."""
    number = _number(value)
    if number is None or re.fullmatch(r"[+-]?\d+", value.strip()):
        return value
    return f"{number:.{digits}g}"


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _whole_ticks(ax: Any, values: list[int]) -> None:
    """Ticks at whole numbers only (steps, trials): each value where there are few, else whole numbers matplotlib
    spaces (its integer locator alone falls back to fractions over a range of one value)."""
    from matplotlib.ticker import MaxNLocator

    if len(set(values)) <= 10:
        ax.set_xticks(sorted(set(values)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _short_ticks() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x:.3g}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


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


def _job_order(path: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)_", path.name)
    return (int(m.group(1)) if m else sys.maxsize, path.name)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _one_line(text: str | None) -> str:
    return " ".join(text.split())[:300] if text and text.strip() else "no error recorded"
