"""Real short training runs on a tiny Llama: quantized 8-bit and 4-bit bases, LoRA and DoRA; and the
whole `train()` pipeline with the files it leaves."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import DATA_DIR, compose_cfg
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from wandb_file import records

from finlora.adapters import attach_adapter
from finlora.batching import pad_right
from finlora.config import (
    AdapterConfig,
    AdapterMethod,
    DoraImpl,
    ModelConfig,
    QuantConfig,
    Scheduler,
    TrainerConfig,
)
from finlora.data import read_jsonl
from finlora.models import load_model, load_tokenizer
from finlora.module import FinetuneModule
from finlora.prompts import encode_example
from finlora.train import train


def _batches(tokenizer, n: int = 8) -> list[dict[str, torch.Tensor]]:
    rows = read_jsonl(DATA_DIR / "train" / "fpb_train.jsonl")[:n]
    return [pad_right([encode_example(tokenizer, r, 96) for r in rows], tokenizer.pad_token_id)]


def _build(model_dir, method: str, bits: int | None, impl: str = "peft", dropout: float = 0.0):
    cfg = ModelConfig(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(str(model_dir), cfg)
    base = load_model(str(model_dir), cfg, QuantConfig(bits=bits), torch.float32, torch.device("cpu"))
    adapter = AdapterConfig(method=AdapterMethod(method), impl=DoraImpl(impl), r=4, alpha=8, dropout=dropout,
                            target_modules=["all-linear"])
    return tokenizer, attach_adapter(base, adapter, gradient_checkpointing=False)


def _loss(model, batch: dict[str, torch.Tensor]) -> float:
    """In train mode (dropout is 0 here): in eval mode, bitsandbytes' CPU 4-bit layers repack their weight
    for inference, lossily (absmax changes), which would blur the bit-identity check below."""
    model.train()
    with torch.no_grad():
        return model(**batch).loss.item()


def _fit(model, batches, steps: int) -> None:
    """Train with Lightning on the same small batch, over and over."""
    module = FinetuneModule(model, TrainerConfig(lr=1e-2, scheduler=Scheduler.constant, max_steps=steps))
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches * steps, batch_size=None))


def _frozen_state(model) -> dict[str, torch.Tensor]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in trainable}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "dora"])  # LoRA's: 20-26 s each
def test_quantized_training_changes_only_the_adapter(tiny_model_dir, method, bits, tmp_path):
    tokenizer, model = _build(tiny_model_dir, method, bits)
    batches = _batches(tokenizer)
    before = _loss(model, batches[0])
    frozen = _frozen_state(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    _fit(model, batches, steps=15)
    after = _loss(model, batches[0])
    assert after < before - 0.3, (before, after)  # untrained, it would not move at all
    for name, value in _frozen_state(model).items():
        assert torch.equal(value, frozen[name]), f"frozen {name} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert {n for n in changed if "lora_B" in n} == {n for n in trainable if "lora_B" in n}

    # The saved adapter reloads through plain peft on the same base and gives the same logits.
    model.eval()
    with torch.no_grad():
        logits = model(**batches[0]).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in saved) == (method == "dora")
    fresh = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(bits=bits),
                       torch.float32, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batches[0]).logits, logits, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_adapter_matches_unmerged(tiny_model_dir, method):
    tokenizer, model = _build(tiny_model_dir, method, None)
    batches = _batches(tokenizer)
    _fit(model, batches, steps=5)
    model.eval()
    with torch.no_grad():
        unmerged = model(**batches[0]).logits
        merged_model = model.merge_and_unload()
        assert not any("lora" in n for n, _ in merged_model.named_parameters())
        merged = merged_model(**batches[0]).logits
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()


def test_train_pipeline_writes_a_complete_run(tiny_model_dir, tmp_path):
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "quant=8bit", "adapter=dora", "adapter.impl=peft",
                       "task=fpb", "trainer=cpu", "trainer.max_steps=6", "trainer.batch_size=4",
                       "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=1", "data.val_size=16",
                       "data.max_length=96", "logger=wandb", "eval.limit=8"], tmp_path)
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["final_val_loss"] > 0

    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 8 and config["lora_alpha"] == 16
    weights = load_file(adapter / "adapter_model.safetensors")
    mags = {k: v for k, v in weights.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == 2 * 3  # two layers × q, k, v
    assert (adapter / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 6
    assert (tmp_path / "config.yaml").read_text().count("method: dora") == 1
    assert "train/loss" in (tmp_path / "csv" / "metrics.csv").read_text()
    assert summary["test/fpb/n"] == 8 and 0 <= summary["test/fpb/accuracy"] <= 1
    assert len((tmp_path / "eval" / "fpb_predictions.jsonl").read_text().splitlines()) == 8

    # The checkpoint holds the trainable parameters and optimizer state, never the frozen base.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"][0]["state"]

    # A real W&B offline run, with the resolved config, the per-matrix parameter counts and the metrics.
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    recs = records(run_files[0])
    config = {i.key: json.loads(i.value_json) for r in recs if r.HasField("run") for i in r.run.config.update}
    assert {"adapter", "quant", "params", "trainer"} <= set(config)
    assert config["params"]["trainable"] == summary["trainable_params"]
    assert config["adapter"]["method"] == "dora"
    history = {item.key or "/".join(item.nested_key) for r in recs if r.HasField("history") for item in r.history.item}
    assert {"train/loss", "val/loss", "test/fpb/accuracy", "test/fpb/f1"} <= history
    final = {i.key: i.value_json for r in recs if r.HasField("summary") for i in r.summary.update}
    assert float(final["final_val_loss"]) == pytest.approx(summary["final_val_loss"])


def test_quantized_base_keeps_embedding_head_and_norms_in_the_compute_dtype(tiny_model_dir, tmp_path):
    """The frozen embedding and LM head stay in the dtype they were loaded in (peft's kbit preparation would make
    float32 copies: 4 GiB on Llama-3.1-8B); bf16 norms stay bf16, so the residual stream that checkpointing keeps is
    bf16, not float32; a bf16 step trains the adapter; float16 norms are upcast to float32, as peft does."""
    from transformers import AutoModelForCausalLM

    untied = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    untied.save_pretrained(tmp_path)
    load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir))).save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path))
    adapter = AdapterConfig(method=AdapterMethod.lora, r=4, alpha=8, target_modules=["q_proj"])
    base = load_model(str(tmp_path), cfg, QuantConfig(bits=4), torch.bfloat16, torch.device("cpu"))
    model = attach_adapter(base, adapter, gradient_checkpointing=True)
    inner = model.base_model.model
    assert inner.model.embed_tokens.weight.dtype == torch.bfloat16
    assert inner.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    streams = []  # the residual stream: what each layer and the final norm take in (what checkpointing keeps)
    for module in [*inner.model.layers, inner.model.norm]:
        module.register_forward_pre_hook(lambda _, args, kwargs: streams.append(
            (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), labels=torch.tensor([[1, 2, 3, 4, 5]])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert streams == [torch.bfloat16] * (len(inner.model.layers) + 1)

    half = attach_adapter(load_model(str(tmp_path), cfg, QuantConfig(bits=4), torch.float16, torch.device("cpu")),
                          adapter, gradient_checkpointing=False)
    assert {p.dtype for n, p in half.named_parameters() if "norm" in n} == {torch.float32}


@pytest.mark.parametrize("bits", [None, 4])
def test_checkpointed_adapter_gets_the_same_gradients(tiny_model_dir, bits):
    """Non-reentrant checkpointing needs no gradient on the layers' inputs: the adapter's gradients are those of
    the run without checkpointing, on a plain and on a quantized base."""
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]), "labels": torch.tensor([[1, 2, 3, 4, 5, 6]])}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = load_model(str(tiny_model_dir), cfg, QuantConfig(bits=bits), torch.float32, torch.device("cpu"))
        model = attach_adapter(base, AdapterConfig(method=AdapterMethod.lora, r=4, alpha=8, dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]), checkpointing).train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        assert grad is not None and torch.allclose(grad, grads[1][name], atol=1e-6), name
