"""Logits only where the loss is, against the model's own loss, on one GPU, side by side.

A random-init Llama with Llama-3.1-8B layer shapes (vocabulary 128,256, untied head; `--layers` decoder
layers) loaded through finlora's build step (bf16 base, LoRA r=8 on q/k/v), trained on FinLoRA-like
batches: `--batch` FPB examples packed as finlora packs them. Each mode runs the same batches with fused
AdamW: the model's own forward (`model(**inputs).loss`, logits at every position) and finlora's
`answer_loss` (LM head on the answer positions only). Peak GPU memory and step time after warm-up.

    python scripts/bench_loss.py --tokenizer DIR --data-dir DIR --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from finlora.batching import model_inputs, pack
from finlora.build import build, placement
from finlora.config import AdapterConfig, AdapterMethod, Config, ModelConfig, TrainerConfig
from finlora.data import read_jsonl
from finlora.loss import answer_loss
from finlora.models import SHAPES, save_random_llama
from finlora.outputs import replace_section
from finlora.prompts import encode_example

LLAMA_8B = SHAPES["llama-3.1-8b"]


def run(model: torch.nn.Module, batches: list[dict], loss_fn, warmup: int) -> tuple[float, float]:
    """(ms per step, peak GiB) over the batches after `warmup`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    for i, batch in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / (len(batches) - warmup), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = read_jsonl(args.data_dir / "train" / "fpb_train.jsonl")[: args.batch * args.steps]
    encoded = [encode_example(tokenizer, r, 256) for r in rows]
    batches = [{k: v.cuda() for k, v in pack(encoded[i:i + args.batch], tokenizer.pad_token_id, 256).items()}
               for i in range(0, len(encoded), args.batch)]
    tokens = sum(b["input_ids"].numel() for b in batches) / len(batches)
    labels = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_random_llama(Path(tmp), LLAMA_8B, args.layers, tokenizer, torch.device("cuda"))
        cfg = Config(model=ModelConfig(name_or_path=tmp), trainer=TrainerConfig(accelerator="gpu",
                                                                                 precision="bf16-mixed"),
                     adapter=AdapterConfig(method=AdapterMethod.lora, r=8, dropout=0.0))
        for mode in ("model's own loss (all logits)", "answer_loss (label positions only)"):
            gc.collect()
            torch.cuda.empty_cache()
            model = build(cfg, placement(cfg)).model.train()
            fn = ((lambda b, m=model: m(**model_inputs(b)).loss) if mode.startswith("model")
                  else (lambda b, m=model: answer_loss(m, b)))
            results[mode] = run(model, batches, fn, args.warmup)
            print(mode, results[mode], flush=True)
            del model, fn
    own = results["model's own loss (all logits)"]
    lines = ["## Logits only where the loss is", "",
             f"`python scripts/bench_loss.py`: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}. Llama-3.1-8B layer shapes, {args.layers} decoder layers, "
             f"vocabulary 128,256, bf16 base, LoRA r=8 on q/k/v, fused AdamW; {args.batch} FPB examples a step, "
             f"packed ({tokens:.0f} token slots, {labels:.0f} label tokens a step on average); "
             f"{args.steps - args.warmup} timed steps after {args.warmup}.", "",
             "| loss | ms / step | peak GiB | × own (time, memory) |", "|---|---|---|---|"]
    lines += [f"| {mode} | {ms:.1f} | {gib:.2f} | {ms / own[0]:.2f}, {gib / own[1]:.2f} |"
              for mode, (ms, gib) in results.items()]
    section = "\n".join(lines) + "\n"
    print(section)
    replace_section(args.out, section)


if __name__ == "__main__":
    main()
