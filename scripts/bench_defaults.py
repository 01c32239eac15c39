"""What `python train.py` gives with no flags on a GPU (issue 33), side by side in one run, through finlora's own
`train()` and `python train.py` jobs, on random-init models with the real tokenizer (speed depends on shapes).

Sections (`--only` picks some):
  mission   the mission's command (`adapter=dora adapter.r=8 quant=8bit`, embedded shapes, task=sentiment, batch 8)
            with no other flags, against the same with `trainer.capture=false quant.int8_compute=llm_int8` (the
            eager LLM.int8 step users got before); also LoRA, and quant=none / 4bit with no flags. Each is measured
            over --steps on the path the plan picks for its whole run (one epoch: compiled regions), and the
            mission once more as a run of --steps (recorded only).
  llama     Llama-3.1-8B shapes, 4 layers, batch 8, no flags: 8-bit against 4-bit, DoRA against LoRA; then DoRA at
            both with the decoder layers compiled (`trainer.compile=inductor trainer.compile_regions=true`).
  numerics  50 steps from one init: the 8-bit base computed weight-only against a bf16 model holding the same
            weights dequantized (W0 = CB·SCB/127, saved as a model of its own): the largest relative difference of
            the per-step losses.
  startup   `python train.py` with no flags, 400 steps of the embedded shapes, in a fresh process: its whole wall
            time (start-up, loading, recording included; no test stage).
  memory    all 32 layers of Llama-3.1-8B's shapes, r=8 on q/k/v, gradient checkpointing, one row of exactly 2,048
            tokens a step (`long_rows`): peak memory at 4-bit and 8-bit, each a fresh `python train.py`; with
            `memory-speed` in --only too, tokens/s of both at 8 examples, no other flags.

    python scripts/bench_defaults.py --data .gpu/data --tokenizer .gpu/model       # GPU
    python scripts/bench_defaults.py --smoke --only mission numerics                # CPU, tiny shapes: checks it

Writes docs/defaults_speed.json (every run's summary) and the section "## Fast by default" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_speed as bench  # noqa: E402  (the runner every training benchmark shares)
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from finlora.config import ModelConfig, validate  # noqa: E402
from finlora.data import load_task  # noqa: E402
from finlora.models import load_tokenizer, save_random_llama  # noqa: E402
from finlora.plan import plan_step  # noqa: E402
from finlora.prompts import INSTRUCTION_PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Fast by default"
MISSION = ["task=sentiment", "adapter=dora", "adapter.r=8", "quant=8bit", "trainer.batch_size=8"]
BEFORE = ["trainer.capture=false", "quant.int8_compute=llm_int8"]
LAST_SENTENCE = "What is the sentiment of the last sentence? Please choose an answer from {negative/neutral/positive}."


def steps(args: argparse.Namespace, eager: bool) -> str:
    return f"trainer.max_steps={args.eager_steps if eager else args.steps}"


def as_planned(model: Path, args: argparse.Namespace, *extra: str) -> tuple[list[str], str]:
    """The step settings `finlora.plan` picks for the whole run that `extra` names (no max_steps: one epoch), as
    explicit overrides, so that a run measured over fewer steps takes the path the user's run takes; and a label."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=bench.overrides(model, Path(args.work), args, *extra),
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the run's name reads the chosen groups from it
    with open_dict(cfg):
        del cfg["hydra"]
    cfg = validate(cfg)
    rows = len(load_task(cfg.task, cfg.data, cfg.paths.data_dir).train)
    plan = plan_step(cfg, "cpu" if args.smoke else "cuda", rows)
    t = cfg.trainer
    settings = [f"trainer.capture={t.capture}", f"trainer.compile={t.compile.value}",
                f"trainer.compile_regions={t.compile_regions}", f"data.batching={cfg.data.batching.value}"]
    return settings, f"{plan.path}, as planned for its {t.optimizer_steps(rows):,} steps"


def mission(model: Path, args: argparse.Namespace) -> list[dict]:
    """The mission's command and its neighbours with no flags, each measured over `--steps` on the path planned for
    its whole epoch of task=sentiment; then the same command on the path of a run too short to compile for."""
    def no_flags(name: str, *extra: str) -> dict:
        settings, label = as_planned(model, args, *MISSION, *extra)
        return bench.run(f"{name}, no flags ({label})", model, args, *MISSION, *extra, *settings, steps(args, False))

    rows = [bench.run("mission, eager LLM.int8 (before)", model, args, *MISSION, *BEFORE, steps(args, True)),
            no_flags("mission"), no_flags("mission lora", "adapter=lora"),
            *(no_flags(f"quant={q} dora", f"quant={q}") for q in ("none", "4bit"))]
    return rows + [bench.run(f"mission, no flags, a {args.steps}-step run", model, args, *MISSION, steps(args, False))]


def llama(args: argparse.Namespace) -> list[dict]:
    """Llama-3.1-8B shapes, 4 layers, batch 8 of task=sentiment: 8-bit against 4-bit and DoRA against LoRA, on the
    path planned for the whole epoch (compiled regions); then DoRA at both as runs of --steps (recorded only)."""
    model = save_random_llama(Path(args.work) / "llama4", bench.LLAMA_8B, 2 if args.smoke else 4, args.tok,
                              bench._init_device())
    common = ["task=sentiment", "trainer.batch_size=8"]
    rows = []
    for bits in (8, 4):
        for adapter in ("lora", "dora"):
            extra = [*common, f"adapter={adapter}", f"quant={bits}bit"]
            settings, label = as_planned(model, args, *extra)
            rows.append(bench.run(f"llama-8b x4 {bits}bit {adapter}, no flags ({label})", model, args, *extra,
                                  *settings, steps(args, False)))
    return rows + [bench.run(f"llama-8b x4 {bits}bit dora, no flags, a {args.steps}-step run", model, args, *common,
                             "adapter=dora", f"quant={bits}bit", steps(args, False)) for bits in (8, 4)]


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


def long_rows(args: argparse.Namespace, rows: int = 60) -> Path:
    """A FinLoRA JSONL of examples that each fill one 2,048-token row: FPB sentences joined into one long input,
    labelled with the last one's sentiment; the prompt's own truncation cuts the input to `data.max_length`,
    keeping the answer. Sentiment examples are about 50 tokens, so a batch of them fills a row only as a bucket of
    the static widths, never exactly 2,048 tokens. FinLoRA's own format, read without `datasets` (not on the GPU
    image)."""
    fpb = [json.loads(line) for line in (Path(args.data) / "train/fpb_train.jsonl").open()]
    path = Path(args.work) / "long_rows.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            picked = [fpb[(i * 131 + j) % len(fpb)] for j in range(120)]
            context = " ".join(r["context"].split("Input: ", 1)[1].split("\nAnswer", 1)[0] for r in picked)
            f.write(json.dumps({"context": INSTRUCTION_PROMPT.format(LAST_SENTENCE, context),
                                "target": picked[-1]["target"]}) + "\n")
    return path


def memory(args: argparse.Namespace) -> list[dict]:
    """Each row `python train.py` in a fresh process, its peak read from its own summary (`gpu_peak_gib`): in one
    process a run's peak would include what earlier runs' CUDA graphs and compiled code still hold. The peak rows
    train on `long_rows`, one row of exactly `data.max_length` tokens a step. A model folder that an earlier run
    of this section saved is used again (saving 32 layers writes 16 GB). With --breakdown, the 4-bit peak row's run
    once more under scripts/memory_breakdown.py: what that peak is made of."""
    layers = 2 if args.smoke else 32
    folder = Path(args.work) / f"llama{layers}"
    model = folder if (folder / "config.json").is_file() else save_random_llama(
        folder, bench.LLAMA_8B, layers, args.tok, bench._init_device())
    width = 256 if args.smoke else 2048
    long = ["task=fpb", f"task.train.0.file={long_rows(args).resolve()}", "trainer.batch_size=1",
            f"data.max_length={width}", "trainer.max_steps=6"]
    lora = ["adapter=lora", "trainer.gradient_checkpointing=true"]
    rows = [bench.job(f"memory {layers} layers {bits}bit, 1 x {width} tokens", model, args, args.cache, *lora,
                      f"quant={bits}bit", *long) for bits in (4, 8)]
    if args.breakdown:
        out = Path(tempfile.mkdtemp(prefix="breakdown-", dir=args.work))
        subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_breakdown.py"), "--out", args.breakdown, "--",
                        *bench.overrides(model, out, args, *lora, "quant=4bit", *long)], check=False)
    for bits in (4, 8) if "memory-speed" in args.only else ():
        rows.append(bench.job(f"memory {layers} layers {bits}bit, 8 examples, no flags", model, args, args.cache,
                              "task=sentiment", *lora, f"quant={bits}bit", "trainer.batch_size=8",
                              steps(args, False)))
    return rows


FORMS = {"planned": "no flags (the path planned for the epoch)", "short": "no flags, a short run (recorded only)"}


def _form(name: str) -> str:
    return "short" if "-step run" in name else "planned"


def markdown(rows: list[dict], device: str) -> list[str]:
    lines = [SECTION, "", f"`scripts/bench_defaults.py` on {device}: each row one run of finlora's `train()` (or a "
             "fresh `python train.py`), read from its own summary; tokens/s after the first batch of each shape.", "",
             "| run | path | useful tokens/s | × before | step ms | host syncs/step | peak GiB | process s |",
             "|---|---|---|---|---|---|---|---|"]
    before = next((r for r in rows if r["name"].startswith("mission, eager") and "error" not in r), None)
    notes: dict[str, list[str]] = {}  # when, if not in the run the header names: the rows measured then
    for r in rows:
        if "max_rel_loss_diff" in r:
            continue
        if "error" in r or "invalid" in r:
            why = f"failed: {r['error'][:200]}" if "error" in r else f"not valid: {r['invalid']}"
            lines.append(f"| {r['name']} | {why} | | | | | | |")
            continue
        if r.get("measured"):
            notes.setdefault(r["measured"], []).append(r["name"])
        ratio = (f"{r['tokens_per_s'] / before['tokens_per_s']:.1f}" if before and r.get("tokens_per_s")
                 and r["name"].startswith("mission") else "")
        lines.append(f"| {r['name']} | {r.get('step_path', '')} | {bench._num(r.get('tokens_per_s'), ',.0f')} | "
                     f"{ratio} | {bench._num(r.get('step_ms'))} | {bench._num(r.get('host_syncs_per_step'))} | "
                     f"{bench._num(r.get('gpu_peak_gib') or r.get('peak_gib'), '.2f')} | {r.get('process_s', '')} |")
    llama = {r["name"].split(", ", 1)[0][len("llama-8b x4 "):] + ", " + _form(r["name"]): r for r in rows
             if r["name"].startswith("llama-8b x4") and r.get("step_ms") and "invalid" not in r}
    for bits in (8, 4):
        for form in ("planned", "short"):
            lora, dora = llama.get(f"{bits}bit lora, {form}"), llama.get(f"{bits}bit dora, {form}")
            if lora and dora:
                lines += ["", f"Llama-3.1-8B shapes at {bits}-bit, {FORMS[form]}: DoRA/LoRA step "
                          f"{dora['step_ms'] / lora['step_ms']:.3f}."]
    for adapter in ("lora", "dora"):
        for form in ("planned", "short"):
            eight, four = llama.get(f"8bit {adapter}, {form}"), llama.get(f"4bit {adapter}, {form}")
            if eight and four:
                lines += ["", f"Llama-3.1-8B shapes, {adapter}, {FORMS[form]}: 8-bit step / 4-bit step "
                          f"{eight['step_ms'] / four['step_ms']:.3f}."]
    for when, names in notes.items():
        lines += ["", f"Measured {when} (ratios are taken within one run): {'; '.join(names)}."]
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
    parser.add_argument("--breakdown", help="memory: also write what the 4-bit peak is made of to this file (CUDA)")
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
