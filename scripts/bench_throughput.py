"""Training throughput on one GPU, side by side, with the device and library versions.

(a) Useful (non-padding) tokens/s on FinLoRA's `sentiment` mixture with the embedded SmolLM2-135M-Instruct
    (finlora's default adapter: DoRA r=8 on q/k/v), one bare training loop fed by a plain padded DataLoader
    and by finlora's `grouped` and `packed` batching, at finlora's default batch size and a larger one.
(b) finlora's training run (`train()` with every callback, logging and the progress bar) against a bare
    PyTorch + peft loop doing the same work on the same batches in the same order: autocast, forward,
    backward, gradient clipping at 1.0, AdamW, cosine schedule.
(c) Peak GPU memory and tokens/s of a random-init Llama with Llama-3.1-8B layer shapes (vocabulary 128256,
    untied head), saved and loaded through finlora's 4-bit path (NF4, double quantization), LoRA r=8 on
    q/k/v, batch 1 × 2048 tokens, with and without gradient checkpointing; measured at 2 and 4 decoder
    layers and extrapolated linearly to Llama-3.1-8B's 32.
(d) (a) again, same batches, on 2 decoder layers of Llama-3.1-8B's shapes (bf16, the same DoRA adapter),
    a model with far more GPU work per token.

    .venv/bin/python scripts/bench_throughput.py --out docs/benchmarks.md        # GPU, about 3 minutes
    .venv/bin/python scripts/bench_throughput.py --smoke --out /tmp/bench.md     # CPU, tiny shapes

Writes (or replaces) the section "## Training throughput" of `--out`; other sections stay.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lightning as L
import peft
import torch
import transformers
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from finlora.batching import STATS_KEY, BatchStats, model_inputs
from finlora.build import build, placement
from finlora.config import (
    AdapterConfig,
    AdapterMethod,
    Batching,
    Config,
    DataConfig,
    ModelConfig,
    QuantConfig,
    validate,
)
from finlora.data import TaskDataModule, load_task
from finlora.models import SHAPES, load_tokenizer, resolve_source, save_random_llama
from finlora.outputs import replace_section
from finlora.train import train

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training throughput"
LLAMA_8B = SHAPES["llama-3.1-8b"]
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 4096}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class BareLoop:
    """The plain PyTorch + peft training step: what finlora's Lightning step must not be slower than."""

    def __init__(self, model: nn.Module, device: torch.device, amp: bool, total_steps: int) -> None:
        self.model, self.device, self.amp = model, device, amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.sched = get_scheduler("cosine", self.opt, num_warmup_steps=0, num_training_steps=total_steps)
        self.steps = 0

    def step(self, batch: dict[str, Any]) -> None:
        batch = on_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.model(**model_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % 10 == 0:  # a bare loop prints its loss now and then
            loss.item()

    def run(self, batches: Iterable[dict[str, Any]], warmup: int) -> tuple[float, int, int]:
        """(seconds, useful tokens, token slots) of the batches after the first `warmup`."""
        tokens = slots = 0
        start = 0.0
        for i, batch in enumerate(batches):
            if i == warmup:
                sync(self.device)
                start = time.perf_counter()
            self.step(batch)
            if i >= warmup:
                tokens += batch[STATS_KEY].tokens
                slots += batch[STATS_KEY].slots
        sync(self.device)
        return time.perf_counter() - start, tokens, slots


def run_config(args: argparse.Namespace, work: Path, device: torch.device, tokenizer: Any) -> Any:
    """finlora's config for a DoRA r=8 run on the `sentiment` mixture (the embedded model; in --smoke a
    2-layer random Llama with its tokenizer), composed from conf/ as `python train.py ...` would."""
    overrides = [f"output_dir={work / 'run'}", "run_name=bench", "task=sentiment", "quant=none", "adapter=dora",
                 "adapter.r=8", f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}", "logger=csv",
                 "eval.enabled=false", f"trainer.max_steps={args.warmup + args.steps}",
                 f"trainer.batch_size={args.batch_sizes[0]}", f"paths.data_dir={args.data_dir}"]
    if args.smoke:
        save_random_llama(work / "tiny", TINY | {"vocab_size": len(tokenizer)}, 2, tokenizer, device)
        overrides.append(f"model.name_or_path={work / 'tiny'}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def on_model(cfg: Config, folder: Path, **sections: Any) -> nn.Module:
    """The run's config on the model saved in `folder`, with `sections` replaced, built by finlora's build step."""
    cfg = replace(cfg, model=ModelConfig(name_or_path=str(folder)), **sections)
    return build(cfg, placement(cfg)).model.train()


def loaders(datamodule: TaskDataModule, batch_size: int) -> dict[Batching, DataLoader]:
    """The training loader of each batching mode over the same encoded examples and shuffling seed."""
    out = {}
    for batching in Batching:
        datamodule.batching, datamodule.batch_size = batching, batch_size
        out[batching] = datamodule.train_dataloader()
    return out


def first(loader: DataLoader, n: int) -> list[dict[str, Any]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def bench_batching(datamodule: TaskDataModule, model: nn.Module, args: argparse.Namespace,
                   device: torch.device, label: str = "(a)") -> list[dict]:
    """(a), (d): one bare loop, fed by each batching mode in turn, on the first batches of the same epoch."""
    rows = []
    for batch_size in args.batch_sizes:
        loop = BareLoop(model, device, args.amp, total_steps=10_000)
        for batching, loader in loaders(datamodule, batch_size).items():
            batches = first(loader, args.warmup + args.steps)  # collated up front: the loop alone is timed
            loop.run(batches, len(batches))  # untimed pass: every shape these batches hold is compiled/tuned once
            seconds, tokens, slots = loop.run(batches, args.warmup)
            rows.append({"batch_size": batch_size, "batching": batching.value, "tokens_per_s": tokens / seconds,
                         "padding": 1 - tokens / slots, "step_ms": 1e3 * seconds / args.steps})
            print(f"{label} batch {batch_size:3d} {batching.value:>8}: {tokens / seconds:10,.0f} useful tokens/s, "
                  f"padding {1 - tokens / slots:.1%}, {1e3 * seconds / args.steps:.1f} ms/step", flush=True)
        del loop
        free()
    return rows


def bench_framework(datamodule: TaskDataModule, model: nn.Module, dict_cfg: Any, args: argparse.Namespace,
                    device: torch.device) -> dict:
    """(b): finlora's whole training run (`train()`: every callback, logging, progress bar) against the bare
    loop over the same batches in the same order, both timed from the end of the first batch on."""
    summary = train(dict_cfg)
    datamodule.batching, datamodule.batch_size = DataConfig().batching, args.batch_sizes[0]
    batches = itertools.islice(datamodule.train_dataloader(), args.warmup + args.steps)
    seconds, tokens, _ = BareLoop(model, device, args.amp, args.warmup + args.steps).run(batches, 1)
    bare = 1e3 * seconds / (args.warmup + args.steps - 1)
    light = bare * (tokens / seconds) / summary["tokens_per_s"]
    print(f"(b) bare {bare:.2f} ms/step, finlora {light:.2f} ms/step", flush=True)
    return {"bare_ms": bare, "lightning_ms": light, "ratio": light / bare, "batch_size": args.batch_sizes[0],
            "batching": DataConfig().batching.value, "steps": args.warmup + args.steps - 1}


def gpu_bound_model(cfg: Config, tokenizer: Any, args: argparse.Namespace, device: torch.device, folder: Path
                    ) -> nn.Module:
    """(d)'s model: 2 decoder layers of Llama-3.1-8B's shapes (unquantized, the run's adapter): far more GPU
    work per token than the embedded model, so padding costs more of the step."""
    shape = TINY if args.smoke else LLAMA_8B
    shape = shape | {"vocab_size": max(len(tokenizer), shape["vocab_size"])}  # every token id of the batches fits
    save_random_llama(folder, shape, 2, tokenizer, device)
    free()
    return on_model(cfg, folder)


def bench_llama(cfg: Config, tokenizer: Any, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """(c): finlora's 4-bit load + LoRA r=8, one batch of `seq` tokens, at 4 and then 2 decoder layers."""
    rows = []
    shape = TINY if args.smoke else LLAMA_8B
    with tempfile.TemporaryDirectory() as tmp:
        save_random_llama(Path(tmp), shape, max(args.llama_layers), tokenizer, device)
        free()
        for checkpointing in (False, True):
            model = on_model(cfg, Path(tmp), quant=QuantConfig(bits=4),
                             adapter=AdapterConfig(method=AdapterMethod.lora, r=8, alpha=16, dropout=0.0),
                             trainer=replace(cfg.trainer, gradient_checkpointing=checkpointing))
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, shape["vocab_size"], (args.llama_batch, args.seq), generator=gen)
            batch = {"input_ids": ids, "labels": ids, STATS_KEY: BatchStats(args.llama_batch, ids.numel(), ids.numel())}
            for layers in sorted(args.llama_layers, reverse=True):
                del model.base_model.model.model.layers[layers:]
                free()
                loop = BareLoop(model, device, args.amp, total_steps=100)
                seconds = min(loop.run([batch] * (args.warmup + args.llama_steps), args.warmup)[0] for _ in range(2))
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                step = seconds / args.llama_steps
                rows.append({"layers": layers, "checkpointing": checkpointing, "step_ms": 1e3 * step, "peak_gib": peak,
                             "tokens_per_s": args.llama_batch * args.seq / step})
                print(f"(c) {layers} layers, checkpointing {checkpointing}: {1e3 * step:.1f} ms/step, "
                      f"{peak:.2f} GiB peak", flush=True)
                del loop
            del model
            free()
    return rows


def extrapolate(rows: list[dict], target: int) -> list[dict]:
    """Step time and peak memory as a + b·layers through the two layer counts measured, at `target` layers."""
    out = []
    for checkpointing in (False, True):
        lo, hi = sorted((r for r in rows if r["checkpointing"] == checkpointing), key=lambda r: r["layers"])[:2]
        at = {}
        for key in ("step_ms", "peak_gib"):
            slope = (hi[key] - lo[key]) / (hi["layers"] - lo["layers"])
            at[key] = lo[key] + slope * (target - lo["layers"])
        out.append({"layers": target, "checkpointing": checkpointing, **at,
                    "tokens_per_s": hi["tokens_per_s"] * hi["step_ms"] / at["step_ms"]})
    return out


def versions(device: torch.device) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return (f"{name}; torch {torch.__version__}, lightning {L.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, bitsandbytes {bnb.__version__}")


def batching_rows(rows: list[dict]) -> list[str]:
    """A markdown table of batching rows, each with its useful tokens/s against `padded` at its batch size."""
    lines = ["| batch size | batching | useful tokens/s | × padded | padding | ms/step |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["batch_size"] == r["batch_size"] and x["batching"] == "padded")
        lines.append(f"| {r['batch_size']} | {r['batching']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['padding']:.1%} | {r['step_ms']:.1f} |")
    return lines


def markdown(a: list[dict], b: dict, c: list[dict], c32: list[dict], d: list[dict], args: argparse.Namespace,
             device: torch.device) -> str:
    precision = "bf16-mixed" if args.amp else "32-true"
    model = "a 2-layer random Llama (smoke test)" if args.smoke else "embedded SmolLM2-135M-Instruct"
    lines = [SECTION, "", f"`scripts/bench_throughput.py{' --smoke' if args.smoke else ''}` on {versions(device)}; "
             f"{precision}; {args.steps} timed steps after {args.warmup} warm-up steps.", "",
             f"**(a) Batching.** FinLoRA's `sentiment` mixture, {model}, finlora's default "
             "adapter (DoRA r=8 on q/k/v, finlora implementation), one bare training loop (AdamW) fed the first "
             "batches of the same shuffled epoch by a plain padded DataLoader and by finlora's batching, each "
             "timed on a second pass over its batches (the first compiles and tunes every shape once); "
             "useful tokens = non-padding tokens.", "", *batching_rows(a)]
    lines += ["", f"**(b) Framework overhead.** finlora's `train()` (Lightning, every callback, logging every 10 "
              f"steps) for {b['steps'] + 1} steps against the bare loop (same model and adapter, precision, clipping, "
              f"AdamW, cosine schedule) over the same `{b['batching']}` batches of {b['batch_size']} examples in "
              f"the same order, collated as they go; both timed over the last {b['steps']} steps "
              "(finlora's figure is the useful tokens/s its run summary reports).", "",
              "| loop | ms/step | × bare |", "|---|---|---|",
              f"| bare PyTorch + peft | {b['bare_ms']:.2f} | 1.00 |",
              f"| finlora `train()` | {b['lightning_ms']:.2f} | {b['ratio']:.3f} |",
              "", f"**(c) {'Tiny shapes (smoke test)' if args.smoke else 'Llama-3.1-8B layer shapes'}, 4-bit.** "
              "Random init saved and loaded through finlora (NF4, double quantization, LoRA r=8 on q/k/v, "
              f"`prepare_model_for_kbit_training`), batch {args.llama_batch} × {args.seq} tokens, every token in the "
              f"loss; peak = `torch.cuda.max_memory_allocated`. The {max(args.llama_layers)}-layer model is measured,"
              " then cut to fewer layers and measured again; the 32-layer rows extrapolate linearly from those "
              "two (embeddings, head and logits are the constant, each layer adds the same).", "",
              "| decoder layers | gradient checkpointing | ms/step | tokens/s | peak GiB |", "|---|---|---|---|---|"]
    for r in c + c32:
        kind = " (extrapolated)" if r in c32 else ""
        lines.append(f"| {r['layers']}{kind} | {'yes' if r['checkpointing'] else 'no'} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} |")
    lines += ["", f"**(d) The same batches on a heavier model.** As (a), on a random-init model of 2 decoder layers "
              f"with {'tiny (smoke test)' if args.smoke else 'Llama-3.1-8B'} shapes (unquantized, the same DoRA "
              "adapter).", "",
              *batching_rows(d)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("FINLORA_DATA_DIR", ROOT.parent / "shared" / "data" / "finlora")))
    p.add_argument("--cache-dir", default=os.environ.get("FINLORA_CACHE_DIR", "~/.cache/finlora"))
    p.add_argument("--smoke", action="store_true", help="CPU-sized: few steps, tiny Llama shapes")
    args = p.parse_args()
    if not (args.data_dir / "train").is_dir():
        p.error(f"no FinLoRA data in {args.data_dir} (set FINLORA_DATA_DIR or --data-dir)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.amp = device.type == "cuda"
    smoke = {"batch_sizes": [8, 16], "warmup": 1, "steps": 3, "seq": 128, "llama_steps": 2}
    full = {"batch_sizes": [8, 32], "warmup": 5, "steps": 40, "seq": 2048, "llama_steps": 5}
    vars(args).update(smoke if args.smoke else full, llama_layers=[2, 4], llama_batch=1)

    with tempfile.TemporaryDirectory() as work:
        tokenizer = load_tokenizer(resolve_source(ModelConfig(), args.cache_dir), ModelConfig())
        dict_cfg = run_config(args, Path(work), device, tokenizer)
        cfg = validate(dict_cfg)
        tokenizer, model = build(cfg, placement(cfg))
        model.train()
        datamodule = TaskDataModule(load_task(cfg.task, cfg.data, args.data_dir), tokenizer, cfg.data,
                                    cfg.trainer.batch_size, cfg.seed)
        a = bench_batching(datamodule, model, args, device)
        b = bench_framework(datamodule, model, dict_cfg, args, device)
        del model
        free()
        model = gpu_bound_model(cfg, tokenizer, args, device, Path(work) / "gpu-bound")
        d = bench_batching(datamodule, model, args, device, label="(d)")
        del model
        free()
        c = bench_llama(cfg, tokenizer, args, device)
    c32 = extrapolate(c, 32)
    section = markdown(a, b, sorted(c, key=lambda r: (r["checkpointing"], r["layers"])), c32, d, args, device)
    replace_section(args.out, section)
    if args.json:
        args.json.write_text(json.dumps({"batching": a, "framework": b, "llama": c, "llama_32": c32,
                                         "batching_gpu_bound": d}, indent=1))
    print(section)


if __name__ == "__main__":
    main()
