"""An 8-bit base's scores under each `quant.int8_compute` and against the evaluation batch size (LLM.int8 picks
outlier columns per batch, so a prompt's logits depend on which prompts share its batch).

Runs `eval.py` on one adapter with `quant=8bit`, for each of `--computes` at each batch size, on the same seeded
sample: `llm_int8` is bitsandbytes' LLM.int8 (on the CPU too: `eval.int8_cpu=llm_int8`), `weight_only` computes
through the dequantized int8 weight (`finlora.quant.int8`). Reports accuracy with its 95% interval, the number of
answers that differ from the first row's, and the wall time.

    python scripts/bench_int8_eval.py --adapter outputs/runs/<run>/adapter --limit 200 --out docs/benchmarks.md
    python scripts/bench_int8_eval.py --adapter … --limit 0 --batch-sizes 32 --computes llm_int8 weight_only
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from finlora.outputs import replace_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--task", default="fpb")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--computes", nargs="+", default=["llm_int8"], choices=["llm_int8", "weight_only"])
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_int8_eval")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    rows = {}
    for compute in args.computes:
        # on the CPU, `dequant` leaves weight-only layers as they are (and would dequantize LLM.int8's)
        cpu = "eval.int8_cpu=llm_int8" if compute == "llm_int8" else "eval.int8_cpu=dequant"
        for bs in args.batch_sizes:
            out = args.work / f"{compute}-bs{bs}"
            started = time.perf_counter()
            subprocess.run([sys.executable, "eval.py", f"adapter_path={args.adapter}", f"task={args.task}",
                            "quant=8bit", f"quant.int8_compute={compute}", f"eval.limit={args.limit or 'null'}",
                            f"eval.batch_size={bs}", cpu, f"hydra.run.dir={out}"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            metrics = json.loads((out / "eval" / f"{args.task}_metrics.json").read_text())
            answers = [json.loads(line)["generated"]
                       for line in (out / "eval" / f"{args.task}_predictions.jsonl").open()]
            rows[compute, bs] = {"accuracy": metrics["accuracy"], "ci": metrics["accuracy_ci95"], "answers": answers,
                                 "wall": wall}
            print(compute, bs, metrics["accuracy"], f"{wall:.0f} s", flush=True)
    (first_compute, first_bs), first = next(iter(rows)), next(iter(rows.values()))["answers"]
    sample = f"the same {args.limit}-row stratified sample" if args.limit else "every test row"
    lines = ["## 8-bit scores against the compute and the evaluation batch size", "",
             f"`python scripts/bench_int8_eval.py`: `eval.py` on one adapter trained on the 8-bit embedded model "
             f"(`{args.adapter.parent.name}`), `quant=8bit`, task {args.task}, {sample} in every row; "
             f"{platform.processor() or platform.machine()}, torch {version('torch')}, "
             f"bitsandbytes {version('bitsandbytes')}. Whole-command wall time (model load included).", "",
             f"| quant.int8_compute | eval.batch_size | accuracy | 95% interval | answers unlike "
             f"{first_compute} at batch size {first_bs} | wall s |", "|---|---|---|---|---|---|"]
    for (compute, bs), r in rows.items():
        changed = sum(a != b for a, b in zip(r["answers"], first, strict=True))
        lines.append(f"| {compute} | {bs} | {100 * r['accuracy']:.1f}% | {100 * r['ci'][0]:.1f}–"
                     f"{100 * r['ci'][1]:.1f}% | {changed} of {len(first)} | {r['wall']:.0f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    replace_section(args.out, section)


if __name__ == "__main__":
    main()
