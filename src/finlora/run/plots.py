"""The plots of a sweep's report, as PNG files in its folder: each metric per cell (or against the LoRA rank), the
loss curves, and for a search the objective per trial and against each searched parameter. Each `plot_*` returns the
file's name (None when there is nothing to draw) and its title, or why it drew nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finlora import metric_names as names
from finlora.run.results import SEED_KEY, Job, Sweep, as_number, group_cells, job_order, readable
from finlora.run.stats import Stats


def plot_cells(sweep: Sweep) -> tuple[str | None, str]:
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


def plot_curves(sweep: Sweep) -> tuple[str | None, str]:
    """Training and validation loss against the optimizer step, one line per job, one colour per cell (the
    seeds of a setting share it)."""
    curves = [(j, key, *j.curve(key)) for j in sweep.jobs for key in (names.TRAIN_LOSS, names.VAL_LOSS)]
    if not any(steps for _, _, steps, _ in curves):
        return None, "no job's csv/metrics.csv holds a train/loss or val/loss value"
    plt = _pyplot()
    cells = group_cells(sweep.jobs, [k for k in sweep.swept if k != SEED_KEY])
    colour = {id(j): f"C{i % 10}" for i, c in enumerate(cells) for j in c.jobs}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key in zip(axes[0], (names.TRAIN_LOSS, names.VAL_LOSS), strict=True):
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
    return [(job_order(j.dir)[0], j, float(j.metrics["objective"])) for j in sweep.jobs
            if j.status == "ok" and isinstance(j.metrics.get("objective"), int | float)]


def _objective_name(trials: list[tuple[int, Job, float]]) -> str:
    return str(trials[0][1].metrics.get("objective_metric") or "objective")


def plot_trials(sweep: Sweep) -> tuple[str | None, str]:
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


def plot_params(sweep: Sweep) -> tuple[str | None, str]:
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
        numbers = [as_number(v) for v in raw]
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
