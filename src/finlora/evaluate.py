"""Generation on a task's test sets and FinLoRA's metrics, for a base model, an adapter or a merged model.

Prompts come from `finlora.prompts.encode_prompt`, the function training uses, so an evaluation prompt is
always the training prompt minus the answer. Generation is greedy and batched with left padding; the
examples are sorted by length so a batch wastes little on padding, and the answers are put back in
file order. `evaluate(cfg)` is what `eval.py` runs; `evaluate_sets` is also training's test stage.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from transformers import PreTrainedTokenizerBase

from finlora.batching import pad_left
from finlora.build import build, placement
from finlora.config import EvalConfig, EvalSample, EvalSettings, TaskKind, TestSet, validate
from finlora.data import load_test_sets, proportional
from finlora.loggers import build_loggers, finish, log_predictions, log_summary
from finlora.metrics import extract_answer, score
from finlora.models import compute_dtype
from finlora.outputs import write_json, write_jsonl
from finlora.prompts import encode_prompt

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict], max_new_tokens: int,
             batch_size: int, precision: str = "32-true", description: str = "generating") -> list[str]:
    """Greedy answers for `records`, in their order, under the same autocast as training used."""
    prompts = [encode_prompt(tokenizer, r) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=compute_dtype(precision), enabled=precision.endswith("mixed"))
    answers: list[str] = [""] * len(prompts)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(description, total=len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = pad_left([prompts[i] for i in idx], pad)
            width = batch["input_ids"].shape[1]
            with autocast:
                out = model.generate(**{k: v.to(device) for k, v in batch.items()}, do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id, use_cache=True)
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            progress.advance(bar, len(idx))
    model.train(was_training)
    return answers


def evaluate_set(model: nn.Module, tokenizer: PreTrainedTokenizerBase, test_set: TestSet, records: list[dict],
                 rows: list[int], conditions: dict, out_dir: Path) -> tuple[dict[str, float], list[dict]]:
    """Generate for the test set's `rows`, score, and write `<out_dir>/<name>_predictions.jsonl` and
    `<name>_metrics.json` (the metrics, a 95% interval for accuracy, the rows scored and the `conditions` that
    can change a score)."""
    scored = [records[i] for i in rows]
    generations = generate(model, tokenizer, scored, test_set.max_new_tokens, conditions["batch_size"],
                           conditions["precision"], f"eval {test_set.name}")
    labels = test_set.labels or None
    metrics = score(test_set.kind, generations, [str(r["target"]) for r in scored], labels)
    predictions = [{"index": i, "target": str(r["target"]), "generated": g,
                    "predicted": extract_answer(test_set.kind, g, labels)}
                   for i, r, g in zip(rows, scored, generations, strict=True)]
    interval = {"accuracy_ci95": wilson_interval(metrics["accuracy"], len(rows))} if "accuracy" in metrics else {}
    write_jsonl(out_dir / f"{test_set.name}_predictions.jsonl", predictions)
    write_json(out_dir / f"{test_set.name}_metrics.json",
               metrics | interval | {"conditions": conditions, "rows": rows if len(rows) < len(records) else "all"})
    return metrics, predictions


def pick_rows(records: list[dict], test_set: TestSet, settings: EvalSettings) -> list[int]:
    """The rows of a test set to score, in file order: all of them, or `eval.limit` drawn as `eval.sample`
    says, seeded by `eval.seed` and the set's name (FinLoRA's files are grouped by label or source, so the
    first rows are rarely a fair sample)."""
    n, limit = len(records), settings.limit
    if not limit or limit >= n:
        return list(range(n))
    if settings.sample is EvalSample.first:
        return list(range(limit))
    rng = random.Random(f"{settings.seed}:{test_set.name}")
    if settings.sample is EvalSample.stratified and test_set.kind is TaskKind.label:
        strata: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            strata.setdefault(str(record["target"]).strip().lower(), []).append(i)
        groups = [strata[k] for k in sorted(strata)]
        chosen = [i for group, k in zip(groups, proportional([len(g) for g in groups], limit), strict=True)
                  for i in rng.sample(group, k)]
    else:
        chosen = rng.sample(range(n), limit)
    return sorted(chosen)


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a proportion p measured on n items (sound near 0 and 1, unlike p ± 2σ)."""
    if n == 0:
        return [0.0, 1.0]
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, center - half), 6), round(min(1.0, center + half), 6)]


def evaluate_sets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, test_sets: list[tuple[TestSet, list[dict]]],
                  settings: EvalSettings, precision: str, quant_bits: int | None, out_dir: Path,
                  loggers: list[Logger]) -> dict[str, float]:
    """Every test set of a task; metrics flattened as `test/<set>/<metric>` and logged, predictions as tables."""
    flat: dict[str, float] = {}
    if quant_bits == 8 and settings.batch_size > 1:
        log.warning("8-bit base: LLM.int8 picks outlier columns per batch, so scores depend on eval.batch_size=%d "
                    "and on which prompts share a batch; eval.batch_size=1 scores each prompt alone (README)",
                    settings.batch_size)
    conditions = {"batch_size": settings.batch_size, "quant_bits": quant_bits, "precision": precision,
                  "limit": settings.limit, "sample": settings.sample.value, "seed": settings.seed}
    for test_set, records in test_sets:
        rows = pick_rows(records, test_set, settings)
        metrics, predictions = evaluate_set(model, tokenizer, test_set, records, rows, conditions, out_dir)
        flat |= {f"test/{test_set.name}/{k}": v for k, v in metrics.items()}
        log_predictions(loggers, f"test/{test_set.name}/predictions", predictions)
    for lg in loggers:
        lg.log_metrics(flat)
    return flat


def evaluate(dict_cfg: DictConfig) -> dict[str, float]:
    """`eval.py`: load the base model (and adapter, merged or not), evaluate, write `<output_dir>/eval/`."""
    cfg = validate(dict_cfg, EvalConfig)
    where = placement(cfg)
    test_sets = load_test_sets(cfg.task, cfg.paths.data_dir)
    out_dir = Path(cfg.output_dir)
    tokenizer, model = build(cfg, where)
    loggers = build_loggers(cfg.logger, out_dir, cfg.run_name, OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        metrics = evaluate_sets(model, tokenizer, test_sets, cfg.eval, where.precision, cfg.quant.bits,
                                out_dir / "eval", loggers)
        log_summary(loggers, metrics)
        print_metrics(metrics)
        return metrics
    finally:
        finish(loggers)


def print_metrics(metrics: dict[str, float]) -> None:
    table = Table(title="test metrics")
    table.add_column("test set")
    names = sorted({k.split("/")[2] for k in metrics})
    for name in names:
        table.add_column(name, justify="right")
    for test_set in sorted({k.split("/")[1] for k in metrics}):
        table.add_row(test_set, *[_fmt(metrics.get(f"test/{test_set}/{n}")) for n in names])
    Console().print(table)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value)}" if float(value).is_integer() and value > 1 else f"{value:.4f}"
