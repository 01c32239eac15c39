"""A saved adapter that stands on its own: `adapter_config.json` names its base portably (`models.portable_name`),
and `README.md` is a model card (task, data, settings, test metrics, how to load and merge) in place of peft's
empty template."""

from __future__ import annotations

import json
from pathlib import Path

from finlora.config import AdapterMethod, Config
from finlora.outputs import write_json, write_text

PEFT_CONFIG = "adapter_config.json"
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA"}


def set_base_name(folder: Path, name: str) -> None:
    """Point a saved peft adapter at its base by `name` (a hub id where one is known), not by the training
    machine's path: `AutoPeftModelForCausalLM.from_pretrained(folder)` then works wherever `name` resolves."""
    path = folder / PEFT_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    write_json(path, config)


def write_card(folder: Path, cfg: Config, base: dict, summary: dict) -> None:
    """`README.md` in the adapter (or model) folder; written at save time and again with the test metrics."""
    full = cfg.adapter.method is AdapterMethod.none
    a, t, hub = cfg.adapter, cfg.trainer, base["hub_id"]
    kind = "full fine-tune" if full else f"{METHOD_NAMES[a.method.value]} adapter"
    train_files = ", ".join(f"`{s.origin}`" + (f" ×{s.repeat}" if s.repeat > 1 else "") for s in cfg.task.train)
    prompt_note = ("Prompts are the tokenizer's chat template over each row's messages, the assistant's turn "
                   "opened: prompt the model the same way (`apply_chat_template(…, add_generation_prompt=True)`)."
                   if cfg.task.prompt(cfg.task.train) == "chat_template" else
                   "Prompts are FinLoRA's raw `context` strings, without a chat template: give the model the same form "
                   "of prompt, and it answers with the label or value.")
    tests = {k: v for k, v in summary.items() if k.startswith("test/") and isinstance(v, int | float)}
    results = ["| metric | value |", "|---|---|",
               *(f"| {k} | {_fmt(summary.get(k))} |" for k in ("final_train_loss", "final_val_loss", "steps")),
               *(f"| {k} | {_fmt(v)} |" for k, v in sorted(tests.items()))]
    if cfg.eval.enabled and not tests:
        results.append("\nTest metrics are added here when the run's test stage ends.")
    embedded = (f"\nTrained on the embedded GGUF (Q4_1) copy of `{hub}`, dequantized to float32: close to the hub's "
                "weights, not equal to them; `base_model.json` holds a hash of the weights it was trained on.\n"
                if cfg.model.embedded else "")
    quant = f"{cfg.quant.bits}-bit (bitsandbytes)" if cfg.quant.bits else "not quantized"
    settings = {"adapter": "full fine-tuning" if full else
                f"{a.method.value}, r={a.r}, alpha={a.alpha:g}, dropout={a.dropout:g}, rslora={a.rslora}, "
                f"targets={list(a.target_modules)}",
                "base weights": quant, "optimizer": f"AdamW, lr={t.lr:g}, weight_decay={t.weight_decay:g}, "
                f"{t.scheduler.value} schedule, warmup {t.warmup_steps} steps, clip {t.grad_clip:g}",
                "batch": f"{t.batch_size} × {t.grad_accum} accumulation, {cfg.data.batching.value} batches, "
                f"max_length {cfg.data.max_length}", "seed": str(cfg.seed)}
    load = ("""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```""" if full else f"""```python
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

# the base named in adapter_config.json ({hub}):
model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")
# or a copy of the base of your own:
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("<base folder>"), "<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")

merged = model.merge_and_unload()  # a plain model: the adapter folded into the base weights
merged.save_pretrained("merged")
```

With finlora: `python eval.py adapter_path=<this folder> task={cfg.task.name}` (add `merge=true` to merge first).""")
    tags = "\n".join(f"- {tag}" for tag in ("finlora", "finance", cfg.task.name, *([] if full else [a.method.value])))
    text = f"""---
base_model: {hub}
library_name: {"transformers" if full else "peft"}
tags:
{tags}
---

# {cfg.run_name}

A {kind} for `{hub}` on FinLoRA's `{cfg.task.name}` task, trained with finlora.
{embedded}
## Data

Training data: {train_files}; {cfg.data.val_size} examples held out for validation (seed {cfg.data.seed}).
{prompt_note}

## Settings

| setting | value |
|---|---|
{chr(10).join(f"| {k} | {v} |" for k, v in settings.items())}

The run's whole config is `config.yaml` in its run folder (the folder above this one).

## Results

{chr(10).join(results)}

## Load and merge

{load}
"""
    write_text(folder / "README.md", text)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    whole = float(value).is_integer() and float(value) > 1  # a count (steps, rows), not a score or a loss
    return str(int(value)) if whole else f"{value:.4f}"
