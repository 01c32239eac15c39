"""Controlled comparison: zero-shot base vs LoRA vs DoRA vs full fine-tuning on the sentiment mixture.

Every method trains with `experiment=compare` (same base, data, steps, schedule, learning rate; only
`adapter` and `seed` differ), is evaluated on FPB, FiQA, TFNS (fixed labels) and NWGI, and the results
are written to `docs/results.md` with a bar chart, plus 20 random predictions per test set for a
hand-check. One command on one GPU:

    python scripts/compare.py --seeds 1 2 --steps 1000 --jobs 7     # all 7 cells at once on one big GPU
    python scripts/compare.py --report-only --runs outputs/compare   # re-write the report from the files
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finlora.config import validate
from finlora.data import load_task
from finlora.devices import environment
from finlora.outputs import write_json

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"lora": ["adapter=lora"], "dora": ["adapter=dora"], "full": ["adapter=none"]}
TEST_SETS = ("fpb", "fiqa", "tfns", "nwgi")


def run_all(runs: Path, seeds: list[int], steps: int, limit: int | None, extra: list[str], jobs: int) -> None:
    """Each cell is a separate process, as a user would run it, so no state leaks between runs.

    With `jobs` > 1 that many cells share the GPU at once: a 135M model leaves a big GPU mostly idle, so
    the cells' host-side work overlaps. Each cell's output goes to `run.log` in its own folder.
    """
    common = [f"trainer.max_steps={steps}"] + ([f"eval.limit={limit}"] if limit else []) + extra
    cells = [("base", None, [sys.executable, "eval.py", "task=sentiment", "eval.batch_size=64"]
              + ([f"eval.limit={limit}"] if limit else []))]
    cells += [(m, s, [sys.executable, "train.py", "experiment=compare", *args, f"seed={s}", *common])
              for s in seeds for m, args in METHODS.items()]
    pending = [(runs / (m if s is None else f"{m}-s{s}"), cmd) for m, s, cmd in cells]
    pending = [(out, cmd) for out, cmd in pending if not (out / "done.json").is_file()]
    record_environment(runs)
    running: list[tuple[Path, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            out, cmd = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            with (out / "run.log").open("w") as log:
                proc = subprocess.Popen([*cmd, f"hydra.run.dir={out}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            running.append((out, proc, time.time()))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            out, proc, started = item
            running.remove(item)
            wall = round(time.time() - started, 1)
            write_json(out / "done.json", {"rc": proc.returncode, "wall_s": wall, "jobs": jobs})
            print(f"{out.name}: rc={proc.returncode} in {wall:.0f} s (log: {out / 'run.log'})", flush=True)


def data_sizes(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """The training and validation rows of a run, rebuilt from its saved config exactly as train.py drew them
    (the data folder of this machine: the runs may have been made on another)."""
    data_dir = os.environ.get("FINLORA_DATA_DIR") or cfg.paths.data_dir
    run = validate(OmegaConf.merge(cfg, {"paths": {"data_dir": data_dir}}))
    loaded = load_task(run.task, run.data, run.paths.data_dir)
    return loaded.train, loaded.val


def record_environment(runs: Path) -> None:
    """The device and library versions the runs ran on (what experiment=compare's trainer=auto picks)."""
    write_json(runs / "environment.json", environment())


def collect(runs: Path) -> dict[str, list[dict]]:
    """method -> one dict per seed: test metrics, wall time, steps."""
    results: dict[str, list[dict]] = {}
    for out in sorted(runs.iterdir()):
        done = json.loads((out / "done.json").read_text()) if (out / "done.json").is_file() else {"rc": None}
        if done["rc"] != 0:
            continue
        method = out.name.split("-s")[0]
        row = {"wall_s": done["wall_s"], "jobs": done.get("jobs", 1), "run": out.name}
        for name in TEST_SETS:
            row[name] = json.loads((out / "eval" / f"{name}_metrics.json").read_text())
        if (out / "metrics.json").is_file():
            row["summary"] = json.loads((out / "metrics.json").read_text())
        results.setdefault(method, []).append(row)
    return results


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def write_report(runs: Path, results: dict[str, list[dict]], docs: Path, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [m for m in ("base", "lora", "dora", "full") if m in results]
    names = {"base": "base (zero-shot)", "lora": "LoRA r=8", "dora": "DoRA r=8", "full": "full fine-tuning"}
    lines = ["| method | " + " | ".join(f"{t} acc / F1" for t in TEST_SETS) + " | mean acc | mean F1 | seeds |",
             "|---|" + "---|" * (len(TEST_SETS) + 3)]
    for m in order:
        rows = results[m]
        cells = [f"{_mean_std([r[t]['accuracy'] for r in rows])} / {_mean_std([r[t]['f1'] for r in rows])}"
                 for t in TEST_SETS]
        mean_acc = _mean_std([statistics.fmean(r[t]["accuracy"] for t in TEST_SETS) for r in rows])
        mean_f1 = _mean_std([statistics.fmean(r[t]["f1"] for t in TEST_SETS) for r in rows])
        lines.append(f"| {names[m]} | " + " | ".join(cells) + f" | {mean_acc} | {mean_f1} | {len(rows)} |")
    unparsable = ["| method | " + " | ".join(TEST_SETS) + " |", "|---|" + "---|" * len(TEST_SETS)]
    for m in order:
        unparsable.append(f"| {names[m]} | " + " | ".join(
            f"{100 * statistics.fmean(r[t]['unparsable_rate'] for r in results[m]):.1f}" for t in TEST_SETS) + " |")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(order)
    for i, m in enumerate(order):
        means = [statistics.fmean(r[t]["accuracy"] for r in results[m]) for t in TEST_SETS]
        errs = [statistics.stdev([r[t]["accuracy"] for r in results[m]]) if len(results[m]) > 1 else 0
                for t in TEST_SETS]
        ax.bar([x + i * width for x in range(len(TEST_SETS))], means, width, yerr=errs, capsize=3, label=names[m])
    ax.set_xticks([x + width * (len(order) - 1) / 2 for x in range(len(TEST_SETS))], TEST_SETS)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M-Instruct on FinLoRA sentiment (mean ± std over seeds)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "results.png", dpi=120)

    trained = next(r for m in ("dora", "lora", "full") if m in results for r in results[m])
    cfg = OmegaConf.load(runs / trained["run"] / "config.yaml")
    train, val = data_sizes(cfg)
    env = json.loads((runs / "environment.json").read_text())
    walls = {m: statistics.fmean(r["wall_s"] for r in results[m]) for m in order}
    jobs = max(r["jobs"] for rows in results.values() for r in rows)
    sharing = f", with {jobs} runs sharing the GPU at once" if jobs > 1 else ""
    t, a = cfg.trainer, cfg.adapter
    seen = t.max_steps * t.batch_size * t.grad_accum
    notes = runs / "NOTES.md"
    text = f"""# LoRA vs DoRA vs full fine-tuning on FinLoRA sentiment

Produced by `python scripts/compare.py --seeds {' '.join(map(str, seeds))} --steps {t.max_steps}`; every
trained row uses `experiment=compare` and differs only in `adapter` and `seed` (the settings below are read
from the runs' own `config.yaml`).

- Model: SmolLM2-135M-Instruct (the embedded default), unquantized base (so that full fine-tuning runs
  on the same base), {env['precision']} precision.
- Training data: the `sentiment` mixture (FPB×6 + FiQA×21 + TFNS×2 = {len(train):,} rows,
  {len({r['context'] for r in train}):,} distinct), {len(val)} held out for validation; {t.max_steps} optimizer steps
  of batch {t.batch_size} (about {seen:,} examples, {seen / len(train):.2f} of an epoch),
  AdamW lr {t.lr:g}, {t.warmup_steps} warm-up steps, {t.scheduler}; LoRA and DoRA r={a.r}, alpha={a.alpha:g},
  dropout {a.dropout:g} on {', '.join(a.target_modules)} (FinLoRA's targets); full fine-tuning updates every parameter.
- Evaluation: greedy generation on FinLoRA's raw prompts; accuracy and weighted F1 as FinLoRA computes
  them (first label in the answer; wrong or unparsable answers are their own class); TFNS on the fixed
  labels, NWGI on its 7 labels (the model never trained on NWGI: it measures transfer).
- Seeds: {', '.join(map(str, seeds))}. Hardware: {env['device']}; """ + ", ".join(
        f"{k} {v}" for k, v in env["versions"].items()) + f""".
- Wall time per run (training + evaluation{sharing}): """ + ", ".join(
        f"{names[m]} {walls[m]:.0f} s" for m in order) + f"""
{chr(10) + notes.read_text() if notes.is_file() else ""}
## Accuracy / weighted F1 (%, mean ± std over seeds)

{chr(10).join(lines)}

![accuracy per test set](results.png)

## Unparsable answers (%, no label found in the generation)

{chr(10).join(unparsable)}
"""
    (docs / "results.md").write_text(text)
    handcheck(runs, results, docs)


def handcheck(runs: Path, results: dict[str, list[dict]], docs: Path) -> None:
    """20 random predictions per test set (fixed seed) for the base model and one DoRA run, to read by eye."""
    rng = random.Random(0)
    parts = ["# Hand-check: 20 random predictions per test set\n"]
    for m in ("base", "dora"):
        if m not in results:
            continue
        run = runs / results[m][0]["run"]
        for t in TEST_SETS:
            rows = [json.loads(line) for line in (run / "eval" / f"{t}_predictions.jsonl").open()]
            parts.append(f"\n## {run.name} · {t}\n\n| # | target | generated | parsed |\n|---|---|---|---|")
            for row in rng.sample(rows, min(20, len(rows))):
                gen = row["generated"].replace("|", "\\|").replace("\n", "⏎")[:60]
                parts.append(f"| {row['index']} | {row['target']} | `{gen}` | {row['predicted']} |")
    (docs / "results_handcheck.md").write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="examples per test set (default: all)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "compare")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once on the one GPU")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args.runs, args.seeds, args.steps, args.limit, args.overrides, args.jobs)
    args.docs.mkdir(parents=True, exist_ok=True)
    write_report(args.runs, collect(args.runs), args.docs, args.seeds)
    print((args.docs / "results.md").read_text())


if __name__ == "__main__":
    main()
