"""`export(cfg)`, which `export.py` runs: a saved adapter merged into the base it was trained on, written as a
transformers folder (`format=merged`) or a GGUF file (`format=gguf`), each with a Hub model card, and uploaded to
the Hub on `push_to_hub`.

The base is the one the adapter's record names (`adapters.read_saved_adapter`), checked to be the same weights,
and loaded unquantized in 16 bits whatever the training quantized: an adapter trained on an 8-bit or 4-bit base
is merged into the unquantized weights, as QLoRA's merge does. Each adapted layer is merged in float32, then the
model is cast to 16 bits, one rounding. Everything that can be refused (the folder, the output, the push, GGUF's
architecture and tokenizer) is refused before the base loads; the output folder is written whole or not at all.

The GGUF writer follows llama.cpp's `convert_hf_to_gguf.py` for Llama (`LlamaModel`): tensors named by gguf-py's
map, q/k rows permuted to llama.cpp's rotary layout (transformers' GGUF loader undoes it), norms and other vectors
in float32, matrices in the chosen type, a tied output layer left out; the byte-level BPE tokenizer as `gpt2` with
its merges, special ids and chat template (`gguf.SpecialVocab`), and `tokenizer.ggml.pre` found as llama.cpp finds
it, by hashing the tokens of its check text.
"""

from __future__ import annotations

import logging
import os
from hashlib import sha256
from pathlib import Path

import gguf
import torch
from omegaconf import DictConfig
from peft.tuners.lora import LoraLayer
from transformers import PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from finlora.adapters import SavedAdapter, check_saved_adapter, load_adapter, read_saved_adapter
from finlora.card import write_export_card
from finlora.config import DoraImpl, ExportConfig, ExportFormat, GgufType, ModelConfig, QuantConfig, validate
from finlora.errors import ConfigError
from finlora.models import base_identity, load_model, load_tokenizer, model_config, resolve_source
from finlora.outputs import atomic_dir, write_json

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
GGUF_TYPES = {GgufType.f16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              GgufType.bf16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
              GgufType.q8_0: (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
GGUF_ARCHITECTURES = ("LlamaForCausalLM",)
# llama.cpp's `get_vocab_base_pre`: the sha256 of str(tokenizer.encode(CHECK_TEXT)) names the pre-tokenizer.
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
              "concatenated) ✅ 🦙🦙 "
              "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
              "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
                  "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe"}  # Llama 3, 3.1


def export(dict_cfg: DictConfig) -> dict:
    """Merge, write and (on `push_to_hub`) upload; return what was written."""
    cfg = validate(dict_cfg, ExportConfig)
    saved = read_saved_adapter(cfg.adapter_path)
    if cfg.push_to_hub:
        check_push(cfg.push_to_hub)
    model_cfg = ModelConfig(name_or_path=saved.base["name_or_path"], revision=saved.base.get("revision"))
    source = resolve_source(model_cfg, cfg.paths.cache_dir)
    config = model_config(source, model_cfg)
    tokenizer = load_tokenizer(str(saved.path), model_cfg)
    pre = gguf_tokenizer_pre(config, tokenizer) if cfg.format is ExportFormat.gguf else None
    check_saved_adapter(cfg.adapter_path, base_identity(source, model_cfg))

    dtype = DTYPES[cfg.dtype.value if cfg.format is ExportFormat.merged else
                   "bf16" if cfg.gguf_type is GgufType.bf16 else "f16"]
    model = merged_model(saved, source, model_cfg, dtype)
    target = cfg.target
    with atomic_dir(target) as tmp:
        if cfg.format is ExportFormat.merged:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = sorted(p.name for p in tmp.iterdir())
        else:
            name = f"{saved.run_name}-{GGUF_TYPES[cfg.gguf_type][0].name}.gguf"
            write_gguf(model, tokenizer, pre, tmp / name, cfg.gguf_type, saved.run_name)
            files = [name]
        write_export_card(tmp, saved, cfg.format.value, files[0] if cfg.format is ExportFormat.gguf else None)
    summary = {"format": cfg.format.value, "out_dir": str(target), "files": files, "dtype": str(dtype),
               "gguf_type": cfg.gguf_type.value if cfg.format is ExportFormat.gguf else None,
               "base": saved.base["name_or_path"], "trained_on_bits": saved.quant_bits, "pushed_to": None}
    if cfg.push_to_hub:
        summary["pushed_to"] = push(target, cfg.push_to_hub, cfg.private)
    write_json(Path(cfg.output_dir) / "export.json", summary)
    print(f"exported {saved.path} ({saved.method}) merged into {saved.base['name_or_path']} as {cfg.format.value}: "
          f"{target}" + (f"; pushed to {summary['pushed_to']}" if summary["pushed_to"] else ""))
    return summary


def merged_model(saved: SavedAdapter, source: str, model_cfg: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The base unquantized in `dtype` with the adapter folded in: each adapted layer's weight is merged in
    float32 (peft's merge, LoRA's or DoRA's), then the model is cast to `dtype`. On the CPU: merging is cheap, and
    a base in 16 bits takes 2 bytes a parameter of memory."""
    if saved.quant_bits:
        log.info("the base was %d-bit when the adapter was trained; it is merged into the unquantized base weights",
                 saved.quant_bits)
    base = load_model(source, model_cfg, QuantConfig(), dtype, torch.device("cpu"))
    peft_model = load_adapter(base, str(saved.path), DoraImpl.peft, merge=False)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.get_base_layer().weight.data = module.get_base_layer().weight.data.float()
    model = peft_model.merge_and_unload().to(dtype)
    model.config.use_cache = True  # `load_model` turns it off for training; generation wants it
    return model


def check_push(repo_id: str) -> None:
    """Refuse, before any work, an upload that cannot happen: offline, or no token."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded to {repo_id}; export "
                          "without push_to_hub, then upload the folder online (`hf upload`), or unset HF_HUB_OFFLINE")
    if get_token() is None:
        raise ConfigError(f"push_to_hub: no Hugging Face token to upload to {repo_id} with; set HF_TOKEN or run "
                          "`hf auth login`")


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the folder to a model repo (created if missing); return the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=f"finlora export of {folder.name}")
    return str(url)


def gguf_tokenizer_pre(config: PretrainedConfig, tokenizer: Tokenizer) -> str:
    """The `tokenizer.ggml.pre` of a model finlora can write as GGUF; refuses, before the base loads, an
    architecture or tokenizer it cannot."""
    arch = (config.architectures or [config.model_type])[0]
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"format=gguf: the base is a {arch}; finlora writes GGUF for {', '.join(GGUF_ARCHITECTURES)} "
                          "only: export format=merged, then convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ConfigError(f"format=gguf: rope_type {rope['rope_type']!r} in the base's config is not one finlora "
                          "writes (default, llama3): export format=merged, then use llama.cpp's convert_hf_to_gguf.py")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(backend.decoder).__name__ if backend is not None and backend.decoder is not None else None
    if decoder != "ByteLevel":
        raise ConfigError("format=gguf: the tokenizer is not a byte-level BPE (GPT-2 style, as Llama 3 and SmolLM "
                          "have), the only kind finlora writes as GGUF: export format=merged, then use llama.cpp's "
                          "convert_hf_to_gguf.py")
    digest = sha256(str(tokenizer.encode(CHECK_TEXT, add_special_tokens=False)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ConfigError(f"format=gguf: the tokenizer's pre-tokenizer (check hash {digest[:16]}…) is not one finlora "
                          f"knows ({', '.join(PRE_TOKENIZERS.values())}); llama.cpp needs its name in "
                          "tokenizer.ggml.pre: export format=merged, then use llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[digest]


def permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary layout (halves) → llama.cpp's (interleaved pairs), per head, for q or k rows."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def llama3_rope_factors(config: PretrainedConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` tensor for Llama 3.1's rope scaling (rope_type llama3): one factor per frequency."""
    rope = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * torch.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / high, torch.ones_like(freqs), torch.where(wavelen > old / low, factor, mid))


def write_gguf(model: PreTrainedModel, tokenizer: Tokenizer, pre: str, path: Path, kind: GgufType, name: str) -> None:
    """A Llama model and its tokenizer as one GGUF file of `kind`."""
    c = model.config
    qtype, file_type = GGUF_TYPES[kind]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, tokenizer, pre, c.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    tensors = [(n, t) for n, t in model.state_dict().items() if not (n == "lm_head.weight" and c.tie_word_embeddings)]
    if c.rope_parameters.get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(c)))
    for hf_name, tensor in tensors:
        gguf_name = hf_name if hf_name == "rope_freqs.weight" else names.get_name(hf_name, try_suffixes=(".weight",
                                                                                                          ".bias"))
        if gguf_name is None:
            raise ConfigError(f"format=gguf: no GGUF name for the tensor {hf_name}")
        data = tensor.detach().float()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rotary(data, c.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rotary(data, c.num_key_value_heads)
        array = data.numpy()
        tensor_type = gguf.GGMLQuantizationType.F32 if array.ndim <= 1 or gguf_name.endswith("_norm.weight") else qtype
        try:
            packed = gguf.quants.quantize(array, tensor_type)
        except gguf.QuantError:  # a row whose length is not a multiple of Q8_0's 32-weight block
            tensor_type = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(array, tensor_type)
        writer.add_tensor(gguf_name, packed, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, pre: str, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's `gpt2` model: every id's token and type (ids beyond the tokenizer's as unused
    `[PAD<i>]`), the merges, the special ids, whether BOS/EOS are added, and the chat template."""
    import tempfile

    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].special or (vocab[i].startswith("<|") and vocab[i].endswith("|>"))
            tokens.append(vocab[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads the saved tokenizer files
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    ids = tokenizer("a").input_ids
    special.add_special_token.setdefault("bos", bool(ids) and ids[0] == tokenizer.bos_token_id)
    special.add_special_token.setdefault("eos", bool(ids) and ids[-1] == tokenizer.eos_token_id)
    special.add_to_gguf(writer)
