"""A whole task's test sets scored end to end after the model is loaded, as `eval.py` scores them (issue 13).

One process, one row: a random-init model of the embedded model's shapes (SmolLM2-135M: 30 layers, bf16,
the real tokenizer) scores the `sentiment` task's four test sets (7,882 rows) through `evaluate_sets`, the
function `eval.py` and training's test stage call (generation, scoring, the files written), twice: the
first pass pays for compiling the decode step, the second is steady. Run it in a fresh process per row, so
the first pass starts from what a new `eval.py` job has: nothing compiled in memory, and the compile cache
in `TORCHINDUCTOR_CACHE_DIR` (empty for a first job, filled for a later one). `--decode-compile` sets
`eval.decode_compile` (Dynamo's CUDA-graph backend, Inductor or finlora's recording; else the checkout's
default). The row holds a digest of the first pass's answers: rows of one model compare answer for answer. `--profile
FILE` adds a third pass under torch.profiler (its top ops by device and by host time, to FILE). Run against
another checkout's `src` (PYTHONPATH), it measures that code: the row says which commit.

    TORCHINDUCTOR_CACHE_DIR=/tmp/c1 python scripts/bench_eval_task.py --label "first job" [--append]

Adds its row to the part "gpu_task" of `docs/eval_speed.json` (`--append`; without it the part starts anew)
and rewrites the section "## Evaluation speed, GPU, a whole task end to end" of `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finlora.build import build, placement
from finlora.config import EvalConfig, EvalSettings, ModelConfig, QuantConfig, TaskConfig, TestSet
from finlora.data import load_test_sets
from finlora.evaluate import evaluate_sets
from finlora.models import SHAPES, save_random_llama
from finlora.outputs import replace_section, write_json

ROOT = Path(__file__).resolve().parents[1]
TITLE = "## Evaluation speed, GPU, a whole task end to end"


def sentiment_sets(data_dir: Path) -> list[tuple[TestSet, list[dict]]]:
    """The `sentiment` task's four test sets, as conf/task/sentiment.yaml lists them."""
    task = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig),
                                               OmegaConf.load(ROOT / "conf" / "task" / "sentiment.yaml")))
    missing = [t.file for t in task.test if not (data_dir / t.file).is_file()]
    if missing:
        print(f"not in {data_dir}, skipped: {', '.join(missing)}", flush=True)
    task.test = [t for t in task.test if t.file not in missing]
    return load_test_sets(task, data_dir)


def profiled(path: Path, title: str, fn, *args) -> None:
    """One run of fn(*args) under torch.profiler; writes the 25 ops with the most self device time and the 25
    with the most self CPU time to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn(*args)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    events = prof.key_averages()
    tables = [f"## {title}: top 25 by {key}\n\n{events.table(sort_by=key, row_limit=25)}"
              for key in (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables) + "\n")
    print(f"profile: {path}", flush=True)


def answers_digest(out: Path) -> str:
    """A digest of every answer a pass generated (its `<set>_predictions.jsonl` files)."""
    digest = hashlib.sha256()
    for path in sorted(out.glob("*_predictions.jsonl")):
        digest.update(b"".join(json.dumps(json.loads(line)["generated"]).encode() for line in path.open()))
    return digest.hexdigest()[:16]


def timed_pass(model, tokenizer, sets, settings: EvalSettings, precision: str, out: Path) -> tuple[float, dict]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    started = time.perf_counter()
    metrics = evaluate_sets(model, tokenizer, sets, settings, precision, None, out, [])
    sync()
    return time.perf_counter() - started, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", required=True, help="what this row measures (e.g. first job, later job)")
    p.add_argument("--commit", default=os.environ.get("FINLORA_COMMIT", "this checkout"))
    p.add_argument("--decode-compile", choices=["cudagraphs", "inductor", "recorded"], default=None,
                   help="eval.decode_compile (default: the checkout's own; older checkouts compile by inductor)")
    p.add_argument("--append", action="store_true", help="add to the part's rows instead of starting anew")
    p.add_argument("--smoke", action="store_true", help="the logic on the CPU: tiny shapes, 24 rows a set")
    p.add_argument("--profile", type=Path, help="also a torch.profiler table of a third pass, written here")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "tokenizer")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FINLORA_DATA_DIR", ROOT / ".gpu" / "data")))
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "eval_speed.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    from transformers import AutoTokenizer

    settings = EvalSettings()
    if args.decode_compile:  # (a checkout from before eval.decode_compile has no such setting)
        from finlora.config import DecodeCompile

        settings = EvalSettings(decode_compile=DecodeCompile(args.decode_compile))
    compiled_by = getattr(settings, "decode_compile", None)
    compiled_by = compiled_by.value if compiled_by else "inductor"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sets = sentiment_sets(args.data_dir)
    shape, layers, device = SHAPES["smollm2-135m"], 30, torch.device("cuda")
    if args.smoke:
        sets, device = [(t, r[:24]) for t, r in sets], torch.device("cpu")
        shape, layers = shape | {"hidden_size": 72, "intermediate_size": 128}, 2
    rows = sum(len(r) for _, r in sets)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_llama(Path(tmp) / "model", shape, layers, tokenizer, device)
        cfg = EvalConfig(model=ModelConfig(name_or_path=str(folder)), quant=QuantConfig(),
                         accelerator=device.type.replace("cuda", "gpu"),
                         precision="bf16-mixed" if device.type == "cuda" else "32-true")
        where = placement(cfg)
        model = build(cfg, where).model
        first, metrics = timed_pass(model, tokenizer, sets, settings, where.precision, Path(tmp) / "first")
        digest = answers_digest(Path(tmp) / "first")
        steady, again = timed_pass(model, tokenizer, sets, settings, where.precision, Path(tmp) / "steady")
        if args.profile:
            profiled(args.profile, f"{args.label}, decode step by {compiled_by}: a steady pass", evaluate_sets,
                     model, tokenizer, sets, settings, where.precision, None, Path(tmp) / "profiled", [])
    from torch._dynamo.utils import compile_times

    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU smoke run (not a measurement)"
    row = {"label": args.label, "commit": args.commit, "decode_compile": compiled_by, "device": where,
           "torch": torch.__version__,
           "transformers": version("transformers"), "sets": [t.name for t, _ in sets], "rows": rows,
           "first_pass_s": round(first, 2), "steady_s": round(steady, 2),
           "steady_examples_per_s": round(rows / steady), "same_scores_both_passes": metrics == again,
           "answers_sha256": digest,
           "compile_times": compile_times(repr="str", aggregate=True)[-1500:]}
    print(json.dumps(row, indent=1), flush=True)
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    kept = saved.get("gpu_task", []) if args.append else []
    write_json(args.json, saved | {"gpu_task": [*kept, row]})
    replace_section(args.out, markdown([*kept, row]))


def markdown(rows: list[dict]) -> str:
    lines = [TITLE, "",
             "`python scripts/bench_eval_task.py` (one fresh process a row): a random-init model of the embedded "
             "model's shapes, bf16, the real tokenizer, scores the `sentiment` task's four test sets through "
             "`evaluate_sets`, as `eval.py` does, twice. *First pass*: from a new process's state (decode step "
             "not compiled in memory; the compile cache as the label says); *steady*: the second pass. A random "
             "model rarely says EOS, so most rows decode up to the task's `max_new_tokens`: a worst case.", "",
             "| row | code | decode step compiled by | device | rows | first pass s | steady s | steady examples/s "
             "| answers (digest) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['commit']} | {r['decode_compile']} | {r['device']} | {r['rows']} | "
              f"{r['first_pass_s']} | {r['steady_s']} | {r['steady_examples_per_s']:,} | "
              f"{r.get('answers_sha256', '')} |" for r in rows]
    versions = sorted({f"torch {r['torch']}, transformers {r['transformers']}" for r in rows})
    return "\n".join([*lines, "", f"Versions: {'; '.join(versions)}."]) + "\n"


if __name__ == "__main__":
    main()
