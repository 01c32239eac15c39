"""Generation on a task's test sets and FinLoRA's metrics, for a base model, an adapter or a merged model.

Prompts come from `finlora.prompts.encode_prompt`, the function training uses, so an evaluation prompt is
always the training prompt minus the answer. Generation is greedy and batched with left padding; the
examples are sorted by length so a batch wastes little on padding, and the answers are put back in
file order. The batch is as large as fits (`eval.batch_size=auto`), and on CUDA the decode step runs
compiled on a static KV cache (`generate_sets`); an 8-bit base on the CPU computes as `eval.int8_cpu` says
(`int8_as_bf16`: a bf16 copy), a 4-bit base as `eval.four_bit` says (`four_bit_as_dense`: a copy with its
4-bit layers dequantized once, which transformers then compiles). `evaluate(cfg)` is what `eval.py` runs;
`evaluate_sets` is also training's test stage, and `generate` scores during training (`callbacks.TaskScore`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from transformers import CompileConfig, PreTrainedTokenizerBase, StaticCache

from finlora.attention import grouped_decoding
from finlora.batching import pad_left
from finlora.build import build_model, build_tokenizer, placement, quant_as_trained
from finlora.capture import recorded_backend
from finlora.config import (
    DecodeCompile,
    DecodeSettings,
    EvalConfig,
    EvalSample,
    EvalSettings,
    FourBitEval,
    Int8Cpu,
    TaskKind,
    TestSet,
    TrainPrompt,
    validate,
)
from finlora.data import load_test_sets, proportional
from finlora.devices import Placement, linear_params, weight_bytes
from finlora.dora import prepare_compile
from finlora.errors import ConfigError
from finlora.loggers import build_loggers, finish, log_predictions, log_summary
from finlora.metric_names import test_score
from finlora.metrics import extract_answer, score
from finlora.models import compute_dtype, model_config, resolve_source
from finlora.outputs import write_json, write_jsonl
from finlora.prompts import build_prompt, encode_prompt
from finlora.quant.int8 import WeightOnlyLinear8bit

log = logging.getLogger(__name__)


AUTO_CAP = 1024  # rows: past this a bigger batch buys nothing and only holds memory
CPU_BATCH = 32  # `auto` on the CPU: the batches of before (an 8-bit base's LLM.int8 scores depend on them)
MEMORY_SHARE = 0.7  # of the free GPU memory that `auto` plans to fill (the rest: allocator slack, the unforeseen)
CACHE_STEP = 256  # a static cache's length is rounded up to this, so one compiled decode step serves many sets
MIN_PREFIX = 8  # tokens: a shorter prefix shared by every prompt is not worth its own forward pass
DENSE_SHARE = 0.5  # of the free memory that `eval.four_bit=auto` lets a dense copy take (the rest: KV cache, batch)


DECODE_COMPILE = {  # what transformers' torch.compile of the decode step is given
    DecodeCompile.cudagraphs: CompileConfig(fullgraph=False, backend="cudagraphs", mode=None),
    DecodeCompile.inductor: CompileConfig(fullgraph=False, mode="reduce-overhead"),
    DecodeCompile.recorded: CompileConfig(fullgraph=False, backend=recorded_backend, mode=None)}


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict], max_new_tokens: int,
             batch_size: int | str = "auto", precision: str = "32-true", description: str = "generating",
             **options) -> list[str]:
    """Greedy answers for `records`, in their order: `generate_sets` for one set."""
    return list(generate_sets(model, tokenizer, [(description, records, max_new_tokens)], batch_size, precision,
                              **options))[0]


@torch.no_grad()
def generate_sets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sets: list[tuple[str, list[dict], int]],
                  batch_size: int | str = "auto", precision: str = "32-true", *, static_cache: bool = True,
                  decode_compile: DecodeCompile = DecodeCompile.recorded, int8_cpu: Int8Cpu = Int8Cpu.bf16,
                  four_bit: FourBitEval = FourBitEval.auto, share_prefix: bool = True,
                  prompt: TrainPrompt = TrainPrompt.plain) -> Iterator[list[str]]:
    """Greedy answers for each set (a progress label, its records, its `max_new_tokens`), yielded set by set,
    each in its records' order, under the same autocast as training used.

    Prompts are sorted by length and cut into batches of `batch_size` rows (`auto`: `auto_batch_size`), so
    the rows of a batch need little left padding; answers are put back in the records' order. A row stops
    at EOS or after `max_new_tokens`, and a batch stops when all its rows have. On CUDA with `static_cache`,
    the KV cache is one set of fixed-shape tensors for the whole task (`TaskCache`), and transformers compiles
    the decode step into a CUDA graph (recorded by finlora, or by Dynamo's CUDA-graph backend, or Inductor's:
    `decode_compile`):
    every batch of every set then has one shape, the same number of rows (a batch short of it is filled
    with copies of its last prompt, whose answers are dropped) and one cache length (the longest prompt of
    all the sets plus its answer, rounded up to `CACHE_STEP`), so the step compiles once for a whole task;
    its attention reads each key/value head once (`attention.grouped_decoding`).
    An 8-bit base on the CPU computes as `int8_cpu` says (`Int8Cpu`), a 4-bit base as `four_bit` says
    (`four_bit_as_dense`; its dense copy is made before `auto` sizes the batch). With `share_prefix`, on the
    CPU (unless LLM.int8 computes, whose answers would move), a set's shared prompt prefix (FinLoRA's
    instruction: 25 of FPB's 61 tokens on average) goes through the model once: its KV cache is copied into
    every batch, whose rows hold the rest of their prompts left-padded behind it (`shared_prefix`)."""
    encoded = [[encode_prompt(tokenizer, r, prompt) for r in records] for _, records, _ in sets]
    if not any(encoded):
        yield from ([] for _ in sets)
        return
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(p.device for p in model.parameters())
    static = static_cache and compiles_decoding(device)
    int8_cpu = cpu_int8_mode(int8_cpu) if device.type == "cpu" else int8_cpu
    if device.type == "cpu" and int8_cpu is Int8Cpu.bf16:
        model = int8_as_bf16(model)
    model = four_bit_as_dense(model, four_bit)[0]
    longest = max((len(p) + new for prompts, (_, _, new) in zip(encoded, sets, strict=True) for p in prompts))
    cache_len = -(-longest // CACHE_STEP) * CACHE_STEP
    auto = batch_size == "auto"
    most_rows = max(map(len, encoded))
    size = int(batch_size) if not auto else auto_batch_size(model, device, cache_len, max(most_rows, 1), precision)
    if auto and static:  # each set in as few batches as `size` allows, one row count for all: few filler rows
        size = max(even_batches(len(prompts), size, 8) for prompts in encoded if prompts)
    options: dict = {"do_sample": False, "pad_token_id": pad, "eos_token_id": eos, "use_cache": True}
    if static:  # the compiled decode step rebuilds DoRA norms from frozen row norms computed now
        options |= {"compile_config": DECODE_COMPILE[decode_compile]}
        prepare_compile(model)
    kv: TaskCache | None = None
    was_training = model.training
    model.eval()
    int8_dequantized(model, device.type == "cpu" and int8_cpu is Int8Cpu.dequant)
    autocast = torch.autocast(device.type, dtype=compute_dtype(precision), enabled=precision.endswith("mixed"))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        for (description, _, max_new_tokens), prompts in zip(sets, encoded, strict=True):
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            share = prompts and share_prefix and device.type == "cpu" and not static and not runs_llm_int8(model)
            shared = shared_prefix(prompts) if share else 0
            shared = shared if shared >= MIN_PREFIX else 0
            answers: list[str] = [""] * len(prompts)
            if shared:
                prefix_ids = torch.tensor([prompts[0][:shared]], device=device)
                with autocast:
                    cache_key, prefix = prefix_cache(model, prefix_ids)
            with Progress(*columns, transient=True) as progress:
                bar = progress.add_task(description, total=len(prompts))
                start = 0
                while start < len(order):
                    idx = order[start:start + size]
                    rows = [prompts[i][shared:] for i in idx]
                    rows += [rows[-1]] * (size - len(idx) if static else 0)
                    batch = {k: v.to(device) for k, v in pad_left(rows, pad).items()}
                    if shared:
                        batch = behind_prefix(batch, prefix_ids, cache_key, prefix)
                    if static:
                        kv = kv if kv is not None and kv.rows == size else TaskCache(model, size, cache_len)
                        batch[kv.key] = kv.emptied()
                    try:
                        with autocast, grouped_decoding(model, static):
                            out = model.generate(**batch, **options, max_new_tokens=max_new_tokens)
                    except torch._dynamo.exc.TorchDynamoException as err:  # the decode step did not compile
                        if not static:
                            raise
                        static = False
                        options = {k: v for k, v in options.items() if k != "compile_config"}
                        log.warning("compiling the decode step failed (%s); generating with a growing cache, eagerly",
                                    str(err).splitlines()[0])
                        continue
                    except torch.OutOfMemoryError:
                        if not auto or size == 1:
                            raise
                        size //= 2
                        torch.cuda.empty_cache()
                        log.warning("out of memory generating %d rows at once; going on with %d", 2 * size, size)
                        continue
                    width = batch["input_ids"].shape[1]
                    for row, i in enumerate(idx):
                        answers[i] = tokenizer.decode(_until_eos(out[row, width:].tolist(), eos),
                                                      skip_special_tokens=True)
                    progress.advance(bar, len(idx))
                    start += len(idx)
            yield answers
    finally:
        model.train(was_training)


def decoding(settings: DecodeSettings, precision: str) -> dict:
    """`generate_sets`' arguments after its sets, as `settings` and the precision say: how `evaluate_sets` and
    `predict.py` generate."""
    return {"batch_size": settings.batch_size, "precision": precision, "static_cache": settings.static_cache,
            "decode_compile": settings.decode_compile, "int8_cpu": settings.int8_cpu, "four_bit": settings.four_bit,
            "share_prefix": settings.share_prefix, "prompt": settings.prompt}


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


def runs_llm_int8(model: nn.Module) -> bool:
    """Whether bitsandbytes' LLM.int8 computes some layer of `model` (8-bit layers in eval mode: see
    `int8_dequantized`), whose outlier columns, chosen per batch, a separately computed prefix would change."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and any(type(m) is bnb.nn.Linear8bitLt and not m.training for m in model.modules())


def even_batches(rows: int, most: int, multiple: int) -> int:
    """The batch size that cuts `rows` into as few batches as `most` allows, of near-equal sizes (rounded up
    to `multiple`): 1,212 rows at most 1,024 make two batches of 608, not 1,024 and 188 filled up to 1,024."""
    per_batch = -(-rows // -(-rows // most))
    return -(-per_batch // multiple) * multiple


def compiles_decoding(device: torch.device) -> bool:
    """Whether transformers compiles the decode step there (CUDA); elsewhere a static cache buys nothing."""
    return device.type == "cuda"


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def auto_batch_size(model: nn.Module, device: torch.device, length: int, rows: int, precision: str) -> int:
    """The most rows, a power of two up to `AUTO_CAP`, whose generation fits `MEMORY_SHARE` of the free GPU
    memory: per row, the KV cache of `length` tokens and the widest activations of one layer over them (the
    prompt's forward pass, in float32 to be safe), plus the last position's logits. On the CPU: `CPU_BATCH`.
    `generate` halves it if the estimate was wrong."""
    if device.type != "cuda":
        return min(CPU_BATCH, rows)
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = torch.finfo(compute_dtype(precision) if precision.endswith("mixed") else model.dtype).bits // 8
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * element
    activations = (6 * config.hidden_size + 3 * config.intermediate_size) * 4
    per_row = length * (kv + activations) + 3 * 4 * config.vocab_size
    fit = max(1, min(AUTO_CAP, int(MEMORY_SHARE * free_memory(device) // per_row)))
    return 1 << (fit.bit_length() - 1)


def free_memory(device: torch.device) -> int:
    """Bytes that new tensors can take there: on CUDA the driver's free memory plus what torch holds unused; on
    the CPU the kernel's estimate of available memory (Linux's MemAvailable)."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def int8_dequantized(model: nn.Module, on: bool) -> int:
    """With `on`, put the model's bitsandbytes 8-bit layers in training mode (until `model.train`/`eval` is
    called again): on the CPU, bitsandbytes then computes them as in training, through the weight
    dequantized to the input's dtype (`MatMul8bitFp`), instead of LLM.int8's quantized inputs with outlier
    columns chosen per batch. The answers then no longer depend on which prompts share a batch and they come
    from the function the CPU trained; the time is about LLM.int8's (docs/benchmarks.md). The layers have
    no dropout or other training-only behaviour. Returns the number of layers switched."""
    bnb = sys.modules.get("bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)] if on and bnb else []
    for layer in layers:
        layer.training = True
    return len(layers)


@functools.cache
def cpu_int8_mode(asked: Int8Cpu) -> Int8Cpu:
    """`bf16` needs a CPU with native bf16 matmuls (AVX512-BF16 or AMX, through oneDNN); elsewhere torch emulates
    them, slower than float32, so `dequant` computes instead (said once)."""
    if asked is not Int8Cpu.bf16:
        return asked
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        native = False
    if not native:
        log.warning("eval.int8_cpu=bf16: this CPU has no native bf16 matmuls; scoring the 8-bit base with "
                    "eval.int8_cpu=dequant instead")
    return asked if native else Int8Cpu.dequant


def with_plain_layers(model: nn.Module, kind: type, weights, merge: bool, share: bool) -> nn.Module:
    """A copy of `model` whose bitsandbytes layers of type `kind` are plain `nn.Linear`s holding
    `weights(lora, layer)` (a weight and a bias, in their final dtype). With `merge`, a peft layer around one is
    replaced whole (`lora` is that peft layer, whose active adapters `weights` merges in); otherwise only its base
    layer is, and the adapter computes on top as before (`lora` is None). With `share`, the copy holds the same
    parameter and buffer tensors as `model` (only modules are new), so it costs the plain weights alone; without,
    it is a deep copy that can be cast freely. `model` is not changed."""
    from peft.tuners.lora import LoraLayer

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())} if share else {}
    twin = copy.deepcopy(model, shared)
    replaced: list[str] = []
    for name, module in list(twin.named_modules()):
        if any(name.startswith(f"{r}.") for r in replaced):  # inside a layer already replaced
            continue
        lora = merge and isinstance(module, LoraLayer)
        layer = module.get_base_layer() if lora else module
        if not isinstance(layer, kind):
            continue
        weight, bias = weights(module if lora else None, layer)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias, requires_grad=False)
        parent, _, child = name.rpartition(".")
        twin.get_submodule(parent).register_module(child, plain)
        replaced.append(name)
    return twin


def int8_as_bf16(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of a model with bitsandbytes 8-bit layers (`eval.int8_cpu=bf16`), for generating on the
    CPU: each 8-bit layer (with its active peft LoRA/DoRA adapters merged in, `_merged_8bit`) becomes a plain
    bf16 `nn.Linear`, and every other parameter is cast to bf16 (buffers, e.g. rotary frequencies, stay as they
    are). The copy computes with plain bf16 matmuls, whose answers do not depend on the batch (no LLM.int8
    outlier columns) and cost a fraction of bitsandbytes' CPU kernels (docs/benchmarks.md). `model` is not
    changed; a model without 8-bit layers is returned as it is."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()):
        return model
    twin = with_plain_layers(model, bnb.nn.Linear8bitLt, _merged_8bit, merge=True, share=False)
    for p in twin.parameters():
        p.data = p.data.to(torch.bfloat16)
        p.requires_grad_(False)
    twin = twin.get_base_model() if hasattr(twin, "get_base_model") else twin
    # The prefill's logits come from `hidden[:, -1:]`, a strided view: a bf16 matmul on the CPU then copies the
    # whole output matrix once per row (seconds a batch, measured); a contiguous input takes the plain GEMM.
    if (head := twin.get_output_embeddings()) is not None:
        head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    return twin


@torch.no_grad()
def _merged_8bit(lora: nn.Module | None, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 weight and bias an 8-bit layer computes with, W0 = CB · SCB / 127, plus its peft layer's
    active adapters (`lora`, None for a bare layer) merged as peft merges them (a DoRA variant's `merge_safe`)."""
    scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB  # bitsandbytes moves it on use
    weight = base.weight.data.float() * (scb.float() / 127.0).unsqueeze(1)
    bias = None if base.bias is None else base.bias.detach().float()
    active = [] if lora is None or lora.disable_adapters or lora.merged else lora.active_adapters
    for adapter in (a for a in active if a in lora.lora_A):
        if variant := lora.lora_variant.get(adapter):
            weight = variant.merge_safe(lora, adapter, weight)
        else:
            weight = weight + lora.get_delta_weight(adapter)
        if lora.lora_bias[adapter]:
            bias = bias + lora.lora_B[adapter].bias.float()
    return weight, bias


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    bnb = sys.modules.get("bitsandbytes")
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)] if bnb else []


def dense_bytes(layers: list[nn.Module]) -> int:
    """Bytes of the 4-bit layers' weights dequantized to the dtype each computes in."""
    return sum(m.in_features * m.out_features * _compute_dtype_4bit(m).itemsize for m in layers)


def four_bit_mode(asked: FourBitEval, dense: int, free: int) -> tuple[FourBitEval, str]:
    """How a 4-bit base computes (`kernel` or `dense`), and a line saying why: `auto` picks `dense` when its copy
    (`dense` bytes) takes at most `DENSE_SHARE` of the `free` memory, leaving the rest to the KV cache and the
    batch (`auto_batch_size` plans after the copy is made)."""
    sizes = f"a dense copy of the 4-bit layers takes {dense / 2**30:.2f} GiB, {free / 2**30:.1f} GiB are free"
    if asked is not FourBitEval.auto:
        return asked, f"eval.four_bit={asked.value} ({sizes})"
    if dense <= DENSE_SHARE * free:
        return FourBitEval.dense, f"eval.four_bit=auto: dense ({sizes}: it fits in {DENSE_SHARE:.0%} of them)"
    return FourBitEval.kernel, (f"eval.four_bit=auto: kernel, bitsandbytes' 4-bit layers ({sizes}: more than "
                                f"{DENSE_SHARE:.0%} of them)")


def four_bit_choice(model: nn.Module, asked: FourBitEval) -> FourBitEval | None:
    """How `model`'s bitsandbytes 4-bit layers compute (`four_bit_mode`; for `auto`, a line says why), decided from
    the free memory now; None: no 4-bit layer."""
    layers = four_bit_layers(model)
    if not layers:
        return None
    mode, why = four_bit_mode(asked, dense_bytes(layers), free_memory(next(model.parameters()).device))
    if asked is FourBitEval.auto:
        log.info("%s", why)
    return mode


def four_bit_as_dense(model: nn.Module, asked: FourBitEval) -> tuple[nn.Module, FourBitEval | None]:
    """`model` with its bitsandbytes 4-bit layers computed as `asked` (`four_bit_mode`), and the mode used (None:
    no 4-bit layer). `dense`: a copy in which each 4-bit layer is a plain `nn.Linear` holding its weight
    dequantized once to the dtype it computes in (`_dequantized_4bit`); everything else, peft's LoRA and DoRA
    layers (finlora's DoRA too) and their parameters included, is shared with `model` and computes unmerged on
    top, as in training. bitsandbytes' own matmul multiplies by that same dequantized weight whenever it does
    not take a fused kernel (on CUDA: beyond a few rows; README "Evaluation"), so the answers are the same there,
    and transformers, which compiles no bitsandbytes model, compiles the copy's decode step. `model` is not
    changed; its memory stays in use beside the copy's."""
    mode = four_bit_choice(model, asked)
    if mode is not FourBitEval.dense:
        return model, mode
    twin = with_plain_layers(model, sys.modules["bitsandbytes"].nn.Linear4bit,
                             lambda _, layer: (_dequantized_4bit(layer), _bias_4bit(layer)), merge=False, share=True)
    hf_model = twin.get_base_model() if hasattr(twin, "get_base_model") else twin
    hf_model.hf_quantizer = None  # nothing quantized is left: transformers may compile it
    return twin, mode


def _compute_dtype_4bit(layer: nn.Module) -> torch.dtype:
    """The dtype a bitsandbytes 4-bit layer computes in (its input is cast to it)."""
    return layer.compute_dtype or layer.weight.quant_state.dtype


def _bias_4bit(layer: nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().to(_compute_dtype_4bit(layer))


@torch.no_grad()
def _dequantized_4bit(layer: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes 4-bit layer in the dtype it computes in, dequantized by bitsandbytes itself
    (`dequantize_4bit`, the function and kernel its matmul's unfused path calls). A weight that bitsandbytes
    repacked for its CPU kernel (an eval-mode forward on an AVX512-BF16 CPU does so, rounding the block scales to
    bf16) is read through the layer itself, on an identity: the weight that kernel computes with."""
    weight, dtype = layer.weight, _compute_dtype_4bit(layer)
    state = copy.copy(weight.quant_state)
    if not getattr(state, "packing_format_for_cpu", False):
        state.dtype = dtype
        return sys.modules["bitsandbytes"].functional.dequantize_4bit(weight.data, state)
    eye = torch.eye(layer.in_features, dtype=dtype, device=weight.device)
    out = layer(eye)
    return (out if layer.bias is None else out - layer.bias.to(out.dtype)).T.contiguous()


def four_bit_problem(cfg: EvalConfig, where: Placement) -> str | None:
    """Why `eval.four_bit=dense` cannot hold its copy beside the 4-bit base about to load, from the model's config
    and the free memory now: said before any weight is read."""
    if cfg.quant.bits != 4 or cfg.eval.four_bit is not FourBitEval.dense:
        return None
    config = model_config(resolve_source(cfg.model, cfg.paths.cache_dir), cfg.model).get_text_config()
    dense = linear_params(config) * compute_dtype(where.precision).itemsize
    free, base = free_memory(where.device), weight_bytes(config, 4, False)
    if dense + base <= free:
        return None
    return (f"eval.four_bit=dense: the 4-bit base ({base / 2**30:.1f} GiB) and its dense copy ({dense / 2**30:.1f} "
            f"GiB) need more than the {free / 2**30:.1f} GiB free on {where.device}; use eval.four_bit=auto (it "
            "falls back to bitsandbytes' kernels) or eval.four_bit=kernel")


def score_set(test_set: TestSet, records: list[dict], rows: list[int], generations: list[str], conditions: dict,
              out_dir: Path) -> tuple[dict[str, float], list[dict]]:
    """Score the answers generated for the test set's `rows`, and write `<out_dir>/<name>_predictions.jsonl` and
    `<name>_metrics.json` (the metrics, a 95% interval for accuracy, the rows scored and the `conditions` that
    can change a score)."""
    scored = [records[i] for i in rows]
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
    """Every test set of a task, generated in one `generate_sets` (one decode shape for all); metrics flattened
    as `test/<set>/<metric>` and logged, predictions as tables."""
    flat: dict[str, float] = {}
    on_cpu = next(p.device for p in model.parameters()).type == "cpu"
    if on_cpu:
        settings = replace(settings, int8_cpu=cpu_int8_mode(settings.int8_cpu))
    four_bit = four_bit_choice(model, settings.four_bit)  # decided here, for the conditions; the copy is generation's
    settings = replace(settings, four_bit=four_bit or settings.four_bit)
    weight_only = quant_bits == 8 and any(isinstance(m, WeightOnlyLinear8bit) for m in model.modules())
    if quant_bits == 8 and settings.batch_size != 1 and not weight_only and not (
            on_cpu and settings.int8_cpu is Int8Cpu.dequant):
        log.warning("8-bit base: %s, so scores depend on eval.batch_size=%s and on which prompts share a batch; "
                    "eval.batch_size=1 scores each prompt alone, eval.int8_cpu=dequant (CPU) is batch-invariant "
                    "(README)",
                    "bf16 matmuls round by batch shape (about 2% of answers)" if on_cpu and settings.int8_cpu is
                    Int8Cpu.bf16 else "LLM.int8 picks outlier columns per batch", settings.batch_size)
    conditions = {"batch_size": settings.batch_size, "quant_bits": quant_bits, "precision": precision,
                  "limit": settings.limit, "sample": settings.sample.value, "seed": settings.seed}
    if quant_bits == 8:  # what the answers depend on (`quant.int8_compute`)
        conditions["int8_compute"] = "weight_only" if weight_only else "llm_int8"
    if quant_bits == 8 and on_cpu:  # (an fp32 model's answers do not change with a shared prefix)
        conditions |= {"int8_cpu": settings.int8_cpu.value, "share_prefix": settings.share_prefix}
    if settings.prompt is not TrainPrompt.plain:  # not FinLoRA's evaluation prompt
        conditions["prompt"] = settings.prompt.value
    if four_bit:  # bitsandbytes' fused kernels and the dense weights round differently (README "Evaluation")
        conditions["four_bit"] = four_bit.value
    if settings.static_cache and compiles_decoding(next(p.device for p in model.parameters())):
        conditions["decode_compile"] = settings.decode_compile.value  # Inductor's fused kernels round otherwise
    chosen = [(test_set, records, pick_rows(records, test_set, settings)) for test_set, records in test_sets]
    answers = generate_sets(model, tokenizer, [(f"eval {t.name}", [records[i] for i in rows], t.max_new_tokens)
                                               for t, records, rows in chosen], **decoding(settings, precision))
    for (test_set, records, rows), generations in zip(chosen, answers, strict=True):  # each set written when done
        metrics, predictions = score_set(test_set, records, rows, generations, conditions, out_dir)
        flat |= {test_score(test_set.name, k): v for k, v in metrics.items()}
        log_predictions(loggers, f"test/{test_set.name}/predictions", predictions)
    for lg in loggers:
        lg.log_metrics(flat)
    return flat


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


def print_metrics(metrics: dict[str, float]) -> None:
    """The test metrics, a row per test set, with accuracy's 95% interval (as in `<set>_metrics.json`)."""
    table = Table(title="test metrics")
    table.add_column("test set")
    names = sorted({k.split("/")[2] for k in metrics})
    for name in names:
        table.add_column(name, justify="right")
        if name == "accuracy":
            table.add_column("accuracy 95% interval", justify="right")
    for test_set in sorted({k.split("/")[1] for k in metrics}):
        cells = []
        for n in names:
            cells.append(_fmt(value := metrics.get(test_score(test_set, n))))
            if n == "accuracy":
                rows = metrics.get(test_score(test_set, "n"))
                cells.append("-" if value is None or not rows else
                             "[{:.4f}, {:.4f}]".format(*wilson_interval(value, int(rows))))
        table.add_row(test_set, *cells)
    Console().print(table)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value)}" if float(value).is_integer() and value > 1 else f"{value:.4f}"
