"""finlora's DoRA against peft's: same outputs, gradients, adapters and merges, on tiny CPU layers."""

from __future__ import annotations

import contextlib
import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.variants import DoraLinearVariant
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from finlora import adapter_steps
from finlora.dora import FastDoraLinearVariant, clear_dora_cache, forget_norms, reference, use_fast_dora
from finlora.dora.constants import gram as _gram
from finlora.dora.constants import grouped_a_w0t as _grouped_a_w0t
from finlora.dora.constants import layer_consts as _layer_consts
from finlora.dora.layer import parts as _parts
from finlora.dora.state import state_of

D_IN, D_HID = 64, 128
TARGETS = ["up", "down"]


class Tiny(nn.Module):
    """Two linear layers with a nonlinearity between, so input gradients of one feed the other."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(D_IN, D_HID, bias=bias)
        self.down = nn.Linear(D_HID, D_IN, bias=bias)
        self.ckpt = False

    def forward(self, x: Tensor) -> Tensor:
        if self.ckpt:
            h = checkpoint(lambda t: F.gelu(self.up(t)), x, use_reentrant=False)
            return checkpoint(self.down, h, use_reentrant=False)
        return self.down(F.gelu(self.up(x)))


def _quantize(model: Tiny, kind: str) -> Tiny:
    """Replace the linear layers by bitsandbytes ones holding the same weights (quantized on the CPU)."""
    for name in TARGETS:
        lin = getattr(model, name)
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
            )
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            dtype = torch.bfloat16 if kind == "nf4-bf16" else torch.float32
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=dtype,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(model, name, q.to("cpu"))
    if kind == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def make_base(kind: str = "fp32", seed: int = 0, bias: bool = True) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(bias=bias)
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    elif kind in ("int8", "nf4", "nf4-bf16"):
        model = _quantize(model, kind)
    return model


def make_dora(kind: str = "fp32", seed: int = 0, dropout: float = 0.0, r: int = 4, bias: bool = True):
    """A peft DoRA model with random (non-zero) B and perturbed magnitudes, so that every term counts."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=dropout, use_dora=True)
    model = get_peft_model(make_base(kind, seed, bias), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def autocast_for(kind: str):
    if kind in ("autocast", "nf4-bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run(model: nn.Module, x: Tensor, kind: str = "fp32") -> tuple[Tensor, dict[str, Tensor]]:
    """Output, and gradients of every trainable parameter and of the input, for loss = Σ out·w."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with autocast_for(kind):
        out = model(x)
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    (out.float() * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["input"] = x.grad.clone()
    return out.detach().float(), grads


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_variant") and m.lora_variant]


def x_for(kind: str, n: int = 6, seed: int = 5) -> Tensor:
    x = torch.randn(2, n, D_IN, generator=torch.Generator().manual_seed(seed))
    return x.to(torch.bfloat16) if kind == "bf16" else x


# kind: (output tolerance, gradient tolerance), relative ‖·‖ error against peft's DoRA
TOLERANCES = {
    "fp32": (1e-5, 1e-5),  # measured ≤ 6e-7
    "int8": (1e-5, 1e-5),
    "nf4": (1e-5, 1e-5),
    "bf16": (1e-2, 3e-2),  # measured ≤ 6e-3 / 1.6e-2; peft rounds its norm to bf16, we do not
    "autocast": (1e-2, 3e-2),
    "nf4-bf16": (1e-2, 3e-2),
}


def eval_out(model: nn.Module, x: Tensor, kind: str = "fp32") -> Tensor:
    """Eval mode with gradients on: under no_grad on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
    weights, which peft's DoRA then dequantizes wrongly (see test_nf4_cpu_packed_eval)."""
    model.eval()
    with autocast_for(kind):
        return model(x.clone().requires_grad_(True)).detach().float()


def fast(model: nn.Module) -> nn.Module:
    assert use_fast_dora(model) == 2
    assert all(isinstance(m.lora_variant["default"], FastDoraLinearVariant) for m in dora_layers(model))
    return model


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", list(TOLERANCES))
def test_matches_peft_train_and_eval(kind: str, bias: bool) -> None:
    # A fresh model for each forward: on the CPU, peft's 8-bit DoRA breaks the layer it dequantizes
    # (``module.weight = module.weight.to(device)`` drops the int8 scales) for the next forward.
    x = x_for(kind)
    ref_out, ref_grads = run(make_dora(kind, bias=bias), x, kind)
    out, grads = run(fast(make_dora(kind, bias=bias)), x, kind)
    tol_out, tol_grad = TOLERANCES[kind]
    assert rel(out, ref_out) < tol_out
    assert set(grads) == set(ref_grads)
    assert any("lora_magnitude_vector" in n for n in grads)
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) < tol_grad, name
    ours = eval_out(fast(make_dora(kind, bias=bias)), x, kind)
    assert rel(ours, eval_out(make_dora(kind, bias=bias), x, kind)) < tol_out


def test_trainable_base_bias_matches_peft() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, bias="all")
        model = get_peft_model(make_base(), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        return model

    x = x_for("fp32")
    ref_out, ref_grads = run(build(), x)
    out, grads = run(fast(build()), x)
    assert any(name.endswith("base_layer.bias") for name in grads)
    assert rel(out, ref_out) < 1e-5
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) < 1e-5, name


def make_stack(seed: int = 0, nf4: bool = False) -> nn.Module:
    """Three layers of one shape, whose constants are computed in one batch (`nf4`: bitsandbytes 4-bit ones)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, D_IN), nn.GELU(), nn.Linear(D_IN, D_IN), nn.GELU(), nn.Linear(D_IN, D_IN)]
    for i in (0, 2, 4) if nf4 else ():
        q = bnb.nn.Linear4bit(D_IN, D_IN, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(layers[i].weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(layers[i].bias.data.clone(), requires_grad=False)
        layers[i] = q.to("cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"], use_dora=True)
    model = get_peft_model(nn.Sequential(*layers), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def test_layers_of_one_shape_refresh_together() -> None:
    x = x_for("fp32")
    ref_out, ref_grads = run(make_stack(), x)
    model = make_stack()
    assert use_fast_dora(model) == 3
    layers = dora_layers(model)
    layers[0](x)  # the first stale layer refreshes its whole group
    assert all("default" in state_of(layer).constants for layer in layers)
    out, grads = run(model, x)
    assert rel(out, ref_out) < 1e-5
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) < 1e-5, name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model(x)
    for layer in layers:
        torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))


def test_4bit_layers_of_one_shape_refresh_together() -> None:
    """A·W0ᵀ of a group of 4-bit layers, A cast once for all (`_stacked_a_w0t`): each norm is ‖W0 + s·B·A‖ of the
    dequantized W0, after the first forward and after an update."""
    model = make_stack(nf4=True)
    assert use_fast_dora(model) == 3
    layers = dora_layers(model)
    x = x_for("fp32")
    for _ in range(2):
        model(x).square().mean().backward()
        for layer in layers:
            w0 = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            want = torch.linalg.norm(w0 + layer.scaling["default"] * b @ a, dim=1).detach()
            torch.testing.assert_close(state_of(layer).constants["default"].norm, want, rtol=1e-5, atol=1e-6)
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a GPU: the norm's Triton kernel (`_dora_norm_kernel`)"))])
@pytest.mark.parametrize("kind", ["nf4", "nf4-bf16"])
def test_4bit_layers_in_training_take_their_norm_from_one_dequantization(kind, device, monkeypatch) -> None:
    """In training, a 4-bit layer takes its base output and A·W0ᵀ from one dequantization of W0 (`DoraLinear4bit`),
    and computes its norm from that: no other product with W0, only A·Aᵀ cached. Its output and
    gradients are those of the cached-norm path it takes in eval mode, before and after an update."""
    model = fast(make_dora(kind)).to(device)
    layers = dora_layers(model)
    assert all(type(layer).__name__ == "DoraLinear4bit" for layer in layers)
    x = x_for(kind).to(device)
    mixed = torch.autocast(device, dtype=torch.bfloat16, enabled=kind == "nf4-bf16")
    close = 1e-5 if kind == "nf4" else 3e-2

    def step(train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        model.zero_grad(set_to_none=True)
        for layer in layers:
            layer.train(train)  # eval: the cached-norm path, as peft's forward runs it (no dropout either way)
        inputs = x.clone().requires_grad_(True)
        with mixed:
            out = model(inputs)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.detach().float(), {**grads, "input": inputs.grad.clone()}

    step(False)  # the frozen ‖w_i‖², computed once a weight
    calls = []
    for name in ("matmul_4bit", "functional.dequantize_4bit"):
        owner, attr = (bnb.functional, "dequantize_4bit") if "." in name else (bnb, name)
        real = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        forget_norms(model)
        calls.clear()
        out, grads = step(True)
        assert calls == ["functional.dequantize_4bit"] * 2 * len(layers)  # forward and backward, once each
        for layer in layers:  # only A·Aᵀ cached
            a = layer.lora_A["default"].weight.detach()
            assert "default" not in state_of(layer).constants
            torch.testing.assert_close(state_of(layer).grams["default"].gram, a @ a.T)
        want_out, want = step(False)
        assert all("default" in state_of(layer).constants for layer in layers)
        assert rel(out, want_out) < close
        for name in want:
            assert rel(grads[name], want[name]) < close, name
        opt.step()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the norm's Triton kernel runs on CUDA"))])
@pytest.mark.parametrize("r,d_in,d_out", [(8, 200, 150), (16, 130, 70)])
def test_layer_constants_follow_the_reference_formula(device, r, d_in, d_out) -> None:
    """A layer's norm and scale (on CUDA from the Triton kernel, elsewhere from torch ops) are those of
    `reference.row_norm` on the combined weight W0 + s·B·A, from the frozen ‖W0_i‖², A·W0ᵀ and A·Aᵀ."""
    gen = torch.Generator(device).manual_seed(0)
    w0, a = torch.randn(d_out, d_in, device=device, generator=gen), torch.randn(r, d_in, device=device, generator=gen)
    b, m = 0.3 * torch.randn(d_out, r, device=device, generator=gen), torch.rand(d_out, device=device, generator=gen)
    consts = _layer_consts(a @ w0.T, a @ a.T, b, m, w0.pow(2).sum(1), 2.0, torch.float32, True)
    want = reference.row_norm(w0, a, b, 2.0)
    torch.testing.assert_close(consts.norm, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(consts.scale, m / want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(consts.b_s, 2.0 * b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the norm's Triton kernel runs on CUDA")
@pytest.mark.parametrize("r,d_in,d_out", [(8, 200, 150), (4, 4096, 1024), (16, 130, 70)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_norm_kernel_on_a_gpu_gives_the_pytorch_paths_constants(r, d_in, d_out, dtype) -> None:
    """`layer_consts` on CUDA, one Triton kernel, against its PyTorch path: sizes that fill no block (masks)."""
    gen = torch.Generator("cuda").manual_seed(0)
    a, b = torch.randn(r, d_in, device="cuda", generator=gen), 0.3 * torch.randn(d_out, r, device="cuda", generator=gen)
    m, w2 = torch.rand(d_out, device="cuda", generator=gen) + 0.5, 10 * torch.rand(d_out, device="cuda", generator=gen)
    cross = torch.randn(r, d_out, device="cuda", generator=gen).to(dtype)
    got, want = (_layer_consts(cross, a @ a.T, b, m, w2 + 5, 2.0, dtype, use) for use in (True, False))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="one product of all layers' rows on CUDA only")
@pytest.mark.parametrize("n_layers", [1, 3, 16, 17, 40])
def test_gram_of_each_layer_on_a_gpu(n_layers: int) -> None:
    """`gram` on CUDA, one product of all layers' rows for few layers, a batched one for many: A·Aᵀ of each layer."""
    a = torch.randn(n_layers, 8, 96, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(_gram(a), a @ a.transpose(1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_of_one_shape_on_a_gpu_get_a_w0t_from_one_grouped_kernel(dtype) -> None:
    """Plain 16-bit bases on CUDA: A·W0ᵀ of every layer of a shape in one Triton launch, equal to each layer's product
    (sizes that fill no block: masks), and the norms refreshed from it equal peft's definition. Layers told not to use
    Triton take the product a layer."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(100, 100), nn.GELU(), nn.Linear(100, 100), nn.GELU(),
                                         nn.Linear(100, 100)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2", "4"], use_dora=True)).cuda()
    layers = dora_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.base_layer.to(dtype)
            layer.lora_B["default"].weight.normal_(0, 0.3)
    assert use_fast_dora(model) == 3
    batch = [(layer, "default", _parts(layer, "default"), None) for layer in layers]
    a = torch.stack([layer.lora_A["default"].weight for layer in layers]).float()
    exact = torch.stack([a[i].to(dtype).float() @ layer.base_layer.weight.float().T for i, layer in enumerate(layers)])
    torch.testing.assert_close(_grouped_a_w0t(batch, a), exact, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        model(torch.randn(4, 100, device="cuda"))
    for layer in layers:
        torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer).float(),
                                   rtol=2e-3, atol=1e-4)
    use_fast_dora(model, use_triton=False)
    assert _grouped_a_w0t(batch, a) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_on_a_gpu_give_the_pytorch_paths_output_and_gradients(dtype, bias) -> None:
    """A 16-bit branch on CUDA runs the layer's output and its gradients in Triton kernels (`_dora_out`,
    `_dora_grads`); sizes that fill no block, and rows enough that B's and m's gradients are summed over programs,
    in an order that does not change from run to run."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(100, 150, bias=bias), nn.GELU(), nn.Linear(150, 100, bias=bias)),
                           LoraConfig(r=5, lora_alpha=10, target_modules=["0", "2"], use_dora=True)).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 700, 100, device="cuda")
    results = []
    for use_triton in (True, False, True):
        assert use_fast_dora(model, use_triton=use_triton) == 2
        with torch.autocast("cuda", dtype=dtype):
            results.append(run(model, x))
    (out, grads), (ref_out, ref_grads), (_, again) = results
    assert all(torch.equal(again[name], grads[name]) for name in grads)
    assert rel(out, ref_out) < 1e-2
    assert ref_grads.keys() == grads.keys() and any("magnitude" in name for name in grads)
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) < 1e-2, name


def test_paper_worked_example() -> None:
    w0 = torch.tensor([[1, 7, 2, 8, 5], [2, 10, 4, 12, 10], [3, 15, 12, 18, 27], [4, 12, 16, 16, 36.0]])
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5))
    with torch.no_grad():
        base[0].weight.copy_(w0.T)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert use_fast_dora(model) == 1
    layer = dora_layers(model)[0]
    magnitude = layer.lora_magnitude_vector["default"].weight
    expected = torch.tensor([5.4772, 22.7596, 20.4939, 28.0713, 46.3681])
    torch.testing.assert_close(magnitude.detach(), expected, atol=1e-4, rtol=0)

    x = torch.randn(3, 4)
    out = model(x)  # B = 0 at initialization: DoRA starts as the base layer
    torch.testing.assert_close(out, base(x), atol=1e-5, rtol=1e-6)
    norm = state_of(layer).constants["default"].norm
    directions = w0.T / norm[:, None]
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(norm, expected, atol=1e-4, rtol=0)


def test_dropout_applies_to_lora_branch_only() -> None:
    model = make_dora("fp32", dropout=0.5)
    use_fast_dora(model)
    layer = model.base_model.model.up
    x = x_for("fp32")
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    dropped = layer.lora_dropout["default"](x)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    s = layer.scaling["default"]
    w0 = layer.base_layer.weight
    m = layer.lora_magnitude_vector["default"].weight
    norm = torch.linalg.norm(w0 + s * b @ a, dim=1)
    expected = m / norm * (x @ w0.T + s * dropped @ a.T @ b.T) + layer.base_layer.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(dropped, x)


def test_gradient_accumulation_and_checkpointing() -> None:
    x = x_for("fp32", n=8)
    ref = make_dora("fp32")
    _, ref_grads = run(ref, x)

    model = make_dora("fp32")
    use_fast_dora(model)
    model.base_model.model.ckpt = True
    layer = model.base_model.model.up
    model.zero_grad(set_to_none=True)
    w = torch.linspace(-1, 1, x.numel()).view(x.shape)
    norms = []
    # two micro-batches, each backward recomputing its checkpointed forward
    for part, wp in zip(x.split(1), w.split(1), strict=True):
        (model(part) * wp).sum().backward()
        norms.append(state_of(layer).constants["default"].norm)
    assert norms[0] is norms[1]  # one norm per optimizer step, reused by micro-batches and recomputation
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, ref_grads[name]) < 1e-5, name


def test_4bit_layers_computing_their_norm_accumulate_and_recompute_as_peft() -> None:
    """4-bit layers that compute their norm in their forward, over two micro-batches, each backward recomputing its
    checkpointed forward: the gradients of one full batch of peft's DoRA."""
    x = x_for("nf4", n=8)
    _, ref_grads = run(make_dora("nf4"), x)
    model = fast(make_dora("nf4"))
    model.base_model.model.ckpt = True
    w = torch.linspace(-1, 1, x.numel()).view(x.shape)
    for part, wp in zip(x.split(1), w.split(1), strict=True):
        (model(part) * wp).sum().backward()
    assert all("default" not in state_of(layer).constants for layer in dora_layers(model))  # the norm in the layer
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, ref_grads[name]) < 1e-5, name


def _fresh_norm(layer: nn.Module) -> Tensor:
    """peft's definition, on the full matrix."""
    w0 = layer.base_layer.weight
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    return torch.linalg.norm(w0 + s * b @ a, dim=1).detach()


class DataSGD(torch.optim.Optimizer):
    """Writes through ``.data``, which bumps no version counter (as bitsandbytes' optimizers do)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-1, foreach=False),
        lambda ps: DataSGD(ps),
    ],
    ids=["adamw-foreach", "adamw-fused", "sgd", "data-sgd"],
)
def test_norm_cache_never_stale_after_optimizer_step(make_opt) -> None:
    """torch's foreach and for-loop optimizers bump the parameters' version counters; a fused one (its kernel writes
    the parameters directly) and one that writes through ``.data`` (as bitsandbytes' do) bump none, and are followed
    by the adapter-step protocol's `after_optimizer_step`, as the LightningModule calls it."""
    model = make_dora("fp32")
    use_fast_dora(model)
    layers = dora_layers(model)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    x = x_for("fp32", n=4)
    previous = None
    for _ in range(3):
        for part in x.split(1):  # gradient accumulation over two micro-batches
            model(part).pow(2).mean().backward()
            for layer in layers:
                torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))
        opt.step()
        if isinstance(opt, DataSGD) or opt.defaults.get("fused"):  # no version bumps: the protocol says it
            adapter_steps.after_optimizer_step(model)
        opt.zero_grad()
        current = _fresh_norm(layers[0])
        if previous is not None:
            assert not torch.allclose(current, previous)  # the step did change the norm
        previous = current
    model(x)
    for layer in layers:
        torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))


def test_norm_cache_follows_in_place_edits_and_explicit_clear() -> None:
    model = make_dora("fp32")
    use_fast_dora(model)
    layer = model.base_model.model.up
    x = x_for("fp32")
    model(x)
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2)  # bumps the version counter
    model(x)
    torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))
    layer.lora_A["default"].weight.data.mul_(3)  # invisible to version counters
    clear_dora_cache(model)
    model(x)
    torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))
    layer.scaling["default"] *= 0.5
    model(x)
    torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))


def _train(model: nn.Module, steps: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = x_for("fp32", seed=9)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_saved_adapter_loads_in_plain_peft(kind: str, tmp_path) -> None:
    model = make_dora(kind)
    use_fast_dora(model)
    _train(model)
    x = x_for("fp32", seed=3)
    ours = eval_out(model, x)
    model.save_pretrained(tmp_path)
    assert '"use_dora": true' in (tmp_path / "adapter_config.json").read_text()

    loaded = PeftModel.from_pretrained(make_base(kind), tmp_path)  # plain peft: no finlora involved
    assert all(type(m.lora_variant["default"]) is DoraLinearVariant for m in dora_layers(loaded))
    assert rel(eval_out(loaded, x), ours) < 1e-5


def test_peft_trained_adapter_loads_into_ours(tmp_path) -> None:
    model = make_dora("fp32")
    _train(model)
    x = x_for("fp32", seed=3)
    with torch.no_grad():
        theirs = model(x)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_base("fp32"), tmp_path)
    assert use_fast_dora(loaded) == 2
    with torch.no_grad():
        ours = loaded(x)
    assert rel(ours, theirs) < 1e-5


def test_nf4_cpu_packed_eval() -> None:
    """bitsandbytes' CPU eval path repacks 4-bit weights; the norm must still be that of W0."""
    model = fast(make_dora("nf4"))
    x = x_for("fp32")
    train_out = run(model, x)[0]
    layers = dora_layers(model)
    eval_out(model, x)  # with gradients on: no repacking, the norms cached
    before = [state_of(layer).constants["default"].norm for layer in layers]
    with torch.no_grad():
        model(x)  # repacks the weights where the CPU supports it
    if not getattr(layers[0].base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU does not repack bitsandbytes 4-bit weights")
    clear_dora_cache(model)  # recompute the frozen row norms from the packed weights
    with torch.no_grad():
        out = model(x)
    for layer, norm in zip(layers, before, strict=True):
        assert rel(state_of(layer).constants["default"].norm, norm) < 5e-3  # packing keeps absmax in bf16
    assert rel(out, train_out) < 1e-2


def test_merge_gives_plain_model_with_same_outputs() -> None:
    model = make_dora("fp32")
    use_fast_dora(model)
    _train(model)
    x = x_for("fp32", seed=3)
    with torch.no_grad():
        ours = model(x)
    merged = model.merge_and_unload()
    assert type(merged.up) is nn.Linear and type(merged.down) is nn.Linear
    with torch.no_grad():
        assert rel(merged(x), ours) < 1e-5


def test_merge_unmerge_round_trip_refreshes_cache() -> None:
    model = make_dora("fp32")
    use_fast_dora(model)
    x = x_for("fp32", seed=3)
    model.eval()
    with torch.no_grad():
        before = model(x)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        after = model(x)
    assert rel(merged, before) < 1e-5
    assert rel(after, before) < 1e-5
    layer = model.base_model.model.up
    torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))


def test_frozen_row_norm_computed_once() -> None:
    model = make_dora("int8")
    use_fast_dora(model)
    layer = model.base_model.model.up
    x = x_for("fp32")
    model(x)
    w2 = state_of(layer).frozen.sqnorm
    model(x).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model(x)
    assert state_of(layer).frozen.sqnorm is w2


def test_non_dora_layers_untouched() -> None:
    model = get_peft_model(make_base(), LoraConfig(r=4, target_modules=TARGETS))
    assert use_fast_dora(model) == 0
    assert all(not m.lora_variant for m in model.modules() if hasattr(m, "lora_variant"))


def test_adapter_step_protocol_acts_on_the_dora_layers() -> None:
    """`use_fast_dora` registers finlora's DoRA with `finlora.adapter_steps`: before recording, the cached constants
    go (the frozen ‖W0_i‖² stays); a compiled step's context refreshes them; after an optimizer step they are stale
    even when no version counter moved (a write through ``.data``)."""
    model = make_dora("fp32")
    use_fast_dora(model)
    layer = model.base_model.model.up
    x = x_for("fp32")
    model(x)
    frozen = state_of(layer).frozen
    adapter_steps.before_recording(model)
    assert not state_of(layer).constants and state_of(layer).frozen is frozen
    with adapter_steps.compiled_step(model)():
        entry = state_of(layer).constants["default"]
    torch.testing.assert_close(entry.norm, _fresh_norm(layer))
    layer.lora_B["default"].weight.data.mul_(2)  # no version bump
    adapter_steps.after_optimizer_step(model)
    model(x)
    assert state_of(layer).constants["default"] is not entry
    torch.testing.assert_close(state_of(layer).constants["default"].norm, _fresh_norm(layer))
