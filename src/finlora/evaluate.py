"""Generation on a task's test sets and FinLoRA's metrics, for a base model, an adapter or a merged model.

Prompts come from `finlora.prompts.encode_prompt`, the function training uses, so an evaluation prompt is always the
training prompt minus the answer. Generation first resolves one `generation.GenerationPlan` (`plan_generation`: the
facts of the model and the machine, then pure resolution), then runs one loop that reads it (`generate_planned`):
greedy, batched with left padding, the prompts sorted by length so a batch wastes little on padding, the answers put
back in file order. `evaluate(cfg)` is what `eval.py` runs; `evaluate_sets` is also training's test stage, and
`generate` scores during training (`callbacks.TaskScore`) and answers for `predict.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import PreTrainedTokenizerBase

from finlora import adapter_steps
from finlora.attention import grouped_decoding
from finlora.batching import pad_left
from finlora.build import build_model, build_tokenizer, placement, quant_as_trained
from finlora.compat.torch import dynamo_error
from finlora.config import (
    DecodeCompile,
    DecodeSettings,
    EvalConfig,
    EvalSettings,
    FourBitEval,
    Int8Cpu,
    TestSet,
    TrainPrompt,
    validate,
)
from finlora.data import load_test_sets
from finlora.errors import ConfigError
from finlora.generation import (
    AUTO_CAP,
    CACHE_STEP,
    CPU_BATCH,
    DECODE_COMPILE,
    DENSE_SHARE,
    MEMORY_SHARE,
    MIN_PREFIX,
    GenerationPlan,
    ModelFacts,
    TaskCache,
    auto_rows,
    behind_prefix,
    cache_argument,
    even_batches,
    four_bit_mode,
    prefix_cache,
    quant_modes,
    resolve_plan,
    shared_prefix,
)
from finlora.loggers import build_loggers, finish, log_predictions, log_summary
from finlora.metric_names import test_predictions, test_score
from finlora.prompts import build_prompt, encode_prompt
from finlora.quant.generation import (
    _dequantized_4bit,
    cpu_int8_mode,
    dense_4bit,
    dense_bytes,
    four_bit_as_dense,
    four_bit_choice,
    four_bit_layers,
    four_bit_problem,
    free_memory,
    int8_as_bf16,
    int8_dequantized,
    int8_layers,
    with_plain_layers,
)
from finlora.quant.int8 import WeightOnlyLinear8bit
from finlora.scoring import pick_rows, print_metrics, score_set, wilson_interval

log = logging.getLogger(__name__)

__all__ = [  # what other modules, tests and scripts import from here, wherever it now lives
    "AUTO_CAP", "CACHE_STEP", "CPU_BATCH", "DECODE_COMPILE", "DENSE_SHARE", "MEMORY_SHARE", "MIN_PREFIX", "TaskCache",
    "_dequantized_4bit", "auto_batch_size", "behind_prefix", "cache_argument", "compiles_decoding", "cpu_int8_mode",
    "decoding", "dense_bytes", "encode_prompt", "evaluate", "evaluate_sets", "even_batches", "four_bit_as_dense",
    "four_bit_choice", "four_bit_layers", "four_bit_mode", "four_bit_problem", "free_memory", "generate",
    "generate_planned", "generate_sets", "int8_as_bf16", "int8_dequantized", "pick_rows", "plan_generation",
    "prefix_cache", "print_metrics", "score_set", "shared_prefix", "wilson_interval", "with_plain_layers"]

COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
Sets = list[tuple[str, list[dict], int]]  # each set: a progress label, its records, its `max_new_tokens`


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict], max_new_tokens: int,
             batch_size: int | str = "auto", precision: str = "32-true", description: str = "generating",
             **options) -> list[str]:
    """Greedy answers for `records`, in their order: `generate_sets` for one set."""
    return list(generate_sets(model, tokenizer, [(description, records, max_new_tokens)], batch_size, precision,
                              **options))[0]


@torch.no_grad()
def generate_sets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sets: Sets, batch_size: int | str = "auto",
                  precision: str = "32-true", *, static_cache: bool = True,
                  decode_compile: DecodeCompile = DecodeCompile.recorded, int8_cpu: Int8Cpu = Int8Cpu.bf16,
                  four_bit: FourBitEval = FourBitEval.auto, share_prefix: bool = True,
                  prompt: TrainPrompt = TrainPrompt.plain) -> Iterator[list[str]]:
    """Greedy answers for each set, yielded set by set, each in its records' order, under the same autocast as
    training used: one plan for all the sets (`plan_generation`; the keyword arguments are `DecodeSettings`'), then
    the loop that reads it (`generate_planned`). On CUDA with `static_cache` every batch of every set has one shape,
    so the decode step compiles once for the task."""
    settings = DecodeSettings(batch_size=batch_size, static_cache=static_cache, decode_compile=decode_compile,
                              int8_cpu=int8_cpu, four_bit=four_bit, share_prefix=share_prefix, prompt=prompt)
    encoded = encode_sets(tokenizer, sets, prompt)
    if not any(encoded):
        yield from ([] for _ in sets)
        return
    model, plan = plan_generation(model, tokenizer, encoded, [new for *_, new in sets], settings, precision)
    yield from generate_planned(model, tokenizer, sets, encoded, plan)


def encode_sets(tokenizer: PreTrainedTokenizerBase, sets: Sets, prompt: TrainPrompt) -> list[list[list[int]]]:
    """Each set's prompts as token ids, built as training builds them."""
    return [[encode_prompt(tokenizer, r, prompt) for r in records] for _, records, _ in sets]


def decoding(settings: DecodeSettings, precision: str) -> dict:
    """`generate_sets`' arguments after its sets, as `settings` and the precision say: how `predict.py` generates."""
    return {"batch_size": settings.batch_size, "precision": precision, "static_cache": settings.static_cache,
            "decode_compile": settings.decode_compile, "int8_cpu": settings.int8_cpu, "four_bit": settings.four_bit,
            "share_prefix": settings.share_prefix, "prompt": settings.prompt}


def compiles_decoding(device: torch.device) -> bool:
    """Whether transformers compiles the decode step there (CUDA); elsewhere a static cache buys nothing."""
    return device.type == "cuda"


@torch.no_grad()
def plan_generation(model: nn.Module, tokenizer: PreTrainedTokenizerBase, encoded: list[list[list[int]]],
                    max_new_tokens: list[int], settings: DecodeSettings, precision: str
                    ) -> tuple[nn.Module, GenerationPlan]:
    """The model as it generates and the plan its loop reads, for the sets' `encoded` prompts: how a quantized base
    computes is decided first (`quant_modes`, from the model's layers and the free memory), the copies it asks for
    are made (when there is anything to generate), then the rest is resolved from the copy (`resolve_plan`; `auto`
    rows are sized after the copy takes its memory)."""
    device = next(p.device for p in model.parameters())
    cpu = device.type == "cpu"
    native_bf16 = not (cpu and settings.int8_cpu is Int8Cpu.bf16) or cpu_int8_mode(Int8Cpu.bf16) is Int8Cpu.bf16
    layers = four_bit_layers(model)
    modes = quant_modes(device.type, settings.int8_cpu, settings.four_bit, bf16_matmuls=native_bf16,
                        four_bit_bytes=dense_bytes(layers) if layers else None,
                        free_bytes=free_memory(device) if layers else 0)
    if modes.four_bit_why and settings.four_bit is FourBitEval.auto:
        log.info("%s", modes.four_bit_why)
    generating = any(encoded)
    if generating and modes.int8_cpu is Int8Cpu.bf16:
        model = int8_as_bf16(model)
    if generating and modes.four_bit is FourBitEval.dense:
        model = dense_4bit(model)
    sized = settings.batch_size == "auto" and device.type == "cuda"  # what `auto_rows` reads
    facts = ModelFacts(device=device, compiles_decoding=compiles_decoding(device), int8_layers=int8_layers(model),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       free_bytes=free_memory(device) if sized else None,
                       text_config=model.config.get_text_config() if sized else None,
                       dtype=model.dtype if sized else None)
    lengths = [([len(p) for p in prompts], new) for prompts, new in zip(encoded, max_new_tokens, strict=True)]
    return model, resolve_plan(settings, precision, modes, facts, lengths)


@torch.no_grad()
def generate_planned(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sets: Sets,
                     encoded: list[list[list[int]]], plan: GenerationPlan) -> Iterator[list[str]]:
    """The decoding loop: each set's answers as `plan` says, yielded set by set. The plan changes in two places,
    each for the rest of the task: a decode step that does not compile goes on eagerly with a growing cache
    (`GenerationPlan.eager`), and `auto` rows out of memory go on with half as many (`GenerationPlan.halved`)."""
    if not any(encoded):
        yield from ([] for _ in sets)
        return
    if plan.static:  # what the compiled decode step reads but must not build (finlora's DoRA: frozen norms)
        adapter_steps.before_decode_compile(model)
    kv: TaskCache | None = None
    was_training = model.training
    model.eval()
    int8_dequantized(model, plan.int8_dequantized)
    try:
        for (description, _, max_new_tokens), prompts in zip(sets, encoded, strict=True):
            answers, plan, kv = _answer_set(model, tokenizer, prompts, description, max_new_tokens, plan, kv)
            yield answers
    finally:
        model.train(was_training)


def _answer_set(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], description: str,
                max_new_tokens: int, plan: GenerationPlan, kv: TaskCache | None
                ) -> tuple[list[str], GenerationPlan, TaskCache | None]:
    """One set's answers, and the plan and static cache the next set goes on with."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    shared = shared_prefix(prompts) if prompts and plan.shares_prefix else 0
    shared = shared if shared >= MIN_PREFIX else 0
    prefix = None
    if shared:
        prefix_ids = torch.tensor([prompts[0][:shared]], device=plan.device)
        with plan.autocast():
            prefix = (prefix_ids, *prefix_cache(model, prefix_ids))
    answers: list[str] = [""] * len(prompts)
    with Progress(*COLUMNS, transient=True) as progress:
        bar = progress.add_task(description, total=len(prompts))
        start = 0
        while start < len(order):
            idx = order[start:start + plan.rows]
            batch, kv = _batch(model, [prompts[i][shared:] for i in idx], prefix, plan, kv)
            try:
                with plan.autocast(), grouped_decoding(model, plan.static):
                    out = model.generate(**batch, **plan.options(), max_new_tokens=max_new_tokens)
            except dynamo_error() as err:  # the decode step did not compile
                if not plan.static:
                    raise
                plan = plan.eager()
                log.warning("compiling the decode step failed (%s); generating with a growing cache, eagerly",
                            str(err).splitlines()[0])
                continue
            except torch.OutOfMemoryError:
                if not plan.auto or plan.rows == 1:
                    raise
                plan = plan.halved()
                torch.cuda.empty_cache()
                log.warning("out of memory generating %d rows at once; going on with %d", 2 * plan.rows, plan.rows)
                continue
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(_until_eos(out[row, width:].tolist(), plan.eos_token_id),
                                              skip_special_tokens=True)
            progress.advance(bar, len(idx))
            start += len(idx)
    return answers, plan, kv


def _batch(model: nn.Module, rows: list[list[int]], prefix: tuple | None, plan: GenerationPlan,
           kv: TaskCache | None) -> tuple[dict, TaskCache | None]:
    """`generate`'s inputs for `rows` (the prompts after any shared `prefix`), left-padded; a static batch filled
    to the plan's rows with copies of its last prompt (their answers dropped) and given the task's cache."""
    rows = rows + [rows[-1]] * (plan.rows - len(rows) if plan.static else 0)
    batch = {k: v.to(plan.device) for k, v in pad_left(rows, plan.pad_token_id).items()}
    if prefix is not None:
        batch = behind_prefix(batch, *prefix)
    if plan.static:
        kv = kv if kv is not None and kv.rows == plan.rows else TaskCache(model, plan.rows, plan.cache_len)
        batch[kv.key] = kv.emptied()
    return batch, kv


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def auto_batch_size(model: nn.Module, device: torch.device, length: int, rows: int, precision: str) -> int:
    """`eval.batch_size=auto` for `rows` prompts and a cache of `length` tokens (`generation.auto_rows`)."""
    sized = device.type == "cuda"
    facts = ModelFacts(device=device, free_bytes=free_memory(device) if sized else None,
                       text_config=model.config.get_text_config() if sized else None,
                       dtype=model.dtype if sized else None)
    return auto_rows(facts, length, rows, precision)


def evaluate_sets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, test_sets: list[tuple[TestSet, list[dict]]],
                  settings: EvalSettings, precision: str, quant_bits: int | None, out_dir: Path,
                  loggers: list[Logger]) -> dict[str, float]:
    """Every test set of a task, generated under one plan (one decode shape for all), each scored and written when
    its answers are done; metrics flattened as `test/<set>/<metric>` and logged, predictions as tables."""
    chosen = [(test_set, records, pick_rows(records, test_set, settings)) for test_set, records in test_sets]
    sets = [(f"eval {t.name}", [records[i] for i in rows], t.max_new_tokens) for t, records, rows in chosen]
    encoded = encode_sets(tokenizer, sets, settings.prompt)
    generating, plan = plan_generation(model, tokenizer, encoded, [new for *_, new in sets], settings, precision)
    weight_only = quant_bits == 8 and any(isinstance(m, WeightOnlyLinear8bit) for m in model.modules())
    if quant_bits == 8 and settings.batch_size != 1 and not weight_only and not plan.int8_dequantized:
        log.warning("8-bit base: %s, so scores depend on eval.batch_size=%s and on which prompts share a batch; "
                    "eval.batch_size=1 scores each prompt alone, eval.int8_cpu=dequant (CPU) is batch-invariant "
                    "(docs/evaluation.md)",
                    "bf16 matmuls round by batch shape (about 2% of answers)" if plan.quant.int8_cpu is Int8Cpu.bf16
                    else "LLM.int8 picks outlier columns per batch", settings.batch_size)
    conditions = score_conditions(settings, plan, precision, quant_bits, weight_only)
    flat: dict[str, float] = {}
    answers = generate_planned(generating, tokenizer, sets, encoded, plan)
    for (test_set, records, rows), generations in zip(chosen, answers, strict=True):  # each set written when done
        metrics, predictions = score_set(test_set, records, rows, generations, conditions, out_dir)
        flat |= {test_score(test_set.name, k): v for k, v in metrics.items()}
        log_predictions(loggers, test_predictions(test_set.name), predictions)
    for lg in loggers:
        lg.log_metrics(flat)
    return flat


def score_conditions(settings: EvalSettings, plan: GenerationPlan, precision: str, quant_bits: int | None,
                     weight_only: bool) -> dict:
    """What a set's scores depend on besides the model, recorded in every `<set>_metrics.json`."""
    conditions = {"batch_size": settings.batch_size, "quant_bits": quant_bits, "precision": precision,
                  "limit": settings.limit, "sample": settings.sample.value, "seed": settings.seed}
    if quant_bits == 8:  # what the answers depend on (`quant.int8_compute`)
        conditions["int8_compute"] = "weight_only" if weight_only else "llm_int8"
    if quant_bits == 8 and plan.quant.int8_cpu:  # on the CPU (an fp32 model's answers do not move with a prefix)
        conditions |= {"int8_cpu": plan.quant.int8_cpu.value, "share_prefix": settings.share_prefix}
    if settings.prompt is not TrainPrompt.plain:  # not FinLoRA's evaluation prompt
        conditions["prompt"] = settings.prompt.value
    if plan.quant.four_bit:  # bitsandbytes' fused kernels and the dense weights round differently
        conditions["four_bit"] = plan.quant.four_bit.value
    if plan.static:  # Inductor's fused kernels round otherwise
        conditions["decode_compile"] = settings.decode_compile.value
    return conditions


def evaluate(dict_cfg: DictConfig) -> dict[str, float]:
    """`eval.py`: load the base model (and adapter, merged or not; quantized as the adapter was trained unless
    `quant` is given), evaluate, write `<output_dir>/eval/` and say where."""
    quantization = quant_as_trained(dict_cfg)
    cfg = validate(dict_cfg, EvalConfig)
    log.info("%s", quantization)
    where = placement(cfg)
    if problem := four_bit_problem(cfg, where):
        raise ConfigError(problem)
    test_sets = load_test_sets(cfg.task, cfg.paths.data_dir)
    out_dir = Path(cfg.output_dir)
    tokenizer = build_tokenizer(cfg)
    for _, records in test_sets:  # a chat set's prompt needs a chat template: known before the model loads
        build_prompt(records[0], tokenizer=tokenizer)
    model = build_model(cfg, where)
    loggers = build_loggers(cfg.logger, out_dir, cfg.run_name, OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        metrics = evaluate_sets(model, tokenizer, test_sets, cfg.eval, where.precision, cfg.quant.bits,
                                out_dir / "eval", loggers)
        log_summary(loggers, metrics)
        print_metrics(metrics)
        Console().print(f"{quantization}\nanswers and metrics: {out_dir / 'eval'}", highlight=False, soft_wrap=True)
        return metrics
    finally:
        finish(loggers)
