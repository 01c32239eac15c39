"""The generation plan: what evaluation decides before its first batch, resolved once into a frozen
`GenerationPlan` that the one decoding loop (`evaluate.generate_sets`) reads.

Resolution is pure: `quant_modes` (how a quantized base computes) and `resolve_plan` (device, autocast, batch rows,
static KV cache and compiled decode step, shared prompt prefix) take the settings and facts measured on the model
(`ModelFacts`), never the model itself, so a plan for CUDA resolves, and is tested, on a machine without a GPU. The
loop changes its plan in two places only, each a new plan: `eager` (the decode step did not compile) and `halved`
(out of memory with `auto` rows). Also here: the pieces a batch is built from (the task's static KV cache, a shared
prefix's KV cache).
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import CompileConfig, StaticCache

from finlora.capture import recorded_backend
from finlora.config import DecodeCompile, DecodeSettings, FourBitEval, Int8Cpu
from finlora.models import compute_dtype

AUTO_CAP = 1024  # rows: past this a bigger batch buys nothing and only holds memory
CPU_BATCH = 32  # `auto` on the CPU: the batches of before (an 8-bit base's LLM.int8 scores depend on them)
MEMORY_SHARE = 0.7  # of the free GPU memory that `auto` plans to fill (the rest: allocator slack, the unforeseen)
CACHE_STEP = 256  # a static cache's length is rounded up to this, so one compiled decode step serves many sets
MIN_PREFIX = 8  # tokens: a shorter prefix shared by every prompt is not worth its own forward pass
DENSE_SHARE = 0.5  # of the free memory that `eval.four_bit=auto` lets a dense copy take (the rest: KV cache, batch)
FILL_MULTIPLE = 8  # a static batch's rows under `auto` are a multiple of this


DECODE_COMPILE = {  # what transformers' torch.compile of the decode step is given
    DecodeCompile.cudagraphs: CompileConfig(fullgraph=False, backend="cudagraphs", mode=None),
    DecodeCompile.inductor: CompileConfig(fullgraph=False, mode="reduce-overhead"),
    DecodeCompile.recorded: CompileConfig(fullgraph=False, backend=recorded_backend, mode=None)}


@dataclass(frozen=True)
class QuantModes:
    """How a quantized base computes while generating, decided once (`quant_modes`)."""

    int8_cpu: Int8Cpu | None = None  # an 8-bit base on the CPU (`Int8Cpu`); None: not on the CPU
    four_bit: FourBitEval | None = None  # kernel or dense; None: no 4-bit layer
    four_bit_why: str | None = None  # the line that says why `eval.four_bit` computes as it does


@dataclass(frozen=True)
class ModelFacts:
    """What a plan depends on besides the settings, measured on the model as it generates (after the copies its
    `QuantModes` ask for) and on the machine."""

    device: torch.device
    compiles_decoding: bool = False  # transformers compiles the decode step there (CUDA)
    int8_layers: bool = False  # bitsandbytes' LLM.int8 layers (`Linear8bitLt` itself) are in the model
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    free_bytes: int | None = None  # memory free for generation (read by `auto` rows on CUDA only)
    text_config: Any = None  # the decoder's config (likewise)
    dtype: torch.dtype | None = None  # the model's dtype (likewise)


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the decoding loop reads: where and in which precision it generates, how many rows a batch holds,
    whether the task shares one static KV cache and a compiled decode step, whether a set's shared prompt prefix
    goes through the model once, and how a quantized base computes."""

    device: torch.device
    precision: str
    quant: QuantModes
    static: bool  # one static KV cache for the task, and transformers compiles the decode step
    compile_config: CompileConfig | None  # what that compile is given (`DECODE_COMPILE`); None when not static
    prefix: bool  # a set's shared prompt prefix may go through the model once (CPU, no LLM.int8), unless static
    cache_len: int  # the static cache's length: the longest prompt plus its answer, rounded up to `CACHE_STEP`
    rows: int  # rows a batch; a static batch short of them is filled with copies of its last prompt
    auto: bool  # `eval.batch_size=auto`: halved after an out-of-memory error
    pad_token_id: int | None
    eos_token_id: int | None

    @property
    def shares_prefix(self) -> bool:
        return self.prefix and not self.static

    @property
    def int8_dequantized(self) -> bool:
        """The 8-bit layers compute through their dequantized weight (`eval.int8_cpu=dequant` on the CPU)."""
        return self.quant.int8_cpu is Int8Cpu.dequant

    def options(self) -> dict:
        """`generate`'s options besides the batch and `max_new_tokens`: greedy, with a KV cache."""
        options: dict = {"do_sample": False, "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
                         "use_cache": True}
        return options | ({"compile_config": self.compile_config} if self.static else {})

    def autocast(self) -> torch.autocast:
        """The autocast training used (enabled for a mixed precision only)."""
        return torch.autocast(self.device.type, dtype=compute_dtype(self.precision),
                              enabled=self.precision.endswith("mixed"))

    def eager(self) -> GenerationPlan:
        """The plan after the decode step failed to compile: a growing cache, eager decoding."""
        return replace(self, static=False, compile_config=None)

    def halved(self) -> GenerationPlan:
        """The plan after an out-of-memory error with `auto` rows: half as many."""
        return replace(self, rows=self.rows // 2)


def int8_cpu_mode(asked: Int8Cpu, bf16_matmuls: bool) -> Int8Cpu:
    """`bf16` needs native bf16 matmuls; without them `dequant` computes instead."""
    return Int8Cpu.dequant if asked is Int8Cpu.bf16 and not bf16_matmuls else asked


def four_bit_mode(asked: FourBitEval, dense: int, free: int) -> tuple[FourBitEval, str]:
    """How a 4-bit base computes (`kernel` or `dense`), and a line saying why: `auto` picks `dense` when its copy
    (`dense` bytes) takes at most `DENSE_SHARE` of the `free` memory, leaving the rest to the KV cache and the
    batch (`auto` rows are planned after the copy is made)."""
    sizes = f"a dense copy of the 4-bit layers takes {dense / 2**30:.2f} GiB, {free / 2**30:.1f} GiB are free"
    if asked is not FourBitEval.auto:
        return asked, f"eval.four_bit={asked.value} ({sizes})"
    if dense <= DENSE_SHARE * free:
        return FourBitEval.dense, f"eval.four_bit=auto: dense ({sizes}: it fits in {DENSE_SHARE:.0%} of them)"
    return FourBitEval.kernel, (f"eval.four_bit=auto: kernel, bitsandbytes' 4-bit layers ({sizes}: more than "
                                f"{DENSE_SHARE:.0%} of them)")


def quant_modes(device_type: str, int8_cpu: Int8Cpu, four_bit: FourBitEval, *, bf16_matmuls: bool = True,
                four_bit_bytes: int | None = None, free_bytes: int = 0) -> QuantModes:
    """How a quantized base computes on `device_type`: an 8-bit base on the CPU as `int8_cpu` asks (`bf16` only with
    native bf16 matmuls), 4-bit layers (`four_bit_bytes` dequantized; None: none) as `four_bit_mode` says."""
    int8 = int8_cpu_mode(int8_cpu, bf16_matmuls) if device_type == "cpu" else None
    if four_bit_bytes is None:
        return QuantModes(int8_cpu=int8)
    mode, why = four_bit_mode(four_bit, four_bit_bytes, free_bytes)
    return QuantModes(int8_cpu=int8, four_bit=mode, four_bit_why=why)


def resolve_plan(settings: DecodeSettings, precision: str, quant: QuantModes, facts: ModelFacts,
                 sets: list[tuple[list[int], int]]) -> GenerationPlan:
    """The plan for `sets` (each: its prompts' lengths and its `max_new_tokens`) under `settings`.

    On a device where transformers compiles the decode step, with `static_cache`, every batch of every set has one
    shape: the same rows (`auto`: each set in as few batches as the rows allow, `even_batches`) and one cache length,
    so the step compiles once for the task. A set's shared prompt prefix goes through the model once on the CPU only,
    and not where LLM.int8 computes (its outlier columns, chosen per batch, would move the answers)."""
    device = facts.device
    static = settings.static_cache and facts.compiles_decoding
    longest = max((n + new for lengths, new in sets for n in lengths), default=0)
    cache_len = -(-longest // CACHE_STEP) * CACHE_STEP
    auto = settings.batch_size == "auto"
    rows = auto_rows(facts, cache_len, max(max((len(lengths) for lengths, _ in sets), default=0), 1),
                     precision) if auto else int(settings.batch_size)
    if auto and static:  # each set in as few batches as `rows` allows, one row count for all: few filler rows
        rows = max((even_batches(len(lengths), rows, FILL_MULTIPLE) for lengths, _ in sets if lengths), default=rows)
    llm_int8 = facts.int8_layers and quant.int8_cpu is not Int8Cpu.dequant
    return GenerationPlan(device=device, precision=precision, quant=quant, static=static,
                          compile_config=DECODE_COMPILE[settings.decode_compile] if static else None,
                          prefix=settings.share_prefix and device.type == "cpu" and not llm_int8, cache_len=cache_len,
                          rows=rows, auto=auto, pad_token_id=facts.pad_token_id, eos_token_id=facts.eos_token_id)


def auto_rows(facts: ModelFacts, length: int, rows: int, precision: str) -> int:
    """`eval.batch_size=auto`: on CUDA the most rows that fit (`rows_that_fit`); elsewhere `CPU_BATCH`."""
    if facts.device.type != "cuda":
        return min(CPU_BATCH, rows)
    element = torch.finfo(compute_dtype(precision) if precision.endswith("mixed") else facts.dtype).bits // 8
    return rows_that_fit(facts.text_config, element, length, facts.free_bytes)


def rows_that_fit(config: Any, element: int, length: int, free: int) -> int:
    """The most rows, a power of two up to `AUTO_CAP`, whose generation fits `MEMORY_SHARE` of `free` bytes: per row,
    the KV cache of `length` tokens (`element` bytes a value) and the widest activations of one layer over them (the
    prompt's forward pass, in float32 to be safe), plus the last position's logits. The loop halves it if the
    estimate was wrong."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * element
    activations = (6 * config.hidden_size + 3 * config.intermediate_size) * 4
    per_row = length * (kv + activations) + 3 * 4 * config.vocab_size
    fit = max(1, min(AUTO_CAP, int(MEMORY_SHARE * free // per_row)))
    return 1 << (fit.bit_length() - 1)


def even_batches(rows: int, most: int, multiple: int) -> int:
    """The batch size that cuts `rows` into as few batches as `most` allows, of near-equal sizes (rounded up
    to `multiple`): 1,212 rows at most 1,024 make two batches of 608, not 1,024 and 188 filled up to 1,024."""
    per_batch = -(-rows // -(-rows // most))
    return -(-per_batch // multiple) * multiple


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own (the first
    answer token is read from the logits of a prompt's last token)."""
    return min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)  # element-wise on lists


def cache_argument(model: nn.Module) -> str:
    """The name `generate` and the forward take a KV cache by (transformers renamed `past_key_values` to `cache`;
    the old name warns until 6.0)."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's takes **kwargs
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


class TaskCache:
    """One static KV cache for every batch of a task's sets (`rows` × `length`), emptied before each: its
    tensors stay where they are, so the decode step recorded as a CUDA graph (`eval.decode_compile=recorded`)
    replays on them instead of being recorded again for each batch, as it was on the new cache transformers
    makes at every `generate` call."""

    def __init__(self, model: nn.Module, rows: int, length: int) -> None:
        self.rows, self.key = rows, cache_argument(model)
        self.cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length)

    def emptied(self) -> StaticCache:
        self.cache.reset()
        return self.cache


def prefix_cache(model: nn.Module, prefix_ids: torch.Tensor) -> tuple[str, object]:
    """The KV cache of `prefix_ids` (1 × n tokens) through `model`, and the name `generate` takes it by."""
    key = cache_argument(model)
    return key, getattr(model(input_ids=prefix_ids, use_cache=True), key)


def behind_prefix(batch: dict[str, torch.Tensor], prefix_ids: torch.Tensor, cache_key: str, cache: object) -> dict:
    """`generate`'s inputs for a left-padded batch of the rest of each prompt: [prefix][padding][rest], and a
    copy of the prefix's KV cache for each row. Positions follow the attention mask, so they are right."""
    n = batch["input_ids"].shape[0]
    rows_cache = copy.deepcopy(cache)
    rows_cache.batch_repeat_interleave(n)
    return {"input_ids": torch.cat([prefix_ids.expand(n, -1), batch["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones_like(prefix_ids).expand(n, -1), batch["attention_mask"]], 1),
            cache_key: rows_cache}
