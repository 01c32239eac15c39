"""A finished sweep, read back from the files its jobs wrote: a table of jobs, whether they differ only in
the swept keys, plots, and the commands that rerun failed jobs. Reads files only (no W&B, no training);
`scripts/report.py` is the command, and reruns failed jobs.

Each job folder holds `.hydra/overrides.yaml` and `.hydra/hydra.yaml` (Hydra), `job.json`
(`finlora.run.job`), and, as far as the job got, `config.yaml`, `metrics.json` and `csv/metrics.csv`
(`finlora.train`).
"""

from __future__ import annotations

import csv
import json
import re
import shlex
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

from finlora.outputs import write_text
from finlora.run.job import JOB_FILE, job_suffix

# Keys that differ between the jobs of any sweep by design (a folder and a name per job; tags name the
# adapter and quant choices), never evidence of a job run under other settings.
PER_JOB_KEYS = ("output_dir", "run_name", "logger.tags")
# Config groups whose options set keys outside their own package.
GLOBAL_GROUPS = ("experiment",)


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
        if status == "running":  # the process ended without its closing record: killed, or still going
            return "crashed"
        return status or ("ok" if self.metrics else "no record")

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
        return [sys.executable, str(script), "-m", f"hydra.sweep.dir='{self.dir.resolve()}'", "hydra.sweep.subdir=.",
                *self.raw_overrides]


@dataclass
class Sweep:
    dir: Path
    jobs: list[Job]
    script: Path  # train.py or eval.py, the command that ran the sweep
    swept: list[str] = field(init=False)
    unexplained: dict[str, list[Any]] = field(init=False)  # keys that differ but were not swept -> values

    def __post_init__(self) -> None:
        keys = sorted({k for j in self.jobs for k in j.overrides})
        self.swept = [k for k in keys if len({j.overrides.get(k) for j in self.jobs}) > 1]
        self.unexplained = unexplained_differences([j.config for j in self.jobs if j.config], self.swept)

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status != "ok"]

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
    `sweep_dir`, and, for a sweep of Hydra's basic sweeper, each job its command line asked for that never
    started (the sweep was killed before it), as "never started"."""
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
        for num, raw in enumerate(planned):
            if num not in started:
                jobs.append(Job(sweep_dir / f"{num}_{job_suffix(raw, exclude, swept)}", _by_key(parser, raw), raw,
                                {"status": "never started"}, {}))
        jobs.sort(key=lambda j: _job_order(j.dir))
    return Sweep(sweep_dir, jobs, script)


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


def rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """The table's header and one row per job, as text (shared by the terminal and markdown tables)."""
    metrics = sweep.metric_keys
    header = ["job", *sweep.swept, "status", "device", *metrics, "wall s"]
    body = []
    for job in sweep.jobs:
        cells = [job.dir.name.split("_", 1)[0], *(job.overrides.get(k, "-") for k in sweep.swept), job.status,
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
    console.print(sweep.consistency())
    for job in sweep.failed:
        console.print(f"[red]{job.dir.name}[/red]: {job.status}: {_one_line(job.record.get('error'))}")
    console.print(f"report: {sweep.dir / 'report.md'}")


def write_report(sweep: Sweep) -> Path:
    """`report.md` with the table, the consistency check, the plots and the failed jobs' rerun commands."""
    header, body = rows(sweep)
    ok = len(sweep.jobs) - len(sweep.failed)
    lines = [f"# Sweep `{sweep.dir.name}`", "",
             f"{len(sweep.jobs)} jobs: {ok} finished, {len(sweep.failed)} did not. {sweep.consistency()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body), ""]
    for name, title in (_plot_vs_r(sweep), _plot_curves(sweep)):
        if name:
            lines += [f"![{title}]({name})", ""]
    if sweep.failed:
        lines += ["## Jobs that did not finish", "",
                  f"Rerun them all: `python scripts/report.py {sweep.dir} --rerun-failed`; or one:", ""]
        for job in sweep.failed:
            lines += [f"- `{job.dir.name}` ({job.status}): {_one_line(job.record.get('error'))}",
                      f"  `{shlex.join(job.rerun_command(sweep.script))}`"]
    path = sweep.dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _plot_vs_r(sweep: Sweep) -> tuple[str | None, str]:
    """Each summary metric against the LoRA rank, one line per adapter × base bit width (× any other
    swept key)."""
    done = [j for j in sweep.jobs if j.status == "ok" and j.config]
    metrics = [k for k in sweep.metric_keys if k != "steps" and k != "final_train_loss"]
    if not done or not metrics:
        return None, ""
    plt = _pyplot()
    others = [k for k in sweep.swept if k.split(".")[0] not in ("adapter", "quant")]
    cols = min(3, len(metrics))
    fig, axes = plt.subplots(-(-len(metrics) // cols), cols, figsize=(4.5 * cols, 3.6 * -(-len(metrics) // cols)),
                             squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        series: dict[str, list[tuple[int, float]]] = {}
        for job in done:
            if job.metrics.get(metric) is None:
                continue
            bits = job.config.get("quant.bits")
            label = " ".join([str(job.config.get("adapter.method")), f"{bits}-bit" if bits else "unquantized",
                              *(f"{k}={job.overrides.get(k)}" for k in others)])
            series.setdefault(label, []).append((job.config.get("adapter.r"), job.metrics[metric]))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xlabel("adapter.r")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, sweep.dir / "metric_vs_r.png"), "metric vs r"


def _plot_curves(sweep: Sweep) -> tuple[str | None, str]:
    """Training and validation loss against the optimizer step, one line per job."""
    curves = [(j, key, *j.curve(key)) for j in sweep.jobs for key in ("train/loss", "val/loss")]
    if not any(steps for _, _, steps, _ in curves):
        return None, ""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key in zip(axes[0], ("train/loss", "val/loss"), strict=True):
        for job, k, steps, values in curves:
            if k == key and steps:
                label = " ".join(f"{s}={job.overrides.get(s)}" for s in sweep.swept) or job.dir.name
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend(fontsize=7)
    return _save(fig, sweep.dir / "loss_curves.png"), "loss curves"


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
    return json.loads(path.read_text()) if path.is_file() else {}


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
