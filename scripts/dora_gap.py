"""The DoRA-gap study (issues 16 and 37): why did FinLoRA's DoRA fall behind its LoRA on TFNS and NWGI?

FinLoRA's published sentiment adapters differ in more than the adapter (conf/experiment/finlora_sentiment_*
cite every setting): its LoRA came from lora/lora/train_lora.py (raw prompt, alpha 32, dropout 0.1), its DoRA
from the axolotl path (lora/finetune.py: "[INST] … [/INST]" training prompt, alpha 16, dropout 0.05), and both
were scored on the raw prompt. On the embedded 135M model, one epoch of the sentiment mixture, full test sets,
5 seeds a cell (the same seeds in every cell, so differences are paired), the cells (`CELLS`) are:
  - prompt × alpha × dropout, 2 × 2 × 2, for LoRA and DoRA: holds both published recipes' adapter settings;
  - [INST] training scored on [INST] (`eval.prompt=finlora_inst`), both adapters: a prompt mismatch told
    from the wrap itself;
  - DoRA's magnitude learning rate × 3, 10, 30 (× 1 is the grid's baseline);
  - NWGI trained (`task=sentiment_nwgi`), both adapters: runs only where train/nwgi_train.jsonl exists;
  - both published recipes' settings again at FinLoRA's 4 epochs.
TFNS is scored on the fixed labels; the kept predictions rescore it on FinLoRA's published labels too.
The report (docs/dora_gap.md, `finlora.run.gap`) states the pre-registered primary comparison (DoRA − LoRA at
the baseline, TOST within ±2 points) and every secondary one, Holm-corrected, paired by seed.

    python scripts/dora_gap.py --plan               # jobs, blocked cells and GPU time, from measured times
    python scripts/dora_gap.py                      # every cell, then the report
    python scripts/dora_gap.py --time-limit 480     # stop (checkpointed) after 8 min, report what finished
    python scripts/dora_gap.py --dry-run            # the sweeps it would run
    python scripts/dora_gap.py --report-only        # rewrite the report from the run files in docs/dora_gap
    python scripts/dora_gap.py --cells lora-raw-a16-d0.05 dora-raw-a16-d0.05 --seeds 1   # a pilot, to time a job
    python scripts/dora_gap.py trainer.max_steps=600                                     # overrides for every job

Each cell is one sweep of the project's own `train.py -m … seed=1,2,3,4,5` in outputs/dora_gap/<cell>/; up to
`--parallel` sweeps share the GPUs (the 135M model leaves an H100 mostly idle). Resumable across GPU leases: run
the same command again; a finished job is left alone, a job cut short resumes from its last checkpoint (one cut
while being scored keeps the training record of the attempt that trained, `finlora.train`). Each finished job's
config.yaml, metrics.json and predictions (one character a row) are copied under docs/dora_gap/<cell>/seed<k>/,
where the report reads them; docs/dora_gap/NOTES.md, your reading, is included in it.
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from finlora.config import Config
from finlora.errors import ConfigError
from finlora.outputs import write_json, write_text
from finlora.run.gap import PREDICTIONS, keep_predictions, preregistration, report_sections
from finlora.run.report import Sweep, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [1, 2, 3, 4, 5]
STOP_GRACE_S = 60  # after SIGTERM: time to finish the optimizer step and write last.ckpt before SIGKILL
NWGI_TRAIN = "train/nwgi_train.jsonl"  # conf/task/sentiment_nwgi.yaml's fourth file: not in the shared data


@dataclass(frozen=True)
class Cell:
    name: str
    settings: tuple[str, ...]  # overrides on top of experiment=dora_gap

    @property
    def overrides(self) -> list[str]:
        return ["experiment=dora_gap", *self.settings]


def grid_cell(adapter: str, prompt: str = "plain", alpha: int = 16, dropout: float = 0.05, *extra: str,
              suffix: str = "") -> Cell:
    """A cell of the prompt × alpha × dropout grid (the baseline: raw prompt, alpha 16, dropout 0.05)."""
    name = f"{adapter}-{'inst' if prompt == 'finlora_inst' else 'raw'}-a{alpha}-d{dropout:g}{suffix}"
    return Cell(name, (f"adapter={adapter}", f"data.train_prompt={prompt}", f"adapter.alpha={alpha}",
                       f"adapter.dropout={dropout}", *extra))


ADAPTERS = ("lora", "dora")
# The study's cells, those that decide the question first (so a cut-off study has them): the grid, which holds
# the baseline and both published FinLoRA recipes' adapter settings (LoRA: raw, 32, 0.1; DoRA: [INST], 16, 0.05).
CELLS = (
    [grid_cell(a, p, al, d) for p in ("plain", "finlora_inst") for al in (16, 32) for d in (0.05, 0.1)
     for a in ADAPTERS]
    + [grid_cell(a, "finlora_inst", 16, 0.05, "eval.prompt=finlora_inst", suffix="-scored-inst") for a in ADAPTERS]
    + [grid_cell("dora", "plain", 16, 0.05, f"adapter.magnitude_lr_scale={k}", suffix=f"-mlr{k}") for k in (3, 10, 30)]
    + [grid_cell("lora", "plain", 32, 0.1, "trainer.max_epochs=4", suffix="-4ep"),
       grid_cell("dora", "finlora_inst", 16, 0.05, "trainer.max_epochs=4", suffix="-4ep")]
    + [grid_cell(a, "plain", 16, 0.05, "task=sentiment_nwgi", suffix="-nwgi") for a in ADAPTERS]
)


def blocked(cell: Cell, data_dir: Path) -> str | None:
    """Why a cell cannot run here (a training file it needs is missing), or None."""
    if "task=sentiment_nwgi" in cell.settings and not (data_dir / NWGI_TRAIN).is_file():
        return f"needs {data_dir / NWGI_TRAIN} (NWGI's training split; conf/task/sentiment_nwgi.yaml says where)"
    return None


def commands(cell: Cell, sweep_dir: Path, seeds: list[int], extra: list[str]) -> list[list[str]]:
    """The cell's sweep; for a sweep that started before, only the reruns of the jobs that did not finish."""
    if (sweep_dir / "multirun.yaml").is_file():
        return [job.rerun_command(ROOT / "train.py") for job in load_sweep(sweep_dir).failed]
    return [[sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *cell.overrides,
             f"seed={','.join(map(str, seeds))}", *extra]]


def validated(cells: list[Cell], extra: list[str]) -> Iterator[tuple[Cell, Config]]:
    """Each cell's job config, composed from conf/ and validated as `train.py` would (seed aside)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from finlora.config import validate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for cell in cells:
            cfg = compose("train", [*cell.overrides, *extra, "output_dir=."], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            try:
                yield cell, validate(cfg)
            except ConfigError as err:
                raise ConfigError(f"cell {cell.name}: {err}") from None


def prepare(cells: list[Cell], extra: list[str]) -> None:
    """Validate every cell's config now (all bad values at once, not one failed job at a time) and convert the
    embedded model once, before the sweeps start and would each convert it."""
    from finlora.models import resolve_source

    configs = [run for _, run in validated(cells, extra)]
    if configs:
        resolve_source(configs[-1].model, configs[-1].paths.cache_dir)


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


def keep_run_files(runs: Path, results: dict[Cell, Sweep], out: Path) -> None:
    """Each finished job's config.yaml, metrics.json and predictions (`finlora.run.gap.keep_predictions`) under
    `out`/<cell>/seed<k>/, where the report reads them; the run's environment.json beside them."""
    for cell, sweep in results.items():
        for job in sweep.jobs:
            if job.status != "ok":
                continue
            target = out / cell.name / f"seed{job.overrides.get('seed', '-')}"
            target.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "metrics.json"):
                shutil.copyfile(job.dir / name, target / name)
            cfg = OmegaConf.load(job.dir / "config.yaml")
            labels = {str(t.name): list(t.labels) for t in cfg.task.test}
            if all((job.dir / "eval" / f"{n}_predictions.jsonl").is_file() for n in labels):
                keep_predictions(job.dir / "eval", labels, target / PREDICTIONS)
    if (runs / "environment.json").is_file():
        shutil.copyfile(runs / "environment.json", out / "environment.json")


def write_report(docs: Path, data_dir: Path, unfinished: list[str]) -> Path:
    """docs/dora_gap.md from the run files under docs/dora_gap/ (`finlora.run.gap`), with NOTES.md, the
    setting the runs shared and the jobs not finished."""
    out = docs / "dora_gap"
    notes = out / "NOTES.md"
    lines = ["# FinLoRA's DoRA gap on a 135M proxy: paired seeds, FinLoRA's real recipes, intervals", "",
             "Produced by `python scripts/dora_gap.py` (issues 16 and 37); the design and the commands are in that "
             "script's docstring, the shared settings in `conf/experiment/dora_gap.yaml`, FinLoRA's recipes (each "
             "setting cited) in `conf/experiment/finlora_sentiment_*.yaml`.", "", *setup_lines(out), ""]
    if unfinished:
        lines += [f"Not finished (run the same command again): {', '.join(unfinished)}.", ""]
    lines += preregistration()
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [*report_sections(out, data_dir),
              "Each job's `config.yaml`, `metrics.json` and (since issue 37) `predictions.json`: "
              "`docs/dora_gap/<cell>/seed<k>/`.", ""]
    path = docs / "dora_gap.md"
    write_text(path, "\n".join(lines))
    return path


def setup_lines(out: Path) -> list[str]:
    """Where the runs ran, from environment.json."""
    env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").is_file() else {}
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    return [f"- Ran on {env.get('device', '?')}; {versions or 'versions not recorded'}; {env.get('parallel', '?')} "
            f"sweeps at once on {env.get('gpus', '?')} GPU(s). Each job's own settings: its config.yaml."]


@dataclass(frozen=True)
class Rates:
    """Times measured by finished jobs: seconds per optimizer step, seconds per scored row (the rest of a job's
    wall time: start-up, model load and scoring), and how many jobs shared one GPU."""

    step_s: float
    row_s: float
    jobs_per_gpu: float
    jobs: int
    where: str


def measured_rates(folder: Path) -> Rates | None:
    """`Rates` from the metrics.json files under `folder` (a study's run files or its sweeps) of jobs that
    trained in that attempt (step times recorded) and scored their test sets; None if there are none."""
    steps, rows = [], []
    for f in folder.rglob("metrics.json"):
        m = json.loads(f.read_text())
        n = sum(v for k, v in m.items() if k.startswith("test/") and k.endswith("/n"))
        if m.get("step_ms") and m.get("wall_time_s") and n and not m.get("training_from_earlier_attempt"):
            train_s = m["steps"] * m["step_ms"] / 1000
            steps.append(m["step_ms"] / 1000)
            rows.append((m["wall_time_s"] - train_s) / n)
    if not steps:
        return None
    env_file = next(folder.rglob("environment.json"), None)
    env = json.loads(env_file.read_text()) if env_file else {}
    return Rates(statistics.median(steps), statistics.median(rows), env.get("parallel", 1) / env.get("gpus", 1),
                 len(steps), f"{env.get('device', '?')}, {env.get('parallel', 1)} jobs on {env.get('gpus', 1)} GPU(s)")


def plan(cells: list[Cell], seeds: list[int], runs: Path, extra: list[str], data_dir: Path, rates: Rates | None,
         gpus: int) -> list[str]:
    """The jobs still to run (a finished one is skipped), the cells that cannot run here, each job's optimizer
    steps and scored rows, and the GPU time at the measured `rates`."""
    from finlora.data import load_task, read_jsonl

    out, todo, steps, rows, seconds = [], 0, 0, 0, 0.0
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    runnable = []
    for cell in cells:
        if reason := blocked(cell, data_dir):
            out.append(f"  {cell.name}: blocked, {reason}")
        else:
            runnable.append(cell)
    for cell, cfg in validated(runnable, [*extra, f"paths.data_dir={data_dir}"]):
        done = {int(j.overrides["seed"]) for j in load_sweep(runs / cell.name).jobs if j.status == "ok"} \
            if (runs / cell.name / "multirun.yaml").is_file() else set()
        left = [s for s in seeds if s not in done]
        key = (cfg.task.name, str(cfg.eval.limit))
        if key not in sizes:
            train_rows = len(load_task(cfg.task, cfg.data, data_dir).train)
            scored = sum(min(len(read_jsonl(data_dir / t.file)), cfg.eval.limit or 10**9) for t in cfg.task.test)
            sizes[key] = (train_rows, scored)
        job_steps, job_rows = cfg.trainer.optimizer_steps(sizes[key][0]), sizes[key][1]
        todo, steps, rows = todo + len(left), steps + len(left) * job_steps, rows + len(left) * job_rows
        if rates:
            seconds += len(left) * (job_steps * rates.step_s + job_rows * rates.row_s) / rates.jobs_per_gpu
        out.append(f"  {cell.name}: {len(left)} of {len(seeds)} seeds to run, {job_steps:,} steps and "
                   f"{job_rows:,} scored rows a job")
    out.insert(0, f"{todo} jobs to run ({len(cells)} cells × {len(seeds)} seeds, less those finished or blocked); "
                  f"{steps:,} optimizer steps and {rows:,} scored rows in all.")
    if rates:
        out += [f"GPU time at the measured rates: {seconds / 3600:.1f} GPU-hours, about {seconds / 3600 / gpus:.1f} h "
                f"on {gpus} GPU(s) (training {1000 * rates.step_s:.0f} ms a step, {rates.row_s:.3f} s a scored row "
                f"including start-up, {rates.jobs_per_gpu:g} jobs sharing a GPU: the median of {rates.jobs} jobs, "
                f"{rates.where}).",
                "Those jobs ran 300 steps and 1,735 rows on the eager path with growing-cache decoding; the default "
                "fast path is not measured per job: time a pilot (--cells lora-raw-a16-d0.05 --seeds 1) and plan "
                "again with --measured outputs/dora_gap."]
    else:
        out.append("GPU time: to be measured (no finished job with step times under --measured): run a pilot "
                   "(--cells lora-raw-a16-d0.05 --seeds 1), then plan again with --measured outputs/dora_gap.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = {c.name: c for c in CELLS}
    parser.add_argument("--cells", nargs="+", choices=list(names), default=list(names),
                        help="cells to run, in this order (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--parallel", type=int, default=9, help="sweeps running at once")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs the cells take in turn (default: all visible)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "dora_gap")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "FINLORA_DATA_DIR", ROOT.parent / "shared" / "data" / "finlora")))
    parser.add_argument("--measured", type=Path, default=ROOT / "docs" / "dora_gap",
                        help="--plan: the finished jobs whose times the estimate uses")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which running sweeps are stopped (checkpointed) and the report written")
    parser.add_argument("--plan", action="store_true", help="print the jobs and the GPU time they need, and stop")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps' commands and stop")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the run files")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. trainer.max_steps=600")
    args = parser.parse_args(argv)
    cells = [names[n] for n in args.cells]
    runnable = [c for c in cells if not blocked(c, args.data_dir)]
    if args.plan:
        print("\n".join(plan(cells, args.seeds, args.runs, args.overrides, args.data_dir,
                             measured_rates(args.measured), args.gpus or 1)))
        return 0
    if args.dry_run:
        for cell in runnable:
            for cmd in commands(cell, args.runs / cell.name, args.seeds, args.overrides):
                print(" ".join(cmd))
        return 0
    unfinished: list[str] = []
    if not args.report_only:
        for cell in set(cells) - set(runnable):
            print(f"{cell.name}: not run, {blocked(cell, args.data_dir)}", file=sys.stderr)
        try:
            prepare(runnable, args.overrides)
        except ConfigError as err:
            print(f"dora_gap: {err}", file=sys.stderr)
            return 2
        gpus = args.gpus or _visible_gpus()
        run_cells(runnable, args.runs, args.seeds, args.overrides, args.parallel, args.time_limit, gpus)
        results = load(args.runs, runnable)
        keep_run_files(args.runs, results, args.docs / "dora_gap")
        unfinished = [f"{c.name}/{j.dir.name} ({j.status})" for c, s in results.items() for j in s.failed]
        unfinished += [c.name for c in runnable if c not in results]
    path = write_report(args.docs, args.data_dir, unfinished)
    print(path.read_text())
    print(f"wrote {path}" + (f"; {len(unfinished)} jobs or cells did not finish (run the same command again)"
                             if unfinished else ""))
    return 1 if unfinished else 0


def _visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


if __name__ == "__main__":
    sys.exit(main())
