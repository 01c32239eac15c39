"""LoRA's dropout keeping x and a mask, not a dropped copy (`finlora.lora_dropout`): the same function and gradients as
peft's `B·A·dropout(x)` from the same random numbers, one copy of the layer input kept for q, k and v instead of
three, merging and saving as vanilla LoRA, and on CUDA a 4-bit layer's step equal to peft's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_b
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from finlora.adapters import attach_adapter
from finlora.config import AdapterConfig, AdapterMethod, ModelConfig, QuantConfig
from finlora.lora_dropout import DroppedLoraVariant, dropped_product, use_dropped_product
from finlora.models import load_model

P = 0.3


def test_dropped_product_is_dropout_then_a_with_its_gradients():
    """From the same seed: the output, x's and A's gradients of `F.linear(F.dropout(x), A)`, exactly (float32)."""
    x = torch.randn(2, 7, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    grad = torch.randn(2, 7, 4)
    results = []
    for fn in (lambda: F.linear(F.dropout(x, P, True), a), lambda: dropped_product(x, a, torch.nn.Dropout(P), True)):
        torch.manual_seed(3)
        y = fn()
        results.append((y, *torch.autograd.grad(y, (x, a), grad)))
    for ours, peft_s in zip(results[1], results[0], strict=True):
        assert torch.equal(ours, peft_s)
    assert not torch.equal(results[0][0], F.linear(x, a))  # dropout did drop


def test_dropped_product_under_autocast_computes_in_bf16_and_returns_gradients_in_the_inputs_dtypes():
    """As autocast's linear: a bf16 product of a float32 A, A's gradient back in float32, x's in x's dtype; outside
    training, or with `nn.Identity`, the plain product."""
    a = torch.randn(4, 16, requires_grad=True)
    for x_dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(5, 16, dtype=x_dtype, requires_grad=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dropped_product(x, a, torch.nn.Dropout(P), True)
            torch.manual_seed(0)
            reference = F.linear(F.dropout(x, P, True), a)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2)
        gx, ga = torch.autograd.grad(y.float().sum(), (x, a))
        assert gx.dtype == x_dtype and ga.dtype == torch.float32
    x = torch.randn(5, 16)
    for dropout, training in ((torch.nn.Dropout(P), False), (torch.nn.Identity(), True)):
        assert torch.equal(dropped_product(x, a, dropout, training), F.linear(x, a))


class _QKV(torch.nn.Module):
    """Three projections of one input, as an attention block's q, k and v."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.k(x) + self.v(x)


def _kept_for_backward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    return saved


def test_q_k_and_v_keep_their_input_once_and_a_mask_each():
    """peft keeps three dropped copies of the shared input (one per adapter) and their masks; with the variant
    autograd keeps the input itself, once, and three one-byte masks."""
    torch.manual_seed(0)
    peft_s = get_peft_model(_QKV(), LoraConfig(r=4, target_modules=["q", "k", "v"], lora_dropout=P))
    ours = copy.deepcopy(peft_s)
    assert use_dropped_product(ours) == 3
    x = torch.randn(6, 32, requires_grad=True)
    storages = {}
    for name, model in (("peft", peft_s), ("ours", ours)):
        model.train()
        kept = [t for t in _kept_for_backward(model, x) if t.shape == x.shape]
        storages[name] = {(t.untyped_storage().data_ptr(), t.dtype) for t in kept}
    masks = {s for s in storages["ours"] if s[1] == torch.bool}
    inputs = storages["ours"] - masks
    assert len(masks) == 3 and inputs == {(x.untyped_storage().data_ptr(), x.dtype)}, storages["ours"]
    copies = {s for s in storages["peft"] if s[1] == x.dtype and s[0] != x.untyped_storage().data_ptr()}
    assert len(copies) == 6, storages["peft"]  # three dropped copies and, on the CPU, three float32 masks


def _lora_pair(tiny_model_dir, dropout: float = P) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny Llama with the same LoRA adapter (random B) twice: peft's, and with `DroppedLoraVariant`."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=dropout)
    torch.manual_seed(0)
    peft_s = random_b(get_peft_model(base, config))
    ours = copy.deepcopy(peft_s)
    use_dropped_product(ours)
    return peft_s, ours


def test_a_lora_model_trains_as_peft_s_from_the_same_random_numbers(tiny_model_dir):
    """In training the loss and every adapter gradient are peft's (the same dropout masks); in eval the logits."""
    peft_s, ours = _lora_pair(tiny_model_dir)
    batch = {"input_ids": torch.tensor([[5, 9, 2, 7, 3, 8, 4]]), "labels": torch.tensor([[5, 9, 2, 7, 3, 8, 4]])}
    losses = []
    for model in (peft_s, ours):
        model.train()
        torch.manual_seed(7)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    trained = [(n, p) for n, p in peft_s.named_parameters() if p.requires_grad]
    assert trained
    for (name, p), q in zip(trained, (q for q in ours.parameters() if q.requires_grad), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    peft_s.eval()
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, peft_s(**batch).logits)


def test_merging_and_saving_are_vanilla_lora_s(tiny_model_dir, tmp_path):
    """Merged weights are peft's own merge; unmerging restores the base; the saved adapter is a plain LoRA adapter
    that peft loads and that gives the trained model's logits."""
    peft_s, ours = _lora_pair(tiny_model_dir)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_variant["default"], DroppedLoraVariant)
    base_weight = layer.get_base_layer().weight.detach().clone()
    for safe in (True, False):
        layer.merge(safe_merge=safe)
        reference = copy.deepcopy(peft_s.base_model.model.model.layers[0].self_attn.q_proj)
        reference.merge(safe_merge=safe)
        assert torch.equal(layer.get_base_layer().weight, reference.get_base_layer().weight)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base_weight)
    ours.save_pretrained(tmp_path)
    ours.eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       tmp_path)
    assert not loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_variant
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():  # after a merge and an unmerge: the base weight within float32 rounding
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_attach_adapter_gives_lora_with_dropout_the_variant_only(tiny_model_dir):
    """LoRA with dropout: every adapted layer; dropout 0: none (peft's Identity); DoRA keeps its own variant."""
    def variants(dropout: float, method: AdapterMethod) -> set[type]:
        model = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(),
                           torch.float32, torch.device("cpu"))
        wrapped = attach_adapter(model, AdapterConfig(method=method, r=4, alpha=8, dropout=dropout),
                                 gradient_checkpointing=False)
        return {type(v) for m in wrapped.modules() for v in getattr(m, "lora_variant", {}).values()}

    assert variants(0.1, AdapterMethod.lora) == {DroppedLoraVariant}
    assert variants(0.0, AdapterMethod.lora) == set()
    assert DroppedLoraVariant not in variants(0.1, AdapterMethod.dora)


def test_dropped_product_is_traced_whole_by_dynamo():
    """Compiled regions trace the adapter's dropout and product in the layer's graph, backward included."""
    a = torch.randn(4, 16, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(lambda x, a: dropped_product(x, a, torch.nn.Dropout(P), True), backend="aot_eager",
                             fullgraph=True)
    y = compiled(x, a)
    gx, ga = torch.autograd.grad(y.sum(), (x, a))
    assert gx.shape == x.shape and ga.shape == a.shape and torch.isfinite(ga).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_4bit_lora_step_is_peft_s_and_keeps_the_input_once(tiny_model_dir):
    """A 4-bit base on CUDA under bf16 autocast: from the same seed the loss and the adapter gradients are peft's
    own, and the attention block's q, k and v keep one bf16 input and three masks, where peft keeps three copies."""
    cuda = torch.device("cuda")
    models = []
    for variant in (False, True):
        model = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(bits=4),
                           torch.bfloat16, cuda)
        torch.manual_seed(0)
        wrapped = attach_adapter(model, AdapterConfig(method=AdapterMethod.lora, r=4, alpha=8, dropout=P),
                                 gradient_checkpointing=False)
        if not variant:
            for m in wrapped.modules():
                getattr(m, "lora_variant", {}).clear()
        models.append(random_b(wrapped).train())
    ids = torch.tensor([[5, 9, 2, 7, 3, 8, 4, 6] * 4], device=cuda)
    results = []
    for model in models:
        torch.manual_seed(11)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((loss, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for ours, peft_s in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(ours, peft_s, rtol=1e-3, atol=1e-6)
    hidden = torch.randn(1, 32, 64, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    kept = {}
    for name, model in zip(("peft", "ours"), models, strict=True):
        attention = model.base_model.model.model.layers[0].self_attn
        with torch.autocast("cuda", dtype=torch.bfloat16):
            kept[name] = [t for t in _kept_for_backward(lambda h, a=attention: a.q_proj(h).sum() + a.k_proj(h).sum()
                                                        + a.v_proj(h).sum(), hidden) if t.numel() == hidden.numel()]
    assert sum(t.dtype == torch.bfloat16 and t.data_ptr() != hidden.data_ptr() for t in kept["peft"]) == 3
    assert {t.data_ptr() for t in kept["ours"] if t.dtype == torch.bfloat16} == {hidden.data_ptr()}
    assert sum(t.dtype == torch.bool for t in kept["ours"]) == 3
