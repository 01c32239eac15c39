"""How a quantized base computes while generating: the probes the generation plan reads (`finlora.generation`), and
the copies and switches its `QuantModes` ask for.

An 8-bit base on the CPU computes as `eval.int8_cpu` says: `bf16`, a bf16 copy with its adapters merged
(`int8_as_bf16`); `dequant`, bitsandbytes' training path through the dequantized weight (`int8_dequantized`);
`llm_int8`, as loaded. A 4-bit base computes as `eval.four_bit` says: `dense`, a copy whose 4-bit layers are plain
layers holding their weight dequantized once (`dense_4bit`), which transformers then compiles; `kernel`, as loaded.
bitsandbytes is read from `sys.modules`: nothing here imports it, and a model without its layers needs none.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys

import torch
from torch import nn

from finlora.compat import torch as compat_torch
from finlora.config import EvalConfig, FourBitEval, Int8Cpu
from finlora.devices import Placement, linear_params, weight_bytes
from finlora.generation import four_bit_mode, int8_cpu_mode
from finlora.models import compute_dtype, model_config, resolve_source

log = logging.getLogger(__name__)


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


@functools.cache
def cpu_int8_mode(asked: Int8Cpu) -> Int8Cpu:
    """`bf16` needs a CPU with native bf16 matmuls (AVX512-BF16 or AMX, through oneDNN); elsewhere torch emulates
    them, slower than float32, so `dequant` computes instead (said once)."""
    if asked is not Int8Cpu.bf16:
        return asked
    mode = int8_cpu_mode(asked, compat_torch.mkldnn_bf16_supported())
    if mode is not asked:
        log.warning("eval.int8_cpu=bf16: this CPU has no native bf16 matmuls; scoring the 8-bit base with "
                    "eval.int8_cpu=dequant instead")
    return mode


def int8_layers(model: nn.Module) -> bool:
    """Whether `model` has bitsandbytes' LLM.int8 layers (`Linear8bitLt` itself; finlora's weight-only 8-bit
    layers are not), whose outlier columns, chosen per batch, a separately computed prefix would change."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and any(type(m) is bnb.nn.Linear8bitLt for m in model.modules())


def int8_dequantized(model: nn.Module, on: bool) -> int:
    """With `on`, put the model's bitsandbytes 8-bit layers in training mode (until `model.train`/`eval` is
    called again): on the CPU, bitsandbytes then computes them as in training, through the weight
    dequantized to the input's dtype (`MatMul8bitFp`), instead of LLM.int8's quantized inputs with outlier
    columns chosen per batch. The answers then no longer depend on which prompts share a batch and they come
    from the function the CPU trained (docs/benchmarks.md has the times). The layers have no dropout or other
    training-only behaviour. Returns the number of layers switched."""
    bnb = sys.modules.get("bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)] if on and bnb else []
    for layer in layers:
        layer.training = True
    return len(layers)


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
    outlier columns) and cost a fraction of bitsandbytes' CPU kernels. `model` is not changed; a model without
    8-bit layers is returned as it is."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()):
        return model
    twin = with_plain_layers(model, bnb.nn.Linear8bitLt, _merged_8bit, merge=True, share=False)
    for p in twin.parameters():
        p.data = p.data.to(torch.bfloat16)
        p.requires_grad_(False)
    twin = twin.get_base_model() if hasattr(twin, "get_base_model") else twin
    # The prefill's logits come from `hidden[:, -1:]`, a strided view: a bf16 matmul on the CPU then copies the
    # whole output matrix once per row; a contiguous input takes the plain GEMM.
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
    """`model` with its bitsandbytes 4-bit layers computed as `asked` (`four_bit_choice`), and the mode used (None:
    no 4-bit layer): `dense_4bit`'s copy for `dense`, `model` itself otherwise."""
    mode = four_bit_choice(model, asked)
    return (dense_4bit(model) if mode is FourBitEval.dense else model), mode


def dense_4bit(model: nn.Module) -> nn.Module:
    """A copy of `model` in which each bitsandbytes 4-bit layer is a plain `nn.Linear` holding its weight
    dequantized once to the dtype it computes in (`_dequantized_4bit`); everything else, peft's LoRA and DoRA
    layers (finlora's DoRA too) and their parameters included, is shared with `model` and computes unmerged on
    top, as in training. bitsandbytes' own matmul multiplies by that same dequantized weight whenever it does
    not take a fused kernel (on CUDA: beyond a few rows; docs/evaluation.md), so the answers are the same there,
    and transformers, which compiles no bitsandbytes model, compiles the copy's decode step. `model` is not
    changed; its memory stays in use beside the copy's."""
    twin = with_plain_layers(model, sys.modules["bitsandbytes"].nn.Linear4bit,
                             lambda _, layer: (_dequantized_4bit(layer), _bias_4bit(layer)), merge=False, share=True)
    hf_model = twin.get_base_model() if hasattr(twin, "get_base_model") else twin
    hf_model.hf_quantizer = None  # nothing quantized is left: transformers may compile it
    return twin


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
