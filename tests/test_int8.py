"""Weight-only int8 compute (`finlora.quant.int8`): the dequantized reference's outputs and gradients, DoRA's
norm from the same dequantized weight, and the step path the defaults resolve to (`finlora.plan`)."""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch
from test_dora import dora_layers, eval_out, fast, make_dora, rel, run, x_for
from torch import nn

from finlora.config import Batching, Compile, validate
from finlora.dora import forget_norms
from finlora.dora.layer import variant_kwargs_only as _variant_kwargs_only
from finlora.dora.state import state_of
from finlora.plan import REGIONS_MIN_STEPS, plan_step
from finlora.quant.int8 import WeightOnlyLinear8bit, dequantize_int8, int8_rows, use_weight_only_int8


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """`model` with each 8-bit layer replaced by an nn.Linear holding its dequantized weight in float32."""
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear8bitLt):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight = nn.Parameter(dequantize_int8(*int8_rows(module), torch.float32), requires_grad=False)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.data.float().clone(), requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, plain)
    return model


@pytest.mark.parametrize("kind", ["fp32", "autocast"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_weight_only_int8_gives_the_dequantized_references_outputs_and_gradients(method: str, kind: str) -> None:
    """An 8-bit model switched to weight-only compute gives the output and gradients (adapters' and input's) of the
    same model on the dequantized weights; under DoRA each layer takes its norm from the same product in training."""

    def model() -> nn.Module:
        m = make_dora("int8")
        if method == "lora":  # the same adapter weights, without the magnitude
            for layer in dora_layers(m):
                del layer.lora_variant["default"]
                layer.lora_magnitude_vector["default"].weight.requires_grad_(False)
        return m

    ours = model()
    assert use_weight_only_int8(ours) == 2
    bases = [m.base_layer for m in ours.modules() if hasattr(m, "base_layer")]
    assert len(bases) == 2 and all(type(base) is WeightOnlyLinear8bit for base in bases)
    if method == "dora":
        fast(ours)
        assert {type(layer).__name__ for layer in dora_layers(ours)} == {"DoraLinear8bit"}
    reference = _dequantized_copy(model())
    if method == "dora":
        fast(reference)
    x = x_for("fp32")
    out, grads = run(ours, x, kind)
    want_out, want = run(reference, x, kind)
    close = 1e-5 if kind == "fp32" else 3e-2
    assert rel(out, want_out) < close
    assert set(grads) == set(want) and any("lora_A" in n for n in grads)
    for name in want:
        assert rel(grads[name], want[name]) < close, name
    if method == "dora":  # in training, the norm came from the layer's own product: only A·Aᵀ was cached
        assert all("default" not in state_of(layer).constants for layer in dora_layers(ours))
        assert rel(eval_out(ours, x, kind), eval_out(reference, x, kind)) < close


def test_weight_only_int8_dora_matches_peft_over_steps() -> None:
    """Two SGD steps of DoRA on a weight-only 8-bit base follow peft's DoRA on the dequantized fp32 base."""
    ours, theirs = fast(make_dora("int8")), make_dora("int8")
    use_weight_only_int8(ours)
    theirs = _dequantized_copy(theirs)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (ours, theirs)]
    x = x_for("fp32")
    for _ in range(2):
        forget_norms(ours)
        (out, grads), (want_out, want) = run(ours, x), run(theirs, x)
        assert rel(out, want_out) < 1e-5
        for name in want:
            assert rel(grads[name], want[name]) < 1e-5, name
        for opt in opts:
            opt.step()


@pytest.mark.gpu  # the GPU gate runs it under the GPU image's torch
def test_variant_keyword_check_traces_in_dynamo() -> None:
    """The 4-bit/8-bit forward's keyword check compiles without a graph break (torch 2.11's Dynamo failed on the
    `kwargs.keys() - frozenset` form)."""

    def check(x: torch.Tensor, **kwargs) -> torch.Tensor:
        return x + 1 if _variant_kwargs_only((), kwargs) else x - 1

    compiled = torch.compile(check, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1), alora_offsets=None).item() == 1
    assert compiled(torch.zeros(1), other=None).item() == -1


CUDA, CPU = "cuda", "cpu"


def _plan(overrides: list[str], where: str, rows: int = 1000, tmp_path=None):
    from conftest import compose_cfg

    cfg = validate(compose_cfg(overrides, tmp_path))
    return cfg, plan_step(cfg, where, rows)


@pytest.mark.parametrize("quant", ["none", "8bit", "4bit"])
def test_defaults_resolve_to_the_recorded_step_on_a_gpu(quant: str, tmp_path) -> None:
    """No flags: on a GPU the step is recorded on static batches (8-bit through weight-only compute), and the decoder
    layers are compiled too once the run is long enough; on the CPU it runs eager on packed batches."""
    cfg, plan = _plan([f"quant={quant}"], CUDA, tmp_path=tmp_path)
    assert (cfg.trainer.capture, cfg.trainer.compile, cfg.data.batching) == (True, Compile.eager, Batching.static)
    assert plan.path == "capture" and "too few" in plan.reason
    assert cfg.quant.weight_only_int8("cuda") == (quant == "8bit")
    cfg, plan = _plan([f"quant={quant}", f"trainer.max_steps={REGIONS_MIN_STEPS}"], CUDA, rows=10**6,
                      tmp_path=tmp_path)
    assert (cfg.trainer.compile, cfg.trainer.compile_regions, plan.path) == (Compile.inductor, True, "capture+regions")
    cfg, plan = _plan([f"quant={quant}", "trainer=cpu"], CPU, tmp_path=tmp_path)
    assert (cfg.trainer.capture, cfg.trainer.compile, cfg.data.batching) == (False, Compile.eager, Batching.packed)
    assert plan.path == "eager" and not cfg.quant.weight_only_int8("cpu")


@pytest.mark.parametrize("overrides,why", [
    (["quant=8bit", "quant.int8_compute=llm_int8"], "LLM.int8"),
    (["trainer.grad_accum=2"], "grad_accum"),
    (["data.batching=packed"], "data.batching=packed"),
])
def test_what_cannot_be_recorded_says_so_and_runs_eager(overrides, why, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="finlora.plan"):
        cfg, plan = _plan(overrides, CUDA, tmp_path=tmp_path)
    assert (cfg.trainer.capture, cfg.trainer.compile, plan.path) == (False, Compile.eager, "eager")
    assert why in plan.reason and why in caplog.text


def test_explicit_settings_are_kept(tmp_path) -> None:
    cfg, plan = _plan(["trainer.capture=false"], CUDA, tmp_path=tmp_path)
    assert (cfg.trainer.capture, cfg.data.batching, plan.path) == (False, Batching.packed, "eager")
    cfg, plan = _plan(["trainer.compile=inductor", "trainer.compile_regions=true", "trainer.max_steps=20"], CUDA,
                      tmp_path=tmp_path)  # asked for: the reason says so, not that 20 steps made it pay
    assert (cfg.trainer.capture, plan.path, plan.reason) == (True, "capture+regions",
                                                             "trainer.compile=inductor trainer.compile_regions=true")
    cfg, plan = _plan(["quant=8bit", "quant.int8_compute=llm_int8", "trainer.capture=true"], CUDA, tmp_path=tmp_path)
    assert (cfg.trainer.capture, plan.path) == (False, "eager")


def test_weight_only_int8_loads_through_the_real_loader(tiny_model_dir) -> None:
    """`load_model` with quant=8bit switches every bitsandbytes 8-bit layer when weight-only compute is asked for."""
    from finlora.config import Int8Compute, ModelConfig, QuantConfig
    from finlora.models import load_model

    quant = QuantConfig(bits=8, int8_compute=Int8Compute.weight_only)
    model = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), quant, torch.float32,
                       torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(type(m) is WeightOnlyLinear8bit for m in layers)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ours = model(ids).logits
        want = _dequantized_copy(model)(ids).logits
    assert rel(ours, want) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton dequantization kernel needs CUDA")
@pytest.mark.parametrize("shape", [(37, 1000), (576, 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_dequantization_kernel_equals_torchs_float32_form_bit_for_bit(shape: tuple[int, int],
                                                                          dtype: torch.dtype) -> None:
    """On a GPU one Triton kernel dequantizes (rows and columns past its blocks included), eagerly and recorded in a
    CUDA graph, to exactly the float32 form rounded once that the CPU computes."""
    g = torch.Generator().manual_seed(0)
    cb = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).cuda()
    scb = (torch.rand(shape[0], generator=g) * 3 + 1e-3).cuda()
    want = (cb.float() * (scb * (1 / 127))[:, None]).to(dtype)
    assert torch.equal(dequantize_int8(cb, scb, dtype), want)
    dequantize_int8(cb, scb, dtype)  # compiled before the recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorded = dequantize_int8(cb, scb, dtype)
    graph.replay()
    assert torch.equal(recorded, want)
