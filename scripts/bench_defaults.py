"""What `python train.py` gives with no flags on a GPU (issue 33), side by side in one run, through finlora's own
`train()` and `python train.py` jobs, on random-init models with the real tokenizer (speed depends on shapes).

Sections (`--only` picks some):
  mission   the mission's command (`adapter=dora adapter.r=8 quant=8bit`, embedded shapes, task=sentiment, batch 8)
            with no other flags, against the same with `trainer.capture=false quant.int8_compute=llm_int8` (the
            eager LLM.int8 step users got before); also LoRA, and quant=none / 4bit with no flags.
  llama     Llama-3.1-8B shapes, 4 layers, batch 8, no flags: 8-bit against 4-bit, DoRA against LoRA; then DoRA at
            both with the decoder layers compiled (`trainer.compile=inductor trainer.compile_regions=true`).
  numerics  50 steps from one init: the 8-bit base computed weight-only against a bf16 model holding the same
            weights dequantized (W0 = CB·SCB/127, saved as a model of its own): the largest relative difference of
            the per-step losses.
  startup   `python train.py` with no flags, 400 steps of the embedded shapes, in a fresh process: its whole wall
            time (start-up, loading, recording included; no test stage).
  memory    all 32 layers of Llama-3.1-8B's shapes, r=8 on q/k/v, gradient checkpointing, 1 x 2,048 tokens (20 packed
            sentiment examples): peak memory at 4-bit and 8-bit; then tokens/s of both at 8 examples, no other flags.

    python scripts/bench_defaults.py --data .gpu/data --tokenizer .gpu/model       # GPU
    python scripts/bench_defaults.py --smoke --only mission numerics                # CPU, tiny shapes: checks it

Writes docs/defaults_speed.json (every run's summary) and the section "## Fast by default" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_speed as bench  # noqa: E402  (the runner every training benchmark shares)

from finlora.config import ModelConfig  # noqa: E402
from finlora.models import load_tokenizer, save_random_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Fast by default"
MISSION = ["task=sentiment", "adapter=dora", "adapter.r=8", "quant=8bit", "trainer.batch_size=8"]
BEFORE = ["trainer.capture=false", "quant.int8_compute=llm_int8"]


def steps(args: argparse.Namespace, eager: bool) -> str:
    return f"trainer.max_steps={args.eager_steps if eager else args.steps}"


def mission(model: Path, args: argparse.Namespace) -> list[dict]:
    rows = [bench.run("mission, eager LLM.int8 (before)", model, args, *MISSION, *BEFORE, steps(args, True)),
            bench.run("mission, no flags", model, args, *MISSION, steps(args, False)),
            bench.run("mission lora, no flags", model, args, *MISSION, "adapter=lora", steps(args, False))]
    rows += [bench.run(f"quant={q} dora, no flags", model, args, *MISSION, f"quant={q}", steps(args, False))
             for q in ("none", "4bit")]
    return rows


def llama(args: argparse.Namespace) -> list[dict]:
    model = save_random_llama(Path(args.work) / "llama4", bench.LLAMA_8B, 2 if args.smoke else 4, args.tok,
                              bench._init_device())
    common = ["task=sentiment", "trainer.batch_size=8", steps(args, False)]
    rows = [bench.run(f"llama-8b x4 {bits}bit {adapter}, no flags", model, args, *common, f"adapter={adapter}",
                      f"quant={bits}bit") for bits in (8, 4) for adapter in ("lora", "dora")]
    return rows + [bench.run(f"llama-8b x4 {bits}bit dora, capture+regions", model, args, *common, "adapter=dora",
                             f"quant={bits}bit", "trainer.compile=inductor", "trainer.compile_regions=true")
                   for bits in (8, 4)]


def numerics(model: Path, args: argparse.Namespace) -> list[dict]:
    """The same 50 steps on the weight-only 8-bit base and on a bf16 model of its dequantized weights."""
    copy = dequantized_copy(model, Path(args.work) / "dequantized")
    common = ["task=sentiment", "adapter=dora", "trainer.batch_size=8", "trainer.max_steps=50",
              "trainer.log_every_n_steps=1", "adapter.dropout=0", "data.batching=static"]
    weight_only = bench.run("numerics 8-bit weight-only", model, args, *common, "quant=8bit",
                            "quant.int8_compute=weight_only")
    dense = bench.run("numerics bf16 copy of the dequantized base", copy, args, *common, "quant=none")
    rows = [weight_only, dense]
    if "losses" in weight_only and "losses" in dense:
        a, b = weight_only["losses"], dense["losses"]
        rows.append({"name": "numerics", "steps": len(a),
                     "max_rel_loss_diff": max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))})
        bench.keep(rows[-1], args)
    return rows


def dequantized_copy(model: Path, folder: Path) -> Path:
    """`model` with each linear layer's weight replaced by its 8-bit quantization dequantized (CB·SCB/127, in
    bf16), saved as a plain model: the function the weight-only 8-bit base computes."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from finlora.quant.int8 import dequantize_int8

    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    device = bench._init_device()
    for module in dense.modules():
        if isinstance(module, torch.nn.Linear) and module is not dense.get_output_embeddings():
            w = module.weight.data.to(device, torch.float16)
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)  # what Int8Params does when loaded 8-bit
            module.weight.data = dequantize_int8(cb, scb, torch.bfloat16).cpu()
    dense.save_pretrained(folder)
    load_tokenizer(str(model), ModelConfig(name_or_path=str(model))).save_pretrained(folder)
    return folder


def startup(model: Path, args: argparse.Namespace) -> list[dict]:
    return [bench.job(f"python train.py, no flags, {n} steps", model, args, args.cache, *MISSION,
                      f"trainer.max_steps={n}") for n in ([4] if args.smoke else [400])]


def memory(args: argparse.Namespace) -> list[dict]:
    layers = 2 if args.smoke else 32
    model = save_random_llama(Path(args.work) / f"llama{layers}", bench.LLAMA_8B, layers, args.tok,
                              bench._init_device())
    rows = []
    for bits in (4, 8):
        q = ["task=sentiment", "adapter=lora", f"quant={bits}bit", "trainer.gradient_checkpointing=true"]
        rows.append(bench.run(f"memory {layers} layers {bits}bit, 1 x 2048 tokens", model, args, *q,
                              "trainer.batch_size=20", "data.max_length=2048", "trainer.max_steps=6"))
        rows.append(bench.run(f"memory {layers} layers {bits}bit, 8 examples, no flags", model, args, *q,
                              "trainer.batch_size=8", steps(args, False)))
    return rows


def markdown(rows: list[dict], device: str) -> list[str]:
    lines = [SECTION, "", f"`scripts/bench_defaults.py` on {device}: each row one run of finlora's `train()` (or a "
             "fresh `python train.py`), read from its own summary; tokens/s after the first batch of each shape.", "",
             "| run | path | useful tokens/s | × before | step ms | host syncs/step | peak GiB | process s |",
             "|---|---|---|---|---|---|---|---|"]
    before = next((r for r in rows if r["name"].startswith("mission, eager") and "error" not in r), None)
    for r in rows:
        if "max_rel_loss_diff" in r:
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:200]} | | | | | | |")
            continue
        ratio = (f"{r['tokens_per_s'] / before['tokens_per_s']:.1f}" if before and r.get("tokens_per_s")
                 and r["name"].startswith("mission") else "")
        lines.append(f"| {r['name']} | {r.get('step_path', '')} | {bench._num(r.get('tokens_per_s'), ',.0f')} | "
                     f"{ratio} | {bench._num(r.get('step_ms'))} | {bench._num(r.get('host_syncs_per_step'))} | "
                     f"{bench._num(r.get('gpu_peak_gib') or r.get('peak_gib'), '.2f')} | {r.get('process_s', '')} |")
    by = {r["name"]: r for r in rows if "error" not in r}
    for bits in (8, 4):
        lora, dora = by.get(f"llama-8b x4 {bits}bit lora, no flags"), by.get(f"llama-8b x4 {bits}bit dora, no flags")
        if lora and dora:
            lines += ["", f"Llama-3.1-8B shapes at {bits}-bit, no flags: DoRA/LoRA step "
                      f"{dora['step_ms'] / lora['step_ms']:.3f}."]
    for adapter, form in (("lora", "no flags"), ("dora", "no flags"), ("dora", "capture+regions")):
        eight, four = by.get(f"llama-8b x4 8bit {adapter}, {form}"), by.get(f"llama-8b x4 4bit {adapter}, {form}")
        if eight and four:
            lines += ["", f"Llama-3.1-8B shapes, {adapter}, {form}: 8-bit step / 4-bit step "
                      f"{eight['step_ms'] / four['step_ms']:.3f}."]
    for r in rows:
        if "max_rel_loss_diff" in r:
            lines += ["", f"Numerics: {r['steps']} steps of DoRA from one init, weight-only 8-bit against a bf16 "
                      f"model of its dequantized weights: largest relative difference of the per-step losses "
                      f"{r['max_rel_loss_diff']:.2e}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/finlora"))
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--only", nargs="*", default=["mission", "llama", "numerics", "startup", "memory"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eager-steps", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script")
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="bench-defaults-"))
    parser.add_argument("--json", default=str(ROOT / "docs/defaults_speed.json"))
    parser.add_argument("--md", default=str(ROOT / "docs/benchmarks.md"))
    parser.add_argument("--append", action="store_true", help="add to --json's rows instead of starting anew")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite --md's section from --json's rows")
    args = parser.parse_args()
    if args.rewrite:
        return bench.write_markdown(args, markdown)
    args.cache = str(Path(args.work) / "compile_cache")
    if args.smoke:
        args.steps, args.eager_steps = min(args.steps, 3), min(args.eager_steps, 3)
        bench.LLAMA_8B = bench.TINY
    source = args.tokenizer or str(bench._embedded_tokenizer())
    args.tok = load_tokenizer(source, ModelConfig(name_or_path=source))
    args.device = bench.describe_device()
    model = save_random_llama(Path(args.work) / "smollm2", bench.TINY if args.smoke else bench.SMOLLM2,
                              2 if args.smoke else 30, args.tok, torch.device("cpu"))
    if not args.append:
        Path(args.json).unlink(missing_ok=True)
    sections = {"mission": lambda: mission(model, args), "llama": lambda: llama(args),
                "numerics": lambda: numerics(model, args), "startup": lambda: startup(model, args),
                "memory": lambda: memory(args)}
    for name in args.only:
        sections[name]()
    bench.write_markdown(args, markdown)


if __name__ == "__main__":
    main()
