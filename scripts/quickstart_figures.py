"""The quickstart's figures that the README and docs/evaluation.md quote, regenerated: `make quickstart`'s run
(`train.py experiment=quickstart`) made `--repeats` times in fresh folders and timed, then `docs/quickstart.md`
written from each run's own files (metrics.json, csv/metrics.csv, eval/fpb_metrics.json), with whether the
repeated runs agree (losses, in-training scores, test accuracy).

    .venv/bin/python scripts/quickstart_figures.py               # 2 runs, about 8 minutes each on 2 CPU cores
    .venv/bin/python scripts/quickstart_figures.py --runs outputs/runs/<a> outputs/runs/<b>   # runs made before

Anything after `--` is passed to train.py (e.g. `-- trainer.max_steps=4` for a quick check of the script).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from finlora.outputs import write_text

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "train.py", "experiment=quickstart"]


def run_quickstart(folder: Path, extra: list[str]) -> float:
    """One quickstart run into `folder`; its wall time in seconds, start-up and the test stage included."""
    start = time.perf_counter()
    subprocess.run([*COMMAND, *extra, f"hydra.run.dir={folder}"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def figures(run_dir: Path) -> dict:
    """What a run's files say: final losses, every validation's loss and in-training scores, the test scores."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    task = next((k.split("/")[1] for row in rows for k, v in row.items() if k.endswith("/accuracy") and v
                 and k.startswith("val/")), None)
    validations = [{"step": int(r["step"]), "val/loss": float(r["val/loss"]),
                    **({"accuracy": float(r[f"val/{task}/accuracy"])} if task and r.get(f"val/{task}/accuracy")
                       else {})} for r in rows if r.get("val/loss")]
    tests = {p.name.removesuffix("_metrics.json"): json.loads(p.read_text())
             for p in sorted((run_dir / "eval").glob("*_metrics.json"))}
    return {"run": str(run_dir), "steps": summary["steps"], "train_loss": summary["final_train_loss"],
            "val_loss": summary["final_val_loss"], "validations": validations,
            "tests": {name: {"accuracy": t.get("accuracy"), "ci95": t.get("accuracy_ci95"), "n": t.get("n")}
                      for name, t in tests.items()},
            "run_wall_s": summary["wall_time_s"]}


def render(runs: list[dict], walls: list[float | None], command: str) -> str:
    """docs/quickstart.md: a table of each run's figures, and whether the runs agree."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    lines = ["# The quickstart, measured", "",
             f"Written by `python scripts/quickstart_figures.py` ({time.strftime('%Y-%m-%d')}): `{command}`, "
             f"{len(runs)} run(s) on {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} "
             f"cores, torch {version('torch')}, transformers {version('transformers')}, bitsandbytes "
             f"{version('bitsandbytes')}. Rerun the script to regenerate every figure below.", "",
             "| run | wall time (process) | steps | final train loss | final val loss | validations (step: val loss, "
             "in-training accuracy) | test accuracy (95% interval) |", "|---|---|---|---|---|---|---|"]
    for i, (run, wall) in enumerate(zip(runs, walls, strict=True), 1):
        vals = "; ".join(f"{v['step'] + 1}: {v['val/loss']:.4f}" + (f", {v['accuracy']:.4f}" if "accuracy" in v
                                                                       else "") for v in run["validations"])
        tests = "; ".join(f"{name} {pct(t['accuracy'])} ({pct((t['ci95'] or [None])[0])}–"
                          f"{pct((t['ci95'] or [None, None])[1])}, {t['n']} rows)" for name, t in run["tests"].items())
        shown = f"{wall / 60:.1f} min" if wall is not None else f"{run['run_wall_s'] / 60:.1f} min (in the run)"
        lines.append(f"| {i} | {shown} | {run['steps']} | {run['train_loss']:.4f} | {run['val_loss']:.4f} | {vals} | "
                     f"{tests or '-'} |")
    if len(runs) > 1:
        keys = ("train_loss", "val_loss", "validations", "tests")
        same = {k: all(r[k] == runs[0][k] for r in runs) for k in keys}
        lines += ["", "Repeated runs agree exactly on: " + (", ".join(k for k, v in same.items() if v) or "nothing")
                  + "; differ on: " + (", ".join(k for k, v in same.items() if not v) or "nothing") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="quickstart runs to make (the reproducibility check)")
    p.add_argument("--runs", type=Path, nargs="*", help="use these run folders instead of making new runs")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quickstart.md")
    p.add_argument("--folder", type=Path, default=ROOT / "outputs" / "quickstart_figures")
    p.add_argument("extra", nargs="*", help="after --: train.py overrides")
    args = p.parse_args()
    if args.runs:
        folders, walls = args.runs, [None] * len(args.runs)
    else:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        folders = [args.folder / f"{stamp}_{i}" for i in range(1, args.repeats + 1)]
        walls = [run_quickstart(folder, args.extra) for folder in folders]
    command = " ".join(["python train.py experiment=quickstart", *args.extra])
    write_text(args.out, render([figures(f) for f in folders], walls, command))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
