"""Generation speed of evaluation: today's path against the new one, side by side in one process.

Today's path is still reachable by settings: `eval.batch_size=32 eval.static_cache=false
eval.int8_cpu=llm_int8 eval.four_bit=kernel` (length-sorted batches of 32, a growing KV cache, eager decoding,
LLM.int8 on an 8-bit CPU base, bitsandbytes' 4-bit layers), which is what `finlora.evaluate.generate` did at
commit 7a92598. The new path is the
defaults: `eval.batch_size=auto`, and on CUDA a static KV cache with a compiled decode step (on the CPU,
`auto` is 32: the same batches as before). The CPU part times the ways an 8-bit base can compute there
(`eval.int8_cpu`): LLM.int8 (today's), `dequant` and `bf16` (both batch-invariant).

GPU (one H100, about 5 minutes; random weights, the real tokenizer, FinLoRA's test sets):
(a) the embedded model's shapes (SmolLM2-135M: 30 layers, hidden 576, vocabulary 49,152), bf16, FPB's
    1,212 test rows: examples/s of generation, today's path and the new one (and the new batching alone,
    eager, to separate what the compiled decode step adds);
(b) the same model on the four sentiment test sets (7,882 rows), end to end after load, new path;
(c) Llama-3.1-8B shapes (4 layers, vocabulary 128,256) in bf16 and in 4-bit (NF4), FPB, both paths; on the
    4-bit base the new path twice, through bitsandbytes' 4-bit layers (`eval.four_bit=kernel`) and through the
    copy with its layers dequantized once (`eval.four_bit=dense`, made once, its time reported apart, as
    `evaluate_sets` makes it once for all test sets), which transformers compiles.
Each path runs once to warm up (its first compile is reported separately), then is timed. `--profile` also
writes a torch.profiler table (the 15 ops with the most self CUDA time, and with the most self CPU time) of one
steady pass of each new 4-bit path to `<--profile-dir>/eval_profile_4bit_<kernel|dense>.txt`.

    python scripts/bench_eval.py --tokenizer .gpu/tokenizer --data-dir .gpu/data [--profile] [--four-bit-only]

(`--four-bit-only`: case (c)'s 4-bit rows alone, in a section and a JSON part of their own.)

CPU (`--cpu`): the quickstart's test stage (embedded model, 8-bit base, its DoRA adapter) on a seeded
stratified sample of FPB (`--rows`, 200 by default: the dev machine has 2 shared cores), today's path,
`eval.int8_cpu=dequant` and `eval.int8_cpu=bf16`, alternated `--repeats` times; wall time, CPU time, accuracy
and how many answers differ from today's, and, for the batch-invariant paths, from their own at batch 8.

    python scripts/bench_eval.py --cpu --adapter outputs/runs/<quickstart run>/adapter

Writes its part ("gpu" or "cpu") of `docs/eval_speed.json` and its section of `docs/benchmarks.md`, and
prints the markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch
from bench_eval_task import profiled, sentiment_sets

from finlora.build import build, placement
from finlora.config import (
    EvalConfig,
    EvalSettings,
    FourBitEval,
    Int8Cpu,
    ModelConfig,
    PathsConfig,
    QuantConfig,
    SavedAdapterConfig,
)
from finlora.evaluate import four_bit_as_dense, generate_sets, pick_rows, wilson_interval
from finlora.metrics import score
from finlora.models import SHAPES, save_random_llama
from finlora.outputs import replace_section, write_json

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = SHAPES["smollm2-135m"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 49152}
LLAMA_8B = SHAPES["llama-3.1-8b"]
TODAY = EvalSettings(batch_size=32, static_cache=False, int8_cpu=Int8Cpu.llm_int8, four_bit=FourBitEval.kernel,
                     share_prefix=False)
NEW = EvalSettings()
NEW_KERNEL = EvalSettings(four_bit=FourBitEval.kernel)
NEW_DENSE = EvalSettings(four_bit=FourBitEval.dense)
EAGER = EvalSettings(static_cache=False)
DEQUANT = EvalSettings(int8_cpu=Int8Cpu.dequant)
BF16 = EvalSettings(int8_cpu=Int8Cpu.bf16)
BF16_UNSHARED = EvalSettings(int8_cpu=Int8Cpu.bf16, share_prefix=False)


def timed(fn, *args) -> tuple[float, float, object]:
    """Wall and CPU seconds of fn(*args), after the device has finished its work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def run_sets(model, tokenizer, sets, settings: EvalSettings, precision: str) -> list[list[str]]:
    """The sets as `evaluate_sets` generates them: one `generate_sets`, one decode shape for all."""
    return list(generate_sets(model, tokenizer, [(t.name, rows, t.max_new_tokens) for t, rows in sets],
                              settings.batch_size, precision, static_cache=settings.static_cache,
                              decode_compile=settings.decode_compile,
                              int8_cpu=settings.int8_cpu, four_bit=settings.four_bit,
                              share_prefix=settings.share_prefix))


def first_and_steady(model, tokenizer, sets, settings: EvalSettings, precision: str,
                     fresh: bool) -> tuple[float | None, float]:
    """Seconds of a path's first pass over the sets (compiling from nothing if `fresh`) and of the next; a
    path that compiles nothing warms up on 64 rows a set instead of a whole first pass (first: None)."""
    if fresh:
        torch._dynamo.reset()
    if settings.static_cache:
        first = timed(run_sets, model, tokenizer, sets, settings, precision)[0]
    else:
        first = None
        run_sets(model, tokenizer, [(t, rows[:64]) for t, rows in sets], settings, precision)
    return first, timed(run_sets, model, tokenizer, sets, settings, precision)[0]


def gpu(args: argparse.Namespace) -> tuple[dict, list[str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sentiment = sentiment_sets(args.data_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = {"embedded": EMBEDDED, "8b": LLAMA_8B}
    if args.smoke:  # the script's logic on the CPU in a minute: tiny shapes, a few rows
        sentiment = [(t, rows[:24]) for t, rows in sentiment]
        shapes = dict.fromkeys(shapes, TINY)
    fpb = [s for s in sentiment if s[0].name == "fpb"]
    results: dict = {}
    table = ["| model | quant | test rows | path | first pass s | steady s | examples/s | × today |",
             "|---|---|---|---|---|---|---|---|"]
    everything = f"sentiment ({len(sentiment)} sets)"
    cases = [("embedded shapes (30 layers)", shapes["embedded"], 30, None, {"fpb": fpb, everything: sentiment}),
             ("Llama-3.1-8B shapes (4 layers)", shapes["8b"], 4, None, {"fpb": fpb}),
             ("Llama-3.1-8B shapes (4 layers)", shapes["8b"], 4, 4, {"fpb": fpb})]
    cases = cases[-1:] if args.four_bit_only else cases
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, layers, bits, workloads in cases:
            folder = Path(tmp) / f"{name.split()[0]}-{layers}"
            if not folder.exists():
                save_random_llama(folder, shape, 2 if args.smoke else layers, tokenizer, device)
            cfg = EvalConfig(model=ModelConfig(name_or_path=str(folder)), quant=QuantConfig(bits=bits),
                             accelerator="gpu" if device.type == "cuda" else "cpu",
                             precision="bf16-mixed" if device.type == "cuda" else "32-true")
            where = placement(cfg)
            model = build(cfg, where).model
            for workload, sets in workloads.items():
                n = sum(len(rows) for _, rows in sets)
                paths = {"today (batch 32, growing cache, eager)": TODAY, "new": NEW}
                if not bits:
                    paths["new batching, growing cache, eager"] = EAGER
                else:  # transformers compiles no bitsandbytes model: the dense copy is what it compiles
                    paths = {"today (batch 32, growing cache, eager)": TODAY,
                             "new, bitsandbytes' 4-bit layers (eval.four_bit=kernel)": NEW_KERNEL,
                             "new, layers dequantized once (eval.four_bit=dense)": NEW_DENSE}
                if workload != "fpb":  # the whole sentiment task, end to end: the new path only
                    paths = {"new": NEW}
                today_rate = None
                for path, settings in paths.items():
                    scored = model
                    if bits and settings.four_bit is FourBitEval.dense:  # one copy, as `evaluate_sets` makes it
                        copy_s, _, (scored, _) = timed(four_bit_as_dense, model, FourBitEval.dense)
                        results[f"{name} | 4-bit | dense copy"] = {"seconds": round(copy_s, 3)}
                        print(f"dense copy of the 4-bit layers: {copy_s:.2f} s", flush=True)
                    first, steady = first_and_steady(scored, tokenizer, sets, settings, where.precision,
                                                     fresh=workload == "fpb")
                    if args.profile and bits and settings is not TODAY:
                        profiled(args.profile_dir / f"eval_profile_4bit_{settings.four_bit.value}.txt",
                                 f"{name}, 4-bit, {path}, one steady pass over {workload}", run_sets, scored,
                                 tokenizer, sets, settings, where.precision)
                    del scored
                    rate = n / steady
                    today_rate = rate if settings is TODAY else today_rate
                    ratio = rate / today_rate if today_rate else None
                    key = f"{name} | {'4-bit' if bits else 'bf16'} | {workload} | {path}"
                    results[key] = {"rows": n, "first_pass_s": first and round(first, 2), "steady_s": round(steady, 3),
                                    "examples_per_s": round(rate, 1), "vs_today": ratio and round(ratio, 2)}
                    table.append(f"| {name} | {'4-bit' if bits else 'bf16'} | {workload} ({n}) | {path} | "
                                 f"{'-' if first is None else f'{first:.1f}'} | {steady:.2f} | {rate:.0f} | "
                                 f"{'-' if ratio is None else f'{ratio:.2f}'} |")
                    print(table[-1], flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU smoke run (tiny shapes, not a measurement)"
    header = (f"`python scripts/bench_eval.py --tokenizer .gpu/tokenizer --data-dir .gpu/data"
              f"{' --four-bit-only' if args.four_bit_only else ''}`: "
              f"{where}, torch {torch.__version__}, transformers {version('transformers')}, "
              "random weights in bf16 (4-bit: NF4 + double quantization) with SmolLM2's tokenizer, greedy, "
              "bf16 autocast. Today's path: `eval.batch_size=32 eval.static_cache=false`; new: the defaults "
              "(`eval.batch_size=auto`, static KV cache and compiled decode step). *First pass*: the first run "
              "of a compiling path over the rows, compiling included (paths that compile nothing warm up on 64 "
              "rows a set); *steady*: the next run over all rows. A random "
              "model rarely says EOS, so most rows decode up to the task's `max_new_tokens`: a worst case. "
              "transformers compiles no bitsandbytes model: on the 4-bit base, `eval.four_bit=kernel` measures "
              "the batching and the static cache alone, `eval.four_bit=dense` a copy with the 4-bit layers "
              "dequantized once to bf16 (by bitsandbytes; the copy is made once, in the time given in "
              "`docs/eval_speed.json`), whose decode step transformers compiles.")
    return results, [header, "", *table]


def cpu(args: argparse.Namespace) -> tuple[dict, list[str]]:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = os.environ.get("FINLORA_CACHE_DIR", Path.home() / ".cache" / "finlora")  # as conf/paths/default.yaml
    cfg = EvalConfig(model=ModelConfig(), quant=QuantConfig(bits=8), adapter=SavedAdapterConfig(),
                     paths=PathsConfig(data_dir=str(args.data_dir), cache_dir=str(cache)),
                     adapter_path=str(args.adapter), accelerator="cpu")
    where = placement(cfg)
    tokenizer, model = build(cfg, where)
    [(test_set, records)] = [s for s in sentiment_sets(args.data_dir) if s[0].name == "fpb"]
    rows = [records[i] for i in pick_rows(records, test_set, EvalSettings(limit=args.rows))]
    targets = [str(r["target"]) for r in rows]
    paths = {"today": TODAY} | {f"int8_cpu={s.int8_cpu.value}{'' if s.share_prefix else ', share_prefix=false'}"
                                  f"{' (the defaults)' if s == EvalSettings() else ''}": s
                                  for s in (DEQUANT, BF16_UNSHARED, BF16)}
    runs: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
    answers: dict[str, list[str]] = {}
    for settings in paths.values():  # warm-up: the adapter's DoRA norms, the first allocations
        run_sets(model, tokenizer, [(test_set, rows[:8])], settings, where.precision)
    for _ in range(args.repeats):
        for path, settings in paths.items():
            wall, cpu_s, out = timed(run_sets, model, tokenizer, [(test_set, rows)], settings, where.precision)
            runs[path].append((wall, cpu_s))
            answers[path] = out[0]
            print(path, f"{wall:.1f} s wall, {cpu_s:.1f} s CPU", flush=True)
    # How far bf16 answers move with the batch on the real weights: its paths again at batch 8 (the same rows).
    at_8 = {path: run_sets(model, tokenizer, [(test_set, rows)], replace(settings, batch_size=8), where.precision)[0]
            for path, settings in paths.items() if settings.int8_cpu is Int8Cpu.bf16}
    results: dict = {"rows": len(rows), "threads": torch.get_num_threads(), "adapter": str(args.adapter)}
    table = ["| path | settings | wall s (median) | CPU s (median) | examples/s (CPU time) | time × today's (CPU) | "
             "accuracy | 95% interval | answers unlike today's | unlike `dequant`'s | unlike its own at batch 8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    exact = next(path for path, settings in paths.items() if settings is DEQUANT)
    base = statistics.median(c for _, c in runs["today"])
    for path, settings in paths.items():
        wall = statistics.median(w for w, _ in runs[path])
        cpu_s = statistics.median(c for _, c in runs[path])
        metrics = score(test_set.kind, answers[path], targets, test_set.labels)
        low, high = wilson_interval(metrics["accuracy"], len(rows))
        differ = sum(a != b for a, b in zip(answers["today"], answers[path], strict=True))
        unlike_exact = sum(a != b for a, b in zip(answers[exact], answers[path], strict=True))
        moved = sum(a != b for a, b in zip(at_8[path], answers[path], strict=True)) if path in at_8 else None
        results[path] = {"settings": f"batch_size={settings.batch_size} int8_cpu={settings.int8_cpu.value} "
                                     f"share_prefix={settings.share_prefix}",
                         "wall_s": [round(w, 2) for w, _ in runs[path]], "cpu_s": [round(c, 2) for _, c in runs[path]],
                         "accuracy": metrics["accuracy"], "accuracy_ci95": [low, high], "answers_unlike_today": differ,
                         "answers_unlike_dequant": unlike_exact, "answers_unlike_batch_8": moved}
        table.append(f"| {path} | `{results[path]['settings']}` | {wall:.1f} | {cpu_s:.1f} | {len(rows) / cpu_s:.1f} | "
                     f"{cpu_s / base:.2f} | {100 * metrics['accuracy']:.1f}% | {100 * low:.1f}–{100 * high:.1f}% | "
                     f"{differ} | {unlike_exact} | {'-' if moved is None else moved} |")
    sample = ("all 1,212 FPB test rows (the whole test stage)" if len(rows) == len(records) else
              f"a seeded stratified sample of {len(rows)} FPB test rows (the full stage scores {len(records)})")
    header = (f"`python scripts/bench_eval.py --cpu --adapter …`: the quickstart's test stage (embedded SmolLM2-135M, "
              f"8-bit base, its DoRA adapter `{args.adapter.parent.name}`, fp32 training precision) on {sample}, "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
              f"torch {torch.__version__}, transformers {version('transformers')}, "
              f"bitsandbytes {version('bitsandbytes')}; the paths alternated {args.repeats} time(s) in one process "
              "(medians). *today*: LLM.int8 in batches of 32 (the CPU's `auto`; a static cache changes nothing on "
              "the CPU); `dequant`: bitsandbytes' CPU training path, the int8 weight dequantized to fp32 for each "
              "matmul, the function the adapter was trained through (its answers do not move with the batch); "
              "`bf16`: a bf16 copy of the model made once per test stage (its time included), the 8-bit weights "
              "dequantized and the adapter merged into them, plain bf16 matmuls; `share_prefix`: the prompts' "
              "common prefix (FinLoRA's instruction, 25 tokens) computed once, its KV cache reused by every batch. "
              "*Unlike its own at batch 8*: the same path again at `eval.batch_size=8` (bf16 kernels round "
              "differently with the padding, so a near-tie can flip; LLM.int8's outlier columns move a quarter of "
              "the answers, README). Wall time moves with the other work on the shared cores, CPU time at one "
              "thread much less: the ratios are of CPU time.")
    return results, [header, "", *table]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="the quickstart's test stage on the CPU")
    p.add_argument("--adapter", type=Path, help="--cpu: the quickstart's saved adapter")
    p.add_argument("--smoke", action="store_true", help="GPU mode's logic on the CPU, tiny shapes (not a measurement)")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--threads", type=int, help="--cpu: torch threads (1 steadies the timing on shared cores)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="GPU mode: a torch.profiler table of one steady pass of each new 4-bit path")
    p.add_argument("--profile-dir", type=Path, default=ROOT / "docs", help="where --profile writes its tables")
    p.add_argument("--four-bit-only", action="store_true",
                   help="GPU mode: only the 4-bit Llama-3.1-8B-shapes rows (their own section and JSON part)")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "tokenizer")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FINLORA_DATA_DIR", ROOT / ".gpu" / "data")))
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "eval_speed.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    if args.cpu and args.adapter is None:
        p.error("--cpu needs --adapter (the quickstart run's adapter folder)")
    part = "cpu" if args.cpu else "gpu_4bit" if args.four_bit_only else "gpu"
    results, lines = cpu(args) if args.cpu else gpu(args)
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    write_json(args.json, saved | {part: results})
    title = "## Evaluation speed, " + ("the quickstart's test stage on the CPU" if args.cpu else
                                        "GPU, 4-bit alone" if args.four_bit_only else "GPU")
    section = "\n".join([title, "", *lines]) + "\n"
    print(section)
    replace_section(args.out, section)


if __name__ == "__main__":
    main()
