"""The one build step: a validated config → where it runs, and the tokenizer and model ready to train or
evaluate. `train`, `eval.py` and every script under `scripts/` build through here, so a model is never
put together two ways.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from finlora.adapters import attach_adapter, load_adapter
from finlora.config import AdapterMethod, Config, EvalConfig
from finlora.devices import Placement, resolve_device
from finlora.models import compute_dtype, load_model, load_tokenizer, resolve_source


class Built(NamedTuple):
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module


def placement(cfg: Config | EvalConfig) -> Placement:
    """Accelerator, precision and device for the config, refusing combinations known to fail; cheap, so
    callers run it before reading data or loading anything."""
    asked = cfg.trainer if isinstance(cfg, Config) else cfg
    return resolve_device(asked.accelerator, asked.precision, cfg.quant.bits)


def build(cfg: Config | EvalConfig, where: Placement) -> Built:
    """The base model (converted, quantized as asked) on `where.device`, with the training adapter of a
    `Config` or the saved adapter of an `EvalConfig`, and its tokenizer.

    Full fine-tuning (`adapter=none`) keeps float32 weights whatever the precision, for the optimizer;
    otherwise the base weights are in the compute dtype of the precision.
    """
    source = resolve_source(cfg.model, cfg.paths.cache_dir)
    if isinstance(cfg, EvalConfig):
        tokenizer = load_tokenizer(cfg.adapter_path or source, cfg.model)
        model = load_model(source, cfg.model, cfg.quant, compute_dtype(where.precision), where.device)
        if cfg.adapter_path:
            model = load_adapter(model, cfg.adapter_path, cfg.adapter.impl, cfg.merge)
        return Built(tokenizer, model)
    tokenizer = load_tokenizer(source, cfg.model)
    full = cfg.adapter.method is AdapterMethod.none
    dtype = torch.float32 if full else compute_dtype(where.precision)
    model = load_model(source, cfg.model, cfg.quant, dtype, where.device)
    return Built(tokenizer, attach_adapter(model, cfg.adapter, cfg.trainer.gradient_checkpointing))
