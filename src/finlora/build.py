"""The one build step: a validated config → where it runs, and the tokenizer and model ready to train or
evaluate. `train`, `eval.py` and every script under `scripts/` build through here, so a model is never
put together two ways. Training loads the tokenizer first and the model last, with its data checked in
between.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from finlora.adapters import attach_adapter, check_saved_adapter, load_adapter, recorded_quant, target_problems
from finlora.config import AdapterMethod, Compile, Config, EvalConfig, PredictConfig
from finlora.devices import Placement, capacity_problem, gpu_count, resolve_device
from finlora.errors import ConfigError
from finlora.models import base_identity, compute_dtype, load_model, load_tokenizer, model_config, resolve_source

log = logging.getLogger(__name__)


class Built(NamedTuple):
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module


def placement(cfg: Config | EvalConfig | PredictConfig) -> Placement:
    """Accelerator, precision and device for the config, refusing combinations known to fail; cheap, so
    callers run it before reading data or loading anything."""
    if isinstance(cfg, Config):
        t = cfg.trainer
        compiled = t.compile not in (Compile.eager, Compile.auto)
        cuda_only = "trainer.compile" if compiled else "trainer.capture" if t.capture else None
        where = resolve_device(t.accelerator, t.precision, cfg.quant.bits, cuda_only)
        if t.strategy == "fsdp" and where.device.type != "cuda":
            raise ConfigError(f"trainer.strategy: Lightning's FSDP runs on CUDA GPUs only, and this run is on "
                              f"{where.accelerator}; use trainer.strategy=ddp to spread a run over CPU processes")
        return where
    return resolve_device(cfg.accelerator, cfg.precision, cfg.quant.bits)


def build_tokenizer(cfg: Config | EvalConfig | PredictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer: a saved adapter's own (`eval.py`, `predict.py`), else the base model's. Loads in a second, so a
    training run encodes (and checks) its data with it before the model loads."""
    if not isinstance(cfg, Config) and cfg.adapter_path:
        return load_tokenizer(cfg.adapter_path, cfg.model)
    return load_tokenizer(resolve_source(cfg.model, cfg.paths.cache_dir), cfg.model)


def check_base(cfg: Config, where: Placement) -> None:
    """Refuse, from the base model's config alone (no weight read), a training run that would fail only once
    the model had loaded: target modules it does not have, an adapter.r larger than its layers, a
    data.max_length beyond its context, a model too large for the GPUs. Cheap:
    `train` runs it before the run folder gets anything of its own."""
    config = model_config(resolve_source(cfg.model, cfg.paths.cache_dir), cfg.model)
    problems = target_problems(config, cfg.adapter)
    context = getattr(config, "max_position_embeddings", None)
    if context and cfg.data.max_length > context:
        problems.append(f"data.max_length: {cfg.data.max_length} is more than the model's context, {context} tokens "
                        f"(max_position_embeddings in its config); use data.max_length <= {context}")
    full = cfg.adapter.method is AdapterMethod.none
    if where.device.type == "cuda" and (too_big := capacity_problem(
            config, cfg.quant.bits, full, max(gpu_count(cfg.trainer.devices), 1),
            torch.cuda.get_device_properties(where.device).total_memory, cfg.trainer.strategy == "fsdp")):
        problems.append(too_big)
    if problems:
        raise ConfigError.listing(problems)


def build_model(cfg: Config | EvalConfig | PredictConfig, where: Placement) -> nn.Module:
    """The base model (converted, quantized as asked) on `where.device`, with the training adapter of a
    `Config` (checked first by `check_base`, which `train` and `build` run) or the saved adapter of an
    `EvalConfig` or `PredictConfig`, which is checked to have been trained on this base before any weight is read.

    Full fine-tuning (`adapter=none`) keeps float32 weights whatever the precision, for the optimizer;
    otherwise the base weights are in the compute dtype of the precision.
    """
    source = resolve_source(cfg.model, cfg.paths.cache_dir)
    if not isinstance(cfg, Config):
        if cfg.adapter_path:
            check_saved_adapter(cfg.adapter_path, base_identity(source, cfg.model))
        model = load_model(source, cfg.model, cfg.quant, compute_dtype(where.precision), where.device)
        return load_adapter(model, cfg.adapter_path, cfg.adapter.impl, cfg.merge) if cfg.adapter_path else model
    full = cfg.adapter.method is AdapterMethod.none
    sharded = cfg.trainer.strategy == "fsdp"
    dtype = torch.float32 if full else compute_dtype(where.precision)
    model = load_model(source, cfg.model, cfg.quant, dtype, where.device, sharded)
    model = attach_adapter(model, cfg.adapter, cfg.trainer.gradient_checkpointing)
    if sharded:  # FSDP flattens a unit's weights into one tensor of one dtype: the frozen ones all in `dtype`
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def quant_as_trained(cfg: DictConfig) -> str:
    """Set the `quant` of an eval.py or predict.py config to the quantization its adapter was trained on
    (`recorded_quant`), unless the command line sets `quant` or `quant.<key>` (each key set there stays, and a
    warning says where it differs from the record) or `merge=true` (a merge needs the float base); returns the
    line saying which quantization the base loads with, and why."""
    quant = cfg.quant
    given = {o.split("=", 1)[0].lstrip("+~") for o in (HydraConfig.get().overrides.task if HydraConfig.initialized()
                                                       else [])}
    given = {k for k in given if k == "quant" or k.startswith("quant.")}
    record, source = recorded_quant(cfg.adapter_path) if cfg.get("adapter_path") else (None, None)
    asked = describe_quant(quant)
    if record is None:
        why = "the adapter has no record of its base's" if cfg.get("adapter_path") else "no adapter to take it from"
        return f"base quantization: {asked}, {'as given' if given else 'the default'} ({why})"
    trained = describe_quant(record)
    if cfg.merge and not given:
        return (f"base quantization: {asked}: merge=true merges into the float base (the adapter was trained on "
                f"{trained}, {source})")
    for key, value in record.items():
        if key in quant and "quant" not in given and f"quant.{key}" not in given:
            quant[key] = value
    if not given:
        return f"base quantization: {trained}, as the adapter was trained ({source})"
    chosen = describe_quant(quant)
    if chosen != trained:
        log.warning("%s: the adapter was trained on %s (%s), not on %s; its answers and scores may differ from "
                    "training's", " ".join(sorted(given)), trained, source, chosen)
    return f"base quantization: {chosen}, as given ({' '.join(sorted(given))}; the adapter's record: {trained})"


def describe_quant(quant) -> str:
    """A quantization as words: `none`, `8-bit`, `4-bit nf4 (double quantization)`."""
    bits = quant.get("bits")
    if bits != 4:
        return f"{bits}-bit" if bits else "none"
    kind = getattr(quant.get("quant_type"), "value", quant.get("quant_type"))
    return f"4-bit {kind}" + (" (double quantization)" if quant.get("double_quant") else "")


def build(cfg: Config | EvalConfig | PredictConfig, where: Placement) -> Built:
    """Tokenizer and model together, for callers with no data to check in between (`eval.py`, scripts)."""
    if isinstance(cfg, Config):
        check_base(cfg, where)
    return Built(build_tokenizer(cfg), build_model(cfg, where))
