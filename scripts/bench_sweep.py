"""A sweep of 2N short jobs through Ray on an N-GPU machine against one of those jobs run alone.

Shows the GPU each job used (Ray's CUDA_VISIBLE_DEVICES, torch's device and the GPU's UUID) and the sweep's
wall time over the lone job's (goals: at most 2.3× on 2 GPUs, 2.2× on 4; the ideal is 2×). Both are timed
from the command's start to its exit, so the sweep pays for starting Ray and one process per job, as a user
would. The jobs sweep `adapter=lora,dora` and N ranks (8, 16, ...).

    python scripts/bench_sweep.py --out docs/benchmarks.md              # every GPU, about 5 minutes
    python scripts/bench_sweep.py --tokenizer .gpu/tokenizer            # a random-init model of the embedded
                                                                        # model's shapes, with that tokenizer
    python scripts/bench_sweep.py --smoke --out /tmp/bench.md           # CPU, 2 declared GPUs, tiny model
    python scripts/bench_sweep.py --report-from results.json --out docs/benchmarks.md   # section only

Writes `results.json` in `--work` and (or replaces) the section "## Sweeps on N GPUs" of `--out`.
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
ALONE = ["adapter=dora", "adapter.r=8"]
GOALS = {2: 2.3, 4: 2.2}  # issue 5's on 2 GPUs, issue 17's on 4


def sweep_args(gpus: int) -> list[str]:
    """2 × `gpus` jobs: LoRA and DoRA at `gpus` ranks, so that each GPU runs two jobs one after the other."""
    return ["adapter=lora,dora", "adapter.r=" + ",".join(str(8 * 2**k) for k in range(gpus))]


def timed(args: list[str]) -> float:
    """Run `python train.py ARGS` to its end; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, check=True)
    return round(time.perf_counter() - started, 1)


def measure(work: Path, steps: int, smoke: bool, tokenizer_dir: str | None) -> dict:
    import torch

    from finlora.models import SHAPES, load_tokenizer, resolve_source, save_random_llama

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
        gpus, n = ["+hydra.launcher.ray.init.num_gpus=2"], 2
    else:
        n = torch.cuda.device_count()
        if n < 2:
            sys.exit(f"bench_sweep: needs 2 GPUs or more, torch sees {n} (or use --smoke)")
        if tokenizer_dir:  # speed depends on the shapes, not the weights
            tokenizer = load_tokenizer(tokenizer_dir, _model_config(tokenizer_dir))
            model = save_random_llama(work / "smollm2-random", SHAPES["smollm2-135m"], 30, tokenizer,
                                      torch.device("cuda"))
            common.append(f"model.name_or_path={model}")
        else:
            resolve_source(_model_config(), _cache_dir())  # convert the embedded model once, before any timing
        gpus = []
    alone_s = timed([*common, *ALONE, f"hydra.run.dir={work / 'alone'}"])
    sweep_dir = work / "sweep"
    sweep_s = timed(["-m", "hydra/launcher=ray", *gpus, *common, *sweep_args(n), f"hydra.sweep.dir={sweep_dir}"])
    sweep = load_sweep(sweep_dir)
    t0 = min(j.record["started"] for j in sweep.jobs)
    jobs = [{"job": j.dir.name.split("_", 1)[0], "overrides": " ".join(f"{k}={j.overrides[k]}" for k in sweep.swept),
             "status": j.status, "cuda_visible_devices": j.record.get("cuda_visible_devices"),
             "device": j.record.get("device"), "gpu": j.record.get("gpu_name"), "gpu_uuid": j.record.get("gpu_uuid"),
             "start_s": round(j.record["started"] - t0, 1), "end_s": round(j.record["ended"] - t0, 1),
             "train_s": j.metrics.get("wall_time_s")} for j in sweep.jobs]
    return {"alone_s": alone_s, "sweep_s": sweep_s, "ratio": round(sweep_s / alone_s, 2), "jobs": jobs,
            "steps": steps, "smoke": smoke, "common": common, "gpus": n, "sweep": sweep_args(n),
            "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)",
            "versions": {p: version(p) for p in ("torch", "ray", "hydra-ray-launcher", "lightning")},
            "python": platform.python_version()}


def _model_config(name_or_path: str | None = None):
    from finlora.config import ModelConfig

    return ModelConfig(name_or_path=name_or_path) if name_or_path else ModelConfig()


def _cache_dir() -> str:
    import os

    return os.environ.get("FINLORA_CACHE_DIR", str(Path.home() / ".cache" / "finlora"))


def section(r: dict) -> str:
    n, sweep = r["gpus"], r.get("sweep", sweep_args(2))
    goal = GOALS.get(n, 2.2)
    verdict = "met" if r["ratio"] <= goal else "**not met**"
    lines = [
        f"## Sweeps on {n} GPUs", "",
        f"`python scripts/bench_sweep.py{' --smoke' if r['smoke'] else ''}`: {r['gpus']} × {r['gpu_name']}; "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f", Python {r['python']}.", "",
        f"{2 * n} jobs (`python train.py -m hydra/launcher=ray {' '.join(sweep)}`) against one alone "
        f"(`python train.py {' '.join(ALONE)}`), all with `{' '.join(r['common'])}`. Wall time from the command's "
        "start to its exit: the sweep includes starting Ray and a fresh process per job.", "",
        f"- one job alone: {r['alone_s']:.0f} s; sweep of {2 * n}: {r['sweep_s']:.0f} s; "
        f"**ratio {r['ratio']:.2f}×** (goal ≤ {goal}×: {verdict}; 2× is the ideal on {n} GPUs)", "",
        "| job | overrides | status | CUDA_VISIBLE_DEVICES | torch device | GPU UUID | start s | end s | train() s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {j['job']} | {j['overrides']} | {j['status']} | {j['cuda_visible_devices']} | {j['device']} | "
          f"{j['gpu_uuid'] or '-'} | {j['start_s']} | {j['end_s']} | {j['train_s']} |" for j in r["jobs"]),
        "", f"Start and end are seconds after the first job started: {n} jobs at a time, one per GPU.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_sweep"))
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per job")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, 2 steps")
    parser.add_argument("--tokenizer", help="train a random-init model of the embedded model's shapes saved with "
                        "this tokenizer folder (default: the embedded model itself)")
    parser.add_argument("--report-from", type=Path, help="write the section from a results.json, measure nothing")
    args = parser.parse_args()
    if args.report_from:
        results = json.loads(args.report_from.read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        results = measure(args.work, 2 if args.smoke else args.steps, args.smoke, args.tokenizer)
        write_json(args.work / "results.json", results)
    replace_section(args.out, section(results))
    print(section(results))


if __name__ == "__main__":
    main()
