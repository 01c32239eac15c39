"""Issue 16's study: which of FinLoRA's DoRA-run differences, if any, makes DoRA fall behind LoRA?

FinLoRA's DoRA runs differed from its LoRA runs in more than the adapter: lora_alpha 32 (not 16), dropout
0.1 (not 0.05), a training prompt wrapped in [INST] … [/INST] while evaluation used the raw one, and, as its
docs suggest, a learning rate the magnitude vectors share with the low-rank matrices. Each cell here changes
one of them from `experiment=dora_gap` (conf/experiment/dora_gap.yaml), for LoRA and for DoRA, and runs
3 seeds; then docs/dora_gap.md gives, per cell and test set, the mean, standard deviation and 95% Student-t
interval over the seeds, the differences that decide the question with their intervals, and a chart; each
job's config.yaml and metrics.json are copied under docs/dora_gap/.

    python scripts/dora_gap.py                      # every cell, then the report (about 15 min on 2 H100s)
    python scripts/dora_gap.py --time-limit 480     # stop (checkpointed) after 8 min, report what finished
    python scripts/dora_gap.py --dry-run            # the sweeps it would run
    python scripts/dora_gap.py --report-only        # rewrite the report from outputs/dora_gap
    python scripts/dora_gap.py --cells lora-baseline dora-baseline dora-mlr10   # some cells only
    python scripts/dora_gap.py trainer.max_steps=600                           # overrides for every job

Each cell is one sweep of the project's own `train.py -m … seed=1,2,3` in outputs/dora_gap/<cell>/; up to
`--parallel` sweeps share the GPU at once (the 135M model leaves an H100 mostly idle, its steps are bound by
the host). Cells run in the order of CELLS, the ones that decide the question first; seeds run in order
within each cell, so a cut-off study has the first seeds of every cell. Run the same command again after a
cut: a finished cell is left alone, and a cell cut short reruns only its jobs that did not finish, each
resuming from its last checkpoint (as `scripts/report.py --rerun-failed` does). Write your reading of the
results into docs/dora_gap/NOTES.md and rerun with --report-only: the report includes it.

Time, measured (docs/dora_gap.md): with 11 sweeps on 2 H100s (`--gpus`, default all visible), a job trained its
300 steps in 42–62 s and scored its 1,735 test rows (500 of FPB, TFNS, NWGI, all 235 of FiQA) in about 210 s:
processes sharing a GPU run their kernels in turn, and eager decoding is many small kernels. So one round of
seeds takes about 4.5 minutes there, and the whole study (3 rounds) about 15 (one GPU: not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from finlora.errors import ConfigError
from finlora.outputs import write_json, write_text
from finlora.run.report import Stats, Sweep, difference_stats, load_sweep, markdown_table, seed_stats

ROOT = Path(__file__).resolve().parents[1]
TEST_SETS = ("fpb", "fiqa", "tfns", "nwgi")
FINLORA_ALL = ["adapter.alpha=32", "adapter.dropout=0.1", "data.train_prompt=finlora_inst"]
FACTORS = {  # one of FinLoRA's DoRA-run differences at a time: name -> (what it is, overrides)
    "baseline": ("baseline (alpha 16, dropout 0.05, raw prompt)", []),
    "inst": ("[INST] training prompt", ["data.train_prompt=finlora_inst"]),
    "alpha32": ("alpha 32", ["adapter.alpha=32"]),
    "dropout0.1": ("dropout 0.1", ["adapter.dropout=0.1"]),
    "mlr10": ("magnitude lr ×10", ["adapter.magnitude_lr_scale=10"]),
    "finlora": ("all three of FinLoRA's DoRA settings", FINLORA_ALL),
}
ADAPTERS = {"lora": "LoRA", "dora": "DoRA"}
STOP_GRACE_S = 60  # after SIGTERM: time to finish the optimizer step and write last.ckpt before SIGKILL


@dataclass(frozen=True)
class Cell:
    adapter: str
    factor: str

    @property
    def name(self) -> str:
        return f"{self.adapter}-{self.factor}"

    @property
    def overrides(self) -> list[str]:
        return ["experiment=dora_gap", f"adapter={self.adapter}", *FACTORS[self.factor][1]]


# The study, the cells that decide the question first; the last two (FinLoRA's settings together) only on request.
CELLS = [Cell(a, f) for f in ("baseline", "inst", "alpha32", "dropout0.1") for a in ADAPTERS] + [Cell("dora", "mlr10")]
EXTRA_CELLS = [Cell(a, "finlora") for a in ADAPTERS]


def commands(cell: Cell, sweep_dir: Path, seeds: list[int], extra: list[str]) -> list[list[str]]:
    """The cell's sweep; for a sweep that started before, only the reruns of the jobs that did not finish."""
    if (sweep_dir / "multirun.yaml").is_file():
        return [job.rerun_command(ROOT / "train.py") for job in load_sweep(sweep_dir).failed]
    return [[sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *cell.overrides,
             f"seed={','.join(map(str, seeds))}", *extra]]


def prepare(cells: list[Cell], extra: list[str]) -> None:
    """Validate every cell's config now (all bad values at once, not one failed job at a time) and convert the
    embedded model once, before the sweeps start and would each convert it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from finlora.config import validate
    from finlora.models import resolve_source

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for cell in cells:
            cfg = compose("train", [*cell.overrides, *extra, "output_dir=."], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            try:
                run = validate(cfg)
            except ConfigError as err:
                raise ConfigError(f"cell {cell.name}: {err}") from None
    resolve_source(run.model, run.paths.cache_dir)


def run_cells(cells: list[Cell], runs: Path, seeds: list[int], extra: list[str], parallel: int,
              time_limit: float | None = None, gpus: int = 1) -> None:
    """Each cell's commands one after another in its own thread, `parallel` cells at once; output to
    `<runs>/<cell>.log`. With several `gpus`, the cells take them in turn (each sweep sees one GPU). The jobs
    run this checkout's code (its src/ first on PYTHONPATH). After `time_limit`
    seconds each sweep still running gets SIGTERM (its job under way checkpoints and stops) and nothing more
    starts, so the report is written inside a fixed lease; the same command later finishes the rest."""
    from finlora.devices import environment

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    runs.mkdir(parents=True, exist_ok=True)
    write_json(runs / "environment.json", environment() | {"parallel": parallel, "gpus": gpus})

    deadline = time.monotonic() + time_limit if time_limit else None
    ids = (os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(gpus)))).split(",")

    def work(cell: Cell) -> None:
        todo = commands(cell, runs / cell.name, seeds, extra)
        cell_env = env | ({"CUDA_VISIBLE_DEVICES": ids[cells.index(cell) % gpus]} if gpus > 1 else {})
        print(f"{cell.name}: {len(todo)} command(s), log {runs / (cell.name + '.log')}", flush=True)
        with (runs / f"{cell.name}.log").open("a") as log:
            for cmd in todo:
                if deadline is not None and time.monotonic() >= deadline:
                    print(f"{cell.name}: time limit reached, not started: {' '.join(cmd[-3:])}", flush=True)
                    break
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, env=cell_env, stdout=log, stderr=subprocess.STDOUT)
                try:
                    rc = proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        rc = proc.wait(STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = proc.wait()
                print(f"{cell.name}: exit status {rc}", flush=True)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(work, cells))


def load(runs: Path, cells: list[Cell]) -> dict[Cell, Sweep]:
    return {c: load_sweep(runs / c.name) for c in cells if (runs / c.name).is_dir()}


def values(sweep: Sweep, metric: str) -> list[float]:
    """The metric of each finished job of a cell; `mean/<metric>` is the mean over the four test sets."""
    done = [j for j in sweep.jobs if j.status == "ok"]
    if metric.startswith("mean/"):
        name = metric.split("/", 1)[1]
        return [statistics.fmean(j.metrics[f"test/{t}/{name}"] for t in TEST_SETS) for j in done
                if all(f"test/{t}/{name}" in j.metrics for t in TEST_SETS)]
    return [j.metrics[metric] for j in done if isinstance(j.metrics.get(metric), int | float)]


def _pct(stats: Stats | None, signed: bool = False) -> str:
    """A cell's percentage; a difference (`signed`) is marked `*` when its interval excludes 0."""
    if stats is None:
        return "-"
    text = stats.text(scale=100, digits=1)
    mark = " *" if signed and stats.low is not None and (stats.low > 0 or stats.high < 0) else ""
    return ("+" if signed and stats.mean >= 0 else "") + text + mark


def comparisons(results: dict[Cell, Sweep]) -> list[tuple[str, Cell, Cell]]:
    """(what, a, b): a − b for DoRA against LoRA at each setting, and each setting against the baseline."""
    have = {c.name: c for c in results}
    out = []
    for factor, (label, _) in FACTORS.items():
        dora, lora = have.get(f"dora-{factor}"), have.get(f"lora-{factor}")
        if dora and (lora or have.get("lora-baseline")):
            out.append((f"DoRA − LoRA, {label}" if lora else f"DoRA {label} − LoRA baseline", dora,
                        lora or have["lora-baseline"]))
    if (dora := have.get("dora-finlora")) and (lora := have.get("lora-baseline")):
        out.append(("FinLoRA's own comparison: DoRA with its DoRA-run settings − LoRA baseline", dora, lora))
    for adapter, name in ADAPTERS.items():
        base = have.get(f"{adapter}-baseline")
        for factor, (label, _) in list(FACTORS.items())[1:]:
            if base and (cell := have.get(f"{adapter}-{factor}")):
                out.append((f"{name}: {label} − baseline", cell, base))
    return out


def write_report(runs: Path, results: dict[Cell, Sweep], docs: Path) -> Path:
    """docs/dora_gap.md, docs/dora_gap.png and each job's config.yaml and metrics.json under docs/dora_gap/."""
    out = docs / "dora_gap"
    for cell, sweep in results.items():
        for job in sweep.jobs:
            if job.status == "ok":
                for name in ("config.yaml", "metrics.json"):
                    target = out / cell.name / f"seed{job.overrides.get('seed', '-')}" / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(job.dir / name, target)
    if (runs / "environment.json").is_file():
        shutil.copyfile(runs / "environment.json", out / "environment.json")
    metrics = [f"test/{t}/accuracy" for t in TEST_SETS] + ["mean/accuracy"]
    columns = [*TEST_SETS, "mean of the four"]

    def table(metric_names: list[str]) -> list[str]:
        body = [[f"{ADAPTERS[c.adapter]}, {FACTORS[c.factor][0]}", str(len(values(s, metric_names[0]))),
                 *(_pct(seed_stats(v) if (v := values(s, m)) else None) for m in metric_names)]
                for c, s in results.items()]
        return markdown_table(["cell", "seeds", *columns], body)

    diffs = [[what, *(_pct(difference_stats(va, vb) if (va := values(results[a], m)) and (vb := values(
        results[b], m)) else None, signed=True) for m in metrics)] for what, a, b in comparisons(results)]
    unparsable = [[f"{ADAPTERS[c.adapter]}, {FACTORS[c.factor][0]}", *(
        f"{100 * statistics.fmean(v):.1f}" if (v := values(s, f"test/{t}/unparsable_rate")) else "-"
        for t in TEST_SETS)] for c, s in results.items()]
    chart = plot(results, docs / "dora_gap.png")
    jobs = sum(len(s.jobs) for s in results.values())
    unfinished = sorted(f"{c.name}/{j.dir.name} ({j.status})" for c, s in results.items() for j in s.failed)
    notes = out / "NOTES.md"
    lines = ["# FinLoRA's DoRA gap, explained: one FinLoRA difference at a time", "",
             "Produced by `python scripts/dora_gap.py` (issue 16); the study's design and time estimate are in "
             "that script's docstring, the shared settings in `conf/experiment/dora_gap.yaml`.", "",
             *setup_lines(results, runs), "",
             f"{jobs} jobs, {jobs - len(unfinished)} finished"
             + (f"; not finished: {', '.join(unfinished)}" if unfinished else "") + ".", ""]
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += ["## Accuracy (%): mean ± standard deviation over seeds [95% Student-t interval of the mean]", "",
              *table(metrics), "", "## Weighted F1 (%), the same way", "",
              *table([f"test/{t}/f1" for t in TEST_SETS] + ["mean/f1"]), "",
              "## Differences in accuracy (points): a − b, mean ± standard error [95% interval]", "",
              "Welch's interval with min(n_a, n_b) − 1 degrees of freedom (conservative); `*`: the interval excludes 0."
              " Seeds are not paired.", "", *markdown_table(["a − b", *columns], diffs), ""]
    if chart:
        lines += [f"![accuracy per cell]({chart.name})", ""]
    lines += ["## Unparsable answers (%, no label found in the generation; mean over seeds)", "",
              *markdown_table(["cell", *TEST_SETS], unparsable), "",
              "Each job's `config.yaml` and `metrics.json`: `docs/dora_gap/<cell>/seed<k>/`.", ""]
    path = docs / "dora_gap.md"
    write_text(path, "\n".join(lines))
    return path


def setup_lines(results: dict[Cell, Sweep], runs: Path) -> list[str]:
    """What the runs shared, read from their own config.yaml, and where they ran."""
    job = next((j for s in results.values() for j in s.jobs if j.status == "ok"), None)
    if job is None:
        return ["No job has finished yet."]
    cfg = OmegaConf.load(job.dir / "config.yaml")
    t, a, e = cfg.trainer, cfg.adapter, cfg.eval
    env = json.loads((runs / "environment.json").read_text()) if (runs / "environment.json").is_file() else {}
    walls = [j.wall_s for s in results.values() for j in s.jobs if j.wall_s is not None]
    gpu = job.record.get("gpu_name") or env.get("device", "?")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    return [f"- Model `{cfg.model.name_or_path}`, {f'{cfg.quant.bits}-bit' if cfg.quant.bits else 'unquantized'}, "
            f"task `{cfg.task.name}` "
            f"(tested on {', '.join(TEST_SETS)}; TFNS on the fixed labels, NWGI never trained on), "
            f"{job.metrics.get('precision', '?')}.",
            f"- Each job: {t.max_steps} steps of {t.batch_size} examples, AdamW lr {t.lr:g}, {t.warmup_steps} warm-up "
            f"steps, {t.scheduler} schedule; baseline adapter r={a.r}, alpha {a.alpha:g}, dropout {a.dropout:g} on "
            f"{', '.join(a.target_modules)}; evaluation on {e.limit or 'all'} rows per test set "
            f"({e.sample}, seed {e.seed}: the same rows in every job), greedy, batch {e.batch_size}, raw prompts.",
            f"- Ran on {gpu}; {versions or 'versions not recorded'}; "
            + (f"{statistics.fmean(walls):.0f} s per job on average (training and test), "
               f"{env.get('parallel', '?')} sweeps at once on {env.get('gpus', 1)} GPU(s)." if walls else "")]


def plot(results: dict[Cell, Sweep], path: Path) -> Path | None:
    """Accuracy per factor, LoRA and DoRA side by side, one panel per test set; bars: the 95% intervals."""
    if not any(j.status == "ok" for s in results.values() for j in s.jobs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [f for f in FACTORS if any(c.factor == f for c in results)]
    fig, axes = plt.subplots(1, len(TEST_SETS), figsize=(4 * len(TEST_SETS), 3.8), sharey=False, squeeze=False)
    for ax, test in zip(axes[0], TEST_SETS, strict=True):
        for k, (adapter, name) in enumerate(ADAPTERS.items()):
            xs, means, errs = [], [], [[], []]
            for i, factor in enumerate(factors):
                sweep = results.get(Cell(adapter, factor))
                if sweep is None or not (v := values(sweep, f"test/{test}/accuracy")):
                    continue
                s = seed_stats(v)
                xs.append(i + (k - 0.5) * 0.25)
                means.append(100 * s.mean)
                errs[0].append(100 * (s.mean - s.low) if s.low is not None else 0)
                errs[1].append(100 * (s.high - s.mean) if s.high is not None else 0)
            ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=3, label=name)
        ax.set_xticks(range(len(factors)), [FACTORS[f][0].split(" (")[0] for f in factors], rotation=35, ha="right",
                      fontsize=7)
        ax.set_title(f"{test} accuracy (%)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA vs DoRA, one FinLoRA difference at a time (mean over seeds, 95% interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = {c.name: c for c in CELLS + EXTRA_CELLS}
    parser.add_argument("--cells", nargs="+", choices=list(names), default=[c.name for c in CELLS],
                        help="cells to run, in this order (default: the study's nine)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--parallel", type=int, default=9, help="sweeps running at once")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs the cells take in turn (default: all visible)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "dora_gap")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which running sweeps are stopped (checkpointed) and the report written")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps' commands and stop")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from --runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. trainer.max_steps=600")
    args = parser.parse_args(argv)
    cells = [names[n] for n in args.cells]
    if args.dry_run:
        for cell in cells:
            for cmd in commands(cell, args.runs / cell.name, args.seeds, args.overrides):
                print(" ".join(cmd))
        return 0
    if not args.report_only:
        try:
            prepare(cells, args.overrides)
        except ConfigError as err:
            print(f"dora_gap: {err}", file=sys.stderr)
            return 2
        gpus = args.gpus or _visible_gpus()
        run_cells(cells, args.runs, args.seeds, args.overrides, args.parallel, args.time_limit, gpus)
    results = load(args.runs, cells)
    path = write_report(args.runs, results, args.docs)
    failed = [f"{c.name}/{j.dir.name}" for c, s in results.items() for j in s.failed]
    print(path.read_text())
    print(f"wrote {path}" + (f"; {len(failed)} jobs did not finish (run the same command again): {failed}"
                             if failed else ""))
    return 1 if failed or len(results) < len(cells) else 0


def _visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


if __name__ == "__main__":
    sys.exit(main())
