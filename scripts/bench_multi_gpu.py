"""Several GPUs through finlora's own `python train.py` (issue 17), each run read from its own summary.

DDP: Llama-3.1-8B layer shapes (4 decoder layers, vocabulary 128,256, random weights, real tokenizer),
4-bit NF4, LoRA r=8 on q/k/v, FinLoRA's sentiment mixture packed, 8 examples per GPU a step: tokens/s per
GPU on 1 and N GPUs (rank zero counts its own tokens) and the median logging step's time (the same 8
examples a GPU, so the one-GPU step over the N-GPU step is the per-GPU scaling, free of the first steps'
one-off costs that weigh on a short run's tokens/s), and the loss curve of N GPUs x 8 against one GPU x 8N
(the same global batch); DoRA on N GPUs too; for each of `--modes`: eager on packed batches, or
`trainer.capture` on static ones. Each row also has the median of the run's logged tokens/s windows, which a
step that waited for another rank's recording of a new shape sways no more than one window. Rows keep the
machine they ran on, and ratios are taken within one invocation only. `--profile DIR`: every rank of every row
profiles its host's steps 100-150 (`scripts/train_profiled.py`). FSDP: Llama-3.1-70B layer shapes at 1 and 2 decoder
layers, 4-bit, sharded over N GPUs: peak memory per GPU, extrapolated linearly to 80 layers.

    python scripts/bench_multi_gpu.py --data .gpu/data --tokenizer .gpu/tokenizer

Writes docs/multi_gpu.json and the section "## Several GPUs" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finlora.config import ModelConfig
from finlora.models import SHAPES, load_tokenizer, save_random_llama
from finlora.outputs import replace_section, write_json

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = SHAPES["llama-3.1-8b"]
LLAMA_70B = SHAPES["llama-3.1-70b"]


def train(name: str, model: Path, args: argparse.Namespace, *extra: str, **tags: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    script, env = ROOT / "train.py", None
    if args.profile:  # every rank's host steps, to --profile/<row>/rank<N>.txt
        script = ROOT / "scripts" / "train_profiled.py"
        env = os.environ | {"FINLORA_PROFILE_DIR": str(Path(args.profile) / name.replace(" ", "_").replace(",", ""))}
    cmd = [sys.executable, str(script), f"model.name_or_path={model}", f"paths.data_dir={args.data}",
           f"hydra.run.dir={out}", "task=sentiment", "logger=csv", "eval.enabled=false", "eval.during_training.size=0",
           "eval.during_training.samples=0",
           "data.val_size=16", "checkpoint.every_n_steps=100000", "checkpoint.keep_best=0",
           "trainer.log_every_n_steps=5", f"trainer.max_steps={args.steps}", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    row = {"name": name, "overrides": list(extra), "wall_s": round(time.perf_counter() - started, 1),
           "machine": args.device, "invocation": args.invocation, **tags}
    if done.returncode or not (out / "metrics.json").is_file():
        row["error"] = done.stderr[-1500:]
    else:
        row |= json.loads((out / "metrics.json").read_text())
        log = out / "csv" / "metrics.csv"
        logged = list(csv.DictReader(log.open()))
        row["losses"] = [float(r["train/loss"]) for r in logged if r.get("train/loss")]
        windows = sorted(float(r["train/tokens_per_s"]) for r in logged if r.get("train/tokens_per_s"))
        row["tokens_per_s_median_window"] = windows[len(windows) // 2] if windows else None
    print(f"[{name}] {row.get('tokens_per_s') or 0:,.0f} tok/s/GPU, peak {row.get('gpu_peak_gib')} GiB, "
          f"{row.get('error', '')[-600:]}", flush=True)
    rows = json.loads(Path(args.json).read_text())["rows"] if Path(args.json).is_file() else []
    write_json(Path(args.json), {"device": args.device, "gpus": args.gpus, "rows": [*rows, row]})
    return row


MODES = {"eager": ["data.batching=packed"],  # what the rows without a mode in their name ran
         "capture": ["data.batching=static", "trainer.capture=true"]}


def ddp(args: argparse.Namespace, tokenizer) -> list[dict]:
    model = save_random_llama(Path(args.work) / "llama8b", LLAMA_8B, 4, tokenizer, torch.device("cuda"))
    n, rows = args.gpus, []
    for mode in args.modes:
        common, suffix = ["quant=4bit", *MODES[mode]], "" if mode == "eager" else f", {mode}"
        on_n = ["trainer=ddp", f"trainer.devices={n}", "trainer.batch_size=8"]
        rows += [train(f"1 GPU x 8 lora{suffix}", model, args, "trainer=gpu", "adapter=lora", "trainer.batch_size=8",
                       *common),
                 train(f"{n} GPUs x 8 lora{suffix}", model, args, *on_n, "adapter=lora", *common),
                 train(f"1 GPU x {8 * n} lora{suffix}", model, args, "trainer=gpu", "adapter=lora",
                       f"trainer.batch_size={8 * n}", *common),
                 train(f"{n} GPUs x 8 dora{suffix}", model, args, *on_n, "adapter=dora", *common)]
    return rows


def fsdp(args: argparse.Namespace, tokenizer) -> list[dict]:
    rows = []
    for layers in args.fsdp_layers:
        model = save_random_llama(Path(args.work) / f"llama70b-{layers}", LLAMA_70B, layers, tokenizer,
                                  torch.device("cuda"))
        torch.cuda.empty_cache()
        rows.append(train(f"fsdp {args.gpus} GPUs 70B shapes {layers} layers", model, args, "trainer=fsdp",
                          f"trainer.devices={args.gpus}", "adapter=lora", "quant=4bit", "trainer.batch_size=8",
                          "data.batching=packed", "trainer.gradient_checkpointing=true", layers=layers))
    return rows


def markdown(rows: list[dict], device: str, gpus: int) -> str:
    lines = ["## Several GPUs", "", f"`scripts/bench_multi_gpu.py` on {device}: each row one `python train.py` run, "
             "read from its own summary (tokens/s: rank zero's useful tokens, so per GPU; over the whole run, and "
             "the median of the run's logged windows of `trainer.log_every_n_steps` steps, where a step that waited "
             "while another rank recorded a shape weighs no more than one window).", "",
             "| run | machine | useful tokens/s per GPU | median window | step ms (median) | peak GiB (rank 0) | "
             "final loss | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('machine', device).split(';')[0]} | failed: "
                         f"{r['error'].strip().splitlines()[-1][:200]} | | | | | |")
        else:
            window = r.get("tokens_per_s_median_window")
            lines.append(f"| {r['name']} | {r.get('machine', device).split(';')[0]} | {r['tokens_per_s']:,.0f} | "
                         f"{f'{window:,.0f}' if window else '-'} | {r.get('step_ms') or '-'} | {r['gpu_peak_gib']} | "
                         f"{r['final_train_loss']:.4f} | {r['wall_s']} |")
    lines.append("")
    for invocation in dict.fromkeys(r.get("invocation") for r in rows):  # ratios within one invocation only
        ok = {r["name"]: r for r in rows if "error" not in r and r.get("invocation") == invocation}
        for suffix in sorted({k.partition(",")[1] + k.partition(",")[2] for k in ok}):
            lines += _scaling(ok, suffix, invocation, device)
    fs = {r["layers"]: r for r in rows if "layers" in r and "error" not in r}  # the latest run of each depth
    if len(fs) >= 2:
        low, high = fs[min(fs)], fs[max(fs)]
        per_layer = (high["gpu_peak_gib"] - low["gpu_peak_gib"]) / (high["layers"] - low["layers"])
        at80 = low["gpu_peak_gib"] + per_layer * (80 - low["layers"])
        n = int(high["name"].split()[1])  # "fsdp N GPUs ..."
        lines += [f"FSDP, Llama-3.1-70B shapes, 4-bit, sharded over {n} GPUs ({high.get('machine', device)}): "
                  f"{per_layer:.2f} GiB more per GPU per layer ({low['layers']} and {high['layers']} layers); "
                  f"extrapolated to 80 layers {at80:.1f} GiB per GPU "
                  f"({'fits' if at80 < 78 else 'does not fit'} {n} × 80 GB)."]
    return "\n".join(lines)


def _scaling(ok: dict[str, dict], suffix: str, invocation: str | None, device: str) -> list[str]:
    """DDP's per-GPU scaling and loss curve, for the rows of one mode (`suffix`: "" for eager, ", capture")."""
    lines, one = [], ok.get(f"1 GPU x 8 lora{suffix}")
    for n in sorted({int(k.split()[0]) for k in ok if k.endswith(f"GPUs x 8 lora{suffix}")}):
        many, same = ok[f"{n} GPUs x 8 lora{suffix}"], ok.get(f"1 GPU x {8 * n} lora{suffix}")
        mode = suffix.removeprefix(", ") or "eager"
        if one:
            by_step = (f", {one['step_ms'] / many['step_ms']:.2f} × by the median step ({one['step_ms']} ms on "
                       f"one GPU, {many['step_ms']} ms on {n})" if one.get("step_ms") and many.get("step_ms")
                       else "")
            windows = (one.get("tokens_per_s_median_window"), many.get("tokens_per_s_median_window"))
            by_window = (f", {windows[1] / windows[0]:.2f} × by the median window ({windows[1]:,.0f} against "
                         f"{windows[0]:,.0f})" if all(windows) else "")
            lines.append(f"DDP scaling, {n} GPUs, 8 examples each, {mode} ({many.get('machine', device)}; run "
                         f"{invocation}): per GPU {many['tokens_per_s'] / one['tokens_per_s']:.2f} × the one-GPU "
                         f"tokens/s{by_window}{by_step}.")
        if same and same["losses"] and many["losses"]:
            diffs = [abs(a - b) / abs(b) for a, b in zip(many["losses"], same["losses"], strict=False)]
            tail = min(10, len(diffs))
            lines.append(f"Loss curve, {n} GPUs x 8 against 1 GPU x {8 * n}, {mode} (same global batch, other example "
                         f"order): mean relative difference {sum(diffs) / len(diffs):.3f}, largest "
                         f"{max(diffs):.3f} over {len(diffs)} logged steps (rank zero's batch on {n} GPUs); "
                         f"mean of the last {tail} logged losses {_mean(many['losses'][-tail:]):.3f} against "
                         f"{_mean(same['losses'][-tail:]):.3f}.")
    return lines


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("FINLORA_DATA_DIR", str(ROOT.parent / "shared/data/finlora")))
    parser.add_argument("--tokenizer", help="a tokenizer folder (needed unless --rewrite)")
    parser.add_argument("--only", nargs="*", default=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["eager"],
                        help="ddp's runs: eager on packed batches, or trainer.capture on static ones")
    parser.add_argument("--timeout", type=int, default=200)
    parser.add_argument("--profile", help="a folder: each row's ranks profile steps 100-150 there (train_profiled.py)")
    parser.add_argument("--fsdp-layers", type=int, nargs="+", default=[1, 2], help="decoder layers of the 70B shapes")
    parser.add_argument("--append", action="store_true", help="add to --json's rows instead of starting anew")
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    parser.add_argument("--json", default=str(ROOT / "docs/multi_gpu.json"))
    parser.add_argument("--md", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--rewrite", action="store_true", help="only rewrite --md's section from --json's rows")
    args = parser.parse_args()
    if args.rewrite:
        return write_markdown(args)
    if not args.tokenizer:
        parser.error("--tokenizer is needed to run")
    args.gpus = torch.cuda.device_count()
    args.device = f"{args.gpus} × {torch.cuda.get_device_name()}; torch {torch.__version__}"
    args.invocation = time.strftime("%Y-%m-%dT%H:%M:%S")
    if not args.append:
        Path(args.json).unlink(missing_ok=True)
    tokenizer = load_tokenizer(args.tokenizer, ModelConfig(name_or_path=args.tokenizer))
    for section in args.only:
        {"ddp": ddp, "fsdp": fsdp}[section](args, tokenizer)
    write_markdown(args)


def write_markdown(args: argparse.Namespace) -> None:
    """The section from every row in --json: with --append, the earlier runs' rows too."""
    done = json.loads(Path(args.json).read_text())
    text = markdown(done["rows"], done["device"], done.get("gpus", 2))
    replace_section(Path(args.md), text)
    print(text)


if __name__ == "__main__":
    main()
