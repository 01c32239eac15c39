"""A finished sweep's report: the table of jobs, whether they differ only in the swept keys, the seeds of each cell
aggregated (mean, standard deviation, 95% Student-t interval), plots, and the commands that rerun failed jobs.
`scripts/report.py` is the command, and reruns failed jobs. The sweep is read by `finlora.run.results`, its
statistics are `finlora.run.stats`, its plots `finlora.run.plots`; their names are importable from here too.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finlora.outputs import write_text
from finlora.run.plots import plot_cells, plot_curves, plot_params, plot_trials
from finlora.run.results import (
    GLOBAL_GROUPS,
    LIVE,
    PER_JOB_KEYS,
    SEED_KEY,
    Cell,
    Job,
    Sweep,
    group_cells,
    hydra_quoted,
    load_sweep,
    readable,
    sweep_jobs,
    unexplained_differences,
)
from finlora.run.stats import Stats, difference_stats, seed_stats, t_cdf, t_quantile

__all__ = ["GLOBAL_GROUPS", "LIVE", "PER_JOB_KEYS", "SEED_KEY", "Cell", "Job", "Stats", "Sweep", "cell_rows",
           "difference_stats", "group_cells", "hydra_quoted", "load_sweep", "markdown_table", "print_table", "readable",
           "rows", "seed_stats", "sweep_jobs", "t_cdf", "t_quantile", "unexplained_differences", "write_report"]


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
    plots = [plot_trials(sweep), plot_params(sweep)] if sweep.search else [plot_cells(sweep)]
    plots.append(plot_curves(sweep))
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


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _one_line(text: str | None) -> str:
    return " ".join(text.split())[:300] if text and text.strip() else "no error recorded"
