"""Logits only where the loss is: the same loss and gradients as the model's own forward (issue 12, item 4)."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA_DIR

from finlora import loss as loss_module
from finlora.adapters import attach_adapter
from finlora.batching import model_inputs, pack, pack_static, pad_right, static_widths, with_stats
from finlora.config import AdapterConfig, AdapterMethod, ModelConfig, QuantConfig
from finlora.data import read_jsonl
from finlora.loss import answer_loss
from finlora.models import load_model, load_tokenizer
from finlora.prompts import encode_example


def _model(model_dir, method: str, bits: int | None):
    cfg = ModelConfig(name_or_path=str(model_dir))
    base = load_model(str(model_dir), cfg, QuantConfig(bits=bits), torch.float32, torch.device("cpu"))
    if method == "full":
        return base.train()
    model = attach_adapter(base, AdapterConfig(method=AdapterMethod(method), r=4, dropout=0.0,
                                               target_modules=["all-linear"]), gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 would leave A without gradient
    return model.train()


def _grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    value = compute()
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,bits,batching,chunk", [
    *((m, b, batching, chunk) for m, b in [("lora", None), ("dora", None), ("lora", 8), ("full", None)]
      for batching in ("padded", "packed") for chunk in (4096, 7)),
    ("dora", None, "static", 7), ("lora", 8, "static", 4096)])  # static: loss positions from the batch
def test_answer_loss_equals_the_models_own(tiny_model_dir, method, bits, batching, chunk, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", chunk)  # 7: many chunks, each recomputed in backward
    tokenizer = load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)))
    rows = read_jsonl(DATA_DIR / "train" / "fiqa_train.jsonl")[:6]
    encoded = [encode_example(tokenizer, r, 128) for r in rows]
    pad = tokenizer.pad_token_id
    if batching == "static":  # loss positions found on the host, padded to a fixed count with ignored labels
        batch = with_stats(lambda b: pack_static(b, pad, static_widths(6, 128)), encoded, label_slots=64)
    else:  # no loss positions: answer_loss finds them itself
        batch = pad_right(encoded, pad) if batching == "padded" else pack(encoded, pad, 256)
    model = _model(tiny_model_dir, method, bits)
    ref_loss, ref_grads = _grads(model, lambda: model(**model_inputs(batch)).loss)
    loss, grads = _grads(model, lambda: answer_loss(model, batch))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_packed_rows_get_the_mask_transformers_builds(tiny_model_dir):
    """The block-causal mask made for packed rows is the one transformers makes from the same positions
    (after its check for packing, which waits for the GPU); the decoder gets it instead of building its own."""
    from transformers.masking_utils import find_packed_sequence_indices, packed_sequence_mask_function

    from finlora.loss import block_causal_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 0, 1, 2]])
    mask = block_causal_mask(positions)
    packed = find_packed_sequence_indices(positions)
    width = positions.shape[1]
    expected = torch.tensor([[[packed_sequence_mask_function(packed)(b, 0, q, k) and k <= q for k in range(width)]
                              for q in range(width)] for b in range(2)])
    assert mask.shape == (2, 1, width, width) and torch.equal(mask[:, 0], expected)

    tokenizer = load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)))
    encoded = [encode_example(tokenizer, r, 128) for r in read_jsonl(DATA_DIR / "train" / "fiqa_train.jsonl")[:4]]
    batch = pack(encoded, tokenizer.pad_token_id, 256)
    model = _model(tiny_model_dir, "lora", None)
    seen = []
    decoder = model.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                             with_kwargs=True)
    answer_loss(model, batch)
    hook.remove()
    assert torch.equal(seen[0], block_causal_mask(batch["position_ids"]))
