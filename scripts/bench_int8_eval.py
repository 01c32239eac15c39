"""How much an 8-bit base's scores move with the evaluation batch size (LLM.int8 picks outlier columns per
batch, so a prompt's logits depend on which prompts share its batch).

Runs `eval.py` on one adapter with `quant=8bit` at each batch size, on the same seeded sample, with LLM.int8 also
on the CPU (`eval.int8_cpu=llm_int8`; the CPU's default scores through the dequantized weight), and reports
accuracy, the number of answers that differ from batch size 1's, and the wall time.

    python scripts/bench_int8_eval.py --adapter outputs/runs/<run>/adapter --limit 200 --out docs/benchmarks.md
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
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_int8_eval")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    rows = {}
    for bs in args.batch_sizes:
        out = args.work / f"bs{bs}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "eval.py", f"adapter_path={args.adapter}", f"task={args.task}", "quant=8bit",
                        f"eval.limit={args.limit}", f"eval.batch_size={bs}", "eval.int8_cpu=llm_int8",
                        f"hydra.run.dir={out}"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        metrics = json.loads((out / "eval" / f"{args.task}_metrics.json").read_text())
        answers = [json.loads(line)["generated"] for line in (out / "eval" / f"{args.task}_predictions.jsonl").open()]
        rows[bs] = {"accuracy": metrics["accuracy"], "ci": metrics["accuracy_ci95"], "answers": answers, "wall": wall}
        print(bs, metrics["accuracy"], f"{wall:.0f} s", flush=True)
    first = rows[args.batch_sizes[0]]["answers"]
    lines = ["## 8-bit scores against the evaluation batch size", "",
             f"`python scripts/bench_int8_eval.py`: `eval.py` on one adapter trained on the 8-bit embedded model "
             f"(`{args.adapter.parent.name}`), `quant=8bit`, task {args.task}, the same {args.limit}-row stratified "
             f"sample at each batch size; {platform.processor() or platform.machine()}, torch {version('torch')}, "
             f"bitsandbytes {version('bitsandbytes')}. Whole-command wall time (model load included).", "",
             f"| eval.batch_size | accuracy | 95% interval | answers unlike batch size {args.batch_sizes[0]}'s | "
             "wall s |", "|---|---|---|---|---|"]
    for bs, r in rows.items():
        changed = sum(a != b for a, b in zip(r["answers"], first, strict=True))
        lines.append(f"| {bs} | {100 * r['accuracy']:.1f}% | {100 * r['ci'][0]:.1f}–{100 * r['ci'][1]:.1f}% | "
                     f"{changed} of {len(first)} | {r['wall']:.0f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    replace_section(args.out, section)


if __name__ == "__main__":
    main()
