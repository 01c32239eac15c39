"""Shared fixtures: the real FinLoRA data from ../shared, a tiny random Llama with SmolLM2's real
tokenizer (saved as a local model folder, so the real local-path loading code is exercised), and
Hydra composition of the real configs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from finlora.adapter_steps import after_optimizer_step
from finlora.adapters import attach_adapter
from finlora.batching import pack_static, static_widths, with_stats
from finlora.config import AdapterConfig, AdapterMethod, register_schemas
from finlora.prompts import Encoded

register_schemas()  # the config schemas with Hydra, as the run entry registers them

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FINLORA_DATA_DIR", ROOT.parent / "shared" / "data" / "finlora"))


# A skipif whose reason speaks of CUDA or GPUs (e.g. `not torch.cuda.is_available()`, `device_count() < 2`), or whose
# condition string does: such a test runs only on a GPU machine.
GPU_SKIP = re.compile(r"\b(CUDA|GPUs?)\b|cuda\.(is_available|device_count)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every test that is skipped without a CUDA GPU with `gpu`, so `pytest -m gpu` selects exactly those
    (scripts/gpu_gate.py runs them on a GPU machine); a test may also say `@pytest.mark.gpu` itself."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
            said = f"{mark.kwargs.get('reason', '')} {condition if isinstance(condition, str) else ''}"
            if GPU_SKIP.search(said):
                item.add_marker(pytest.mark.gpu)
                break


@pytest.fixture(autouse=True, scope="session")
def _offline_env():
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FINLORA_DATA_DIR"] = str(DATA_DIR)
    # Commands run as subprocesses (train.py, scripts) import this checkout's finlora, not an installed copy.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to the shared cache."""
    from finlora.models import convert_embedded

    return convert_embedded("smollm2-135m-instruct", Path.home() / ".cache" / "finlora")


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    """SmolLM2's tokenizer: from the embedded model, or from the folder `FINLORA_TEST_TOKENIZER` names (a GPU
    machine without the embedded model's package runs the tiny-model tests so)."""
    folder = os.environ.get("FINLORA_TEST_TOKENIZER")
    return Path(folder) if folder else request.getfixturevalue("smollm_dir")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer, saved like any local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lively_weights(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (the tiny Llama) with weights large enough that different prompts get different greedy answers
    (at the usual init scale every prompt gets the same few tokens, which would prove nothing)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25 if "embed" in name else 0.15)
    return model


@pytest.fixture(scope="session")
def lively_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with the `lively` weights, saved, so that it loads quantized like any checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lively_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    path = tmp_path_factory.mktemp("lively")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def weightless(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's config and tokenizer, no weights: what a check made before the model loads needs
    (had loading begun, it would fail)."""
    path = tmp_path_factory.mktemp("weightless")
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, path)
    return path


@pytest.fixture(scope="module")
def lively(tiny_model_dir):
    """The tokenizer and the tiny Llama with `lively_weights`, in float32 on the CPU."""
    from finlora.config import ModelConfig, QuantConfig
    from finlora.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), cfg, QuantConfig(), torch.float32, torch.device("cpu"))
    return load_tokenizer(str(tiny_model_dir), cfg), lively_weights(model)


def random_b(model):
    """B = 0 would leave A without gradient and DoRA's norms equal to the base's."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def step_each(models, computes, optimizers) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One optimizer step of each model on its own loss: the losses and the gradients before the step."""
    losses, grads = [], []
    for model, compute, opt in zip(models, computes, optimizers, strict=True):
        opt.zero_grad()
        loss = compute()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        after_optimizer_step(model)  # as the LightningModule does: fused optimizers bump no version counters
    return losses, grads


def random_llama(layers: int, method: AdapterMethod, checkpointing: bool):
    """A random Llama of `layers` layers (same seed, same weights) with LoRA or finlora's DoRA on q/k/v."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = attach_adapter(LlamaForCausalLM(config), AdapterConfig(method=method, r=4, dropout=0.0), checkpointing)
    return random_b(model)


def random_static_batch(lengths: tuple[int, ...] = (20, 28, 16), seed: int = 1) -> dict[str, torch.Tensor]:
    """A static batch of random examples of these lengths (4 answer tokens each) packed in one row, as the
    training loop gets it: rows of 64 tokens, or 128 or 192 for longer examples."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [-100] * (n - 4) + ids[-4:], False))
    batch = with_stats(lambda b: pack_static(b, 0, static_widths(3, 32, smallest=64)), examples, label_slots=16)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def compose_cfg(overrides: list[str], output_dir: Path | None = None, config: str = "train") -> DictConfig:
    """The real configs composed as `python train.py OVERRIDES` (or eval.py, with config="eval") would,
    with the hydra node set and removed."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        extra = [f"output_dir={output_dir}"] if output_dir else []
        cfg = compose(config, overrides=overrides + extra, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
