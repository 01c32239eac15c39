"""RMSNorms as torch's fused kernel (`finlora.norms`): the same outputs and gradients as transformers' norms, a
norm of other arithmetic left alone, and on CUDA no float32 copy of the activation kept for backward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from finlora.adapters import attach_adapter
from finlora.config import AdapterConfig, AdapterMethod, ModelConfig, QuantConfig
from finlora.models import load_model
from finlora.norms import FusedRMSNorm, fuse_rms_norms


def _norms(model: torch.nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}


def _with_uneven_norm_weights(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_fused_norms_give_the_model_its_own_outputs_and_gradients(tiny_model_dir):
    """Every norm of the Llama (two a layer and the final one) is replaced; the state dict keeps its keys; float32
    logits and every gradient (norm weights included) are transformers' own, bf16 logits within bf16 rounding."""
    batch = {"input_ids": torch.tensor([[5, 9, 2, 7, 3, 8]]), "labels": torch.tensor([[5, 9, 2, 7, 3, 8]])}
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        own = _with_uneven_norm_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype))
        fused = _with_uneven_norm_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype))
        keys = list(fused.state_dict())
        assert fuse_rms_norms(fused) == 2 * fused.config.num_hidden_layers + 1
        assert set(_norms(fused).values()) == {FusedRMSNorm} and list(fused.state_dict()) == keys
        out_own, out_fused = own(**batch), fused(**batch)
        torch.testing.assert_close(out_fused.logits, out_own.logits, rtol=tolerance, atol=tolerance)
        assert out_fused.logits.dtype == out_own.logits.dtype
        if dtype is torch.float32:
            out_own.loss.backward()
            out_fused.loss.backward()
            for (name, p), q in zip(own.named_parameters(), fused.parameters(), strict=True):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_norm_returns_the_dtype_transformers_returns_under_autocast():
    """Outside autocast inside: a bf16 input with a bf16 weight stays bf16 under bf16 autocast (autocast would run
    rms_norm in float32), and a float32 input or weight gives float32, as transformers' `weight * x.to(dtype)`."""
    for x_dtype, w_dtype, expected in ((torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                       (torch.float32, torch.bfloat16, torch.float32),
                                       (torch.bfloat16, torch.float32, torch.float32)):
        norm = FusedRMSNorm(torch.nn.Parameter(torch.ones(8, dtype=w_dtype)), 1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert norm(torch.randn(3, 8, dtype=x_dtype)).dtype == expected


def test_a_norm_of_other_arithmetic_keeps_its_forward():
    """Gemma's norm scales by `1 + weight`: the probe sees another output, and the module stays."""
    model = torch.nn.ModuleDict({"norm": GemmaRMSNorm(16)})
    assert fuse_rms_norms(model) == 0
    assert type(model["norm"]) is GemmaRMSNorm


def test_fused_norm_is_traced_whole_by_dynamo():
    """Compiled regions trace the norm inside each layer: no graph break (autocast's context included)."""
    norm = FusedRMSNorm(torch.nn.Parameter(torch.rand(16, dtype=torch.bfloat16) + 0.5), 1e-6)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), norm(x))


def test_the_cpu_keeps_transformers_norms(tiny_model_dir):
    """On the CPU torch's rms_norm is a composite that keeps more float32 copies than transformers' norm."""
    model = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(),
                       torch.bfloat16, torch.device("cpu"))
    assert FusedRMSNorm not in set(_norms(model).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_quantized_base_runs_fused_norms_that_keep_no_float32_copy(tiny_model_dir):
    """`load_model` on CUDA fuses every norm of a 4-bit base; in a bf16 step under autocast a fused norm keeps for
    backward its bf16 input itself and a float32 scale per row, where transformers' norm keeps a float32 copy of
    the input; its output and input gradient are transformers' within bf16 rounding; Dynamo traces it whole."""
    cuda = torch.device("cuda")
    model = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(bits=4),
                       torch.bfloat16, cuda)
    assert set(_norms(model).values()) == {FusedRMSNorm}
    attach_adapter(model, AdapterConfig(method=AdapterMethod.lora, r=4, alpha=8, target_modules=["q_proj"]),
                   gradient_checkpointing=True)
    fused = model.model.norm
    own = LlamaRMSNorm(64, fused.eps).to(cuda, torch.bfloat16)
    own.weight.data.copy_(fused.weight.data)
    x = torch.randn(256, 64, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    results = {name: _step_keeping(norm, x) for name, norm in (("own", own), ("fused", fused))}
    assert any(t.dtype == torch.float32 and t.numel() == x.numel() for t in results["own"][2])
    kept = results["fused"][2]
    assert any(t.data_ptr() == x.data_ptr() for t in kept), [(t.dtype, t.shape) for t in kept]
    assert all(t.numel() <= x.shape[0] for t in kept if t.dtype == torch.float32), [(t.dtype, t.shape) for t in kept]
    torch.testing.assert_close(results["fused"][0], results["own"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results["fused"][1], results["own"][1], rtol=3e-2, atol=3e-2)
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), fused(x))


def _step_keeping(norm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The norm's output under bf16 autocast, the input's gradient, and what autograd kept for backward."""
    saved = []
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = norm(x)
    (grad,) = torch.autograd.grad(y.float().square().sum(), x)
    return y, grad, saved
