"""A sweep of 4 short jobs through Ray on a 2-GPU machine against one of those jobs run alone.

Shows the GPU each job used (Ray's CUDA_VISIBLE_DEVICES, torch's device and the GPU's UUID) and the sweep's
wall time over the lone job's (goal: at most 2.3×; the ideal with 2 GPUs is 2×). Both are timed from the
command's start to its exit, so the sweep pays for starting Ray and one process per job, as a user would.

    python scripts/bench_sweep.py --out docs/benchmarks.md              # 2 GPUs, about 5 minutes
    python scripts/bench_sweep.py --smoke --out /tmp/bench.md           # CPU, 2 declared GPUs, tiny model
    python scripts/bench_sweep.py --report-from results.json --out docs/benchmarks.md   # section only

Writes `results.json` in `--work` and (or replaces) the section "## Sweeps on 2 GPUs" of `--out`.
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

from finlora.outputs import replace_section, write_json
from finlora.run.report import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["adapter=lora,dora", "adapter.r=8,16"]
ALONE = ["adapter=dora", "adapter.r=8"]


def timed(args: list[str]) -> float:
    """Run `python train.py ARGS` to its end; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, check=True)
    return round(time.perf_counter() - started, 1)


def measure(work: Path, steps: int, smoke: bool) -> dict:
    import torch

    from finlora.models import resolve_source

    common = ["task=fpb", "quant=none", "logger=csv", "eval.enabled=false", "data.val_size=64",
              f"trainer.max_steps={steps}"]
    if smoke:  # CPU: a tiny random model, Ray told of 2 GPUs that are not there
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(resolve_source(_model_config(), _cache_dir()))
        tiny = work / "tiny-llama"
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True)).save_pretrained(tiny)
        tokenizer.save_pretrained(tiny)
        common += [f"model.name_or_path={tiny}", "trainer=cpu", "trainer.batch_size=4", "data.max_length=96"]
        gpus = ["+hydra.launcher.ray.init.num_gpus=2"]
    else:
        if torch.cuda.device_count() < 2:
            sys.exit(f"bench_sweep: needs 2 GPUs, torch sees {torch.cuda.device_count()} (or use --smoke)")
        resolve_source(_model_config(), _cache_dir())  # convert the embedded model once, before any timing
        gpus = []
    alone_s = timed([*common, *ALONE, f"hydra.run.dir={work / 'alone'}"])
    sweep_dir = work / "sweep"
    sweep_s = timed(["-m", "hydra/launcher=ray", *gpus, *common, *SWEEP, f"hydra.sweep.dir={sweep_dir}"])
    sweep = load_sweep(sweep_dir)
    t0 = min(j.record["started"] for j in sweep.jobs)
    jobs = [{"job": j.dir.name.split("_", 1)[0], "overrides": " ".join(f"{k}={j.overrides[k]}" for k in sweep.swept),
             "status": j.status, "cuda_visible_devices": j.record.get("cuda_visible_devices"),
             "device": j.record.get("device"), "gpu": j.record.get("gpu_name"), "gpu_uuid": j.record.get("gpu_uuid"),
             "start_s": round(j.record["started"] - t0, 1), "end_s": round(j.record["ended"] - t0, 1),
             "train_s": j.metrics.get("wall_time_s")} for j in sweep.jobs]
    return {"alone_s": alone_s, "sweep_s": sweep_s, "ratio": round(sweep_s / alone_s, 2), "jobs": jobs,
            "steps": steps, "smoke": smoke, "common": common, "gpus": torch.cuda.device_count(),
            "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)",
            "versions": {p: version(p) for p in ("torch", "ray", "hydra-ray-launcher", "lightning")},
            "python": platform.python_version()}


def _model_config():
    from finlora.config import ModelConfig

    return ModelConfig()


def _cache_dir() -> str:
    import os

    return os.environ.get("FINLORA_CACHE_DIR", str(Path.home() / ".cache" / "finlora"))


def section(r: dict) -> str:
    verdict = "met" if r["ratio"] <= 2.3 else "**not met**"
    lines = [
        "## Sweeps on 2 GPUs", "",
        f"`python scripts/bench_sweep.py{' --smoke' if r['smoke'] else ''}`: {r['gpus']} × {r['gpu_name']}; "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f", Python {r['python']}.", "",
        f"4 jobs (`python train.py -m hydra/launcher=ray {' '.join(SWEEP)}`) against one alone "
        f"(`python train.py {' '.join(ALONE)}`), all with `{' '.join(r['common'])}`. Wall time from the command's "
        "start to its exit: the sweep includes starting Ray and a fresh process per job.", "",
        f"- one job alone: {r['alone_s']:.0f} s; sweep of 4: {r['sweep_s']:.0f} s; "
        f"**ratio {r['ratio']:.2f}×** (goal ≤ 2.3×: {verdict}; 2× is the ideal on 2 GPUs)", "",
        "| job | overrides | status | CUDA_VISIBLE_DEVICES | torch device | GPU UUID | start s | end s | train() s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {j['job']} | {j['overrides']} | {j['status']} | {j['cuda_visible_devices']} | {j['device']} | "
          f"{j['gpu_uuid'] or '-'} | {j['start_s']} | {j['end_s']} | {j['train_s']} |" for j in r["jobs"]),
        "", "Start and end are seconds after the first job started: two jobs at a time, one per GPU.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_sweep"))
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per job")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, 2 steps")
    parser.add_argument("--report-from", type=Path, help="write the section from a results.json, measure nothing")
    args = parser.parse_args()
    if args.report_from:
        results = json.loads(args.report_from.read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        results = measure(args.work, 2 if args.smoke else args.steps, args.smoke)
        write_json(args.work / "results.json", results)
    replace_section(args.out, section(results))
    print(section(results))


if __name__ == "__main__":
    main()
