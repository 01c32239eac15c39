"""Step times of this tree against an earlier one, side by side on one GPU: what a restructuring that must not slow
the step is checked with (issue 35: within 3%). Each tree runs the same runs through its own `train()`, in a process
of its own with its own src/ on the path; every figure is read from the run's own summary (steady state, after the
first batch of each shape).

    git archive <commit> src scripts conf train.py | tar -x -C .gpu/before
    python scripts/bench_before_after.py --before .gpu/before --data .gpu/data --tokenizer .gpu/model

Writes docs/before_after.json and the section "## Before and after the restructuring" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISSION = ["task=sentiment", "adapter=dora", "adapter.r=8", "quant=8bit", "trainer.batch_size=8"]
REGIONS = ["trainer.capture=true", "trainer.compile=inductor", "trainer.compile_regions=true", "data.batching=static"]
RUNS = {  # name: overrides; the paths the GPU gate covers, each where users meet it
    "mission, capture+regions": [*MISSION, *REGIONS, "trainer.max_steps=150"],
    "mission lora, capture+regions": [*MISSION, "adapter=lora", *REGIONS, "trainer.max_steps=150"],
    "dora 4bit, capture": [*MISSION, "quant=4bit", "trainer.capture=true", "data.batching=static",
                           "trainer.max_steps=150"],
    "lora 4bit, capture": [*MISSION, "adapter=lora", "quant=4bit", "trainer.capture=true", "data.batching=static",
                           "trainer.max_steps=150"],
    "dora none, eager": [*MISSION, "quant=none", "trainer.capture=false", "trainer.compile=eager",
                         "data.batching=packed", "trainer.max_steps=40"],
}


def worker(args: argparse.Namespace) -> None:
    """In the tree's own process: each run of `RUNS` through that tree's `scripts/bench_train_speed.run`."""
    sys.path.insert(0, str(Path(args.worker) / "scripts"))
    import bench_train_speed as bench

    ns = argparse.Namespace(data=args.data, cache=tempfile.mkdtemp(dir=args.work), smoke=args.smoke, json=args.json,
                            device=bench.describe_device(), work=args.work)
    if args.smoke:
        bench.MODES.update({mode: bench.MODES["eager"] for mode in bench.MODES})
    for name, overrides in RUNS.items():
        if args.runs and name not in args.runs:
            continue
        extra = [o for o in overrides if not (args.smoke and o.startswith(("trainer.capture", "trainer.compile")))]
        if args.smoke:
            extra = [*extra, "trainer.max_steps=3"]
        bench.run(name, Path(args.model), ns, *extra)


def loss_gap(before: dict, after: dict) -> str:
    """The largest relative difference of the two runs' logged training losses, step for step (same init, same
    batches): how far a change moved the numerics."""
    pairs = list(zip(before.get("losses") or [], after.get("losses") or [], strict=False))
    return f"{max(abs(a - b) / abs(b) for b, a in pairs):.2e} ({len(pairs)} losses)" if pairs else ""


def markdown(before: list[dict], after: list[dict], device: str, trees: tuple[str, str], title: str) -> list[str]:
    lines = [f"## Before and after {title}", "", f"`scripts/bench_before_after.py` on {device}: the same runs through "
             f"`train()` of {trees[0]} (before) and {trees[1]} (after), one process a tree, one after the other; step "
             "times and training losses from each run's summary and log.", "",
             "| run | step ms before | step ms after | after / before | largest relative loss difference |",
             "|---|---|---|---|---|"]
    for b, a in zip(before, after, strict=True):
        failed = "error" in a or "error" in b
        ratio = (f"{a['step_ms'] / b['step_ms']:.3f}" if a.get("step_ms") and b.get("step_ms")
                 else "failed" if failed else "no step time")
        lines.append(f"| {b['name']} | {b.get('step_ms', b.get('error', ''))} | {a.get('step_ms', a.get('error', ''))}"
                     f" | {ratio} | {loss_gap(b, a)} |")
    return lines


def absolute(path: str | Path) -> str:
    return str(Path(path).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="the earlier tree (src/, scripts/, conf/, train.py)")
    parser.add_argument("--before-name", default="the earlier commit")
    parser.add_argument("--after-name", default="this commit")
    parser.add_argument("--title", default="the restructuring", help="what changed: the section's heading ends so")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/finlora"), type=absolute,
                        help="FinLoRA's data (each tree's runs start in that tree's folder)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager: checks the script")
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="bench-before-after-"), type=absolute)
    parser.add_argument("--json", default=str(ROOT / "docs/before_after.json"))
    parser.add_argument("--md", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--runs", nargs="*", choices=list(RUNS), help="some of the runs (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train_speed as bench
    import torch

    from finlora.config import ModelConfig
    from finlora.models import load_tokenizer, save_random_llama
    from finlora.outputs import replace_section, write_json

    source = args.tokenizer or str(bench._embedded_tokenizer())
    model = save_random_llama(Path(args.work) / "model", bench.TINY if args.smoke else bench.SMOLLM2,
                              2 if args.smoke else 30, load_tokenizer(source, ModelConfig(name_or_path=source)),
                              torch.device("cpu"))
    rows = {}
    for label, tree in (("before", Path(args.before).resolve()), ("after", ROOT)):
        out = Path(args.work) / f"{label}.json"
        env = os.environ | {"PYTHONPATH": str(tree / "src")}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), "--model", str(model),
                        "--data", args.data, "--work", args.work, "--json", str(out), *(["--smoke"] * args.smoke),
                        *(["--runs", *args.runs] if args.runs else [])],
                       env=env, check=False, cwd=tree)
        rows[label] = json.loads(out.read_text())["rows"] if out.is_file() else []
    named = {label: {r["name"]: r for r in found} for label, found in rows.items()}
    names = args.runs or list(RUNS)
    before = [named["before"].get(n, {"name": n, "error": "no row"}) for n in names]
    after = [named["after"].get(n, {"name": n, "error": "no row"}) for n in names]
    device = bench.describe_device()
    write_json(Path(args.json), {"device": device, "trees": [args.before_name, args.after_name], "before": before,
                                 "after": after})
    text = "\n".join(markdown(before, after, device, (args.before_name, args.after_name), args.title))
    replace_section(Path(args.md), text)
    print(text)


if __name__ == "__main__":
    main()
