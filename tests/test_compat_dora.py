"""The peft and bitsandbytes internals finlora's DoRA reaches through `finlora.compat.peft` and
`finlora.compat.bitsandbytes`, each exercised on the real objects (bitsandbytes quantizes on the CPU here): a failure
names the compat function a new release broke. And the DoRA formula of `finlora.dora.reference` against finlora's
layer and peft's."""

from __future__ import annotations

import functools
from collections.abc import Callable

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from finlora.compat import bitsandbytes as compat_bnb
from finlora.compat import peft as compat_peft
from finlora.dora import reference, use_fast_dora


def reaches(name: str) -> Callable:
    """A test of compat function `name`: any error it raises is reported under that name."""

    def wrap(test: Callable) -> Callable:
        @functools.wraps(test)
        def run(*args, **kwargs):
            try:
                return test(*args, **kwargs)
            except AssertionError:
                raise
            except Exception as exc:  # an attribute or signature a release removed
                pytest.fail(f"{name}: {type(exc).__name__}: {exc}")

        return run

    return wrap


class One(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(32, 48)


def _int8() -> nn.Module:
    lin = _linear()
    q = bnb.nn.Linear8bitLt(32, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _nf4() -> nn.Module:
    lin = _linear()
    q = bnb.nn.Linear4bit(32, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _dora(base: nn.Module, init: bool = False) -> nn.Module:
    torch.manual_seed(1)
    model = One(base)
    if isinstance(base, bnb.nn.Linear4bit):  # what transformers marks, and peft dispatches on
        model.is_loaded_in_4bit = True
    elif isinstance(base, bnb.nn.Linear8bitLt):
        model.is_loaded_in_8bit = True
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True,
                                                init_lora_weights=init))


def _layer(model: nn.Module) -> nn.Module:
    return model.base_model.model.proj


@reaches("compat.peft.DoraLinearVariant")
def test_dora_linear_variant_is_what_peft_gives_a_dora_layer() -> None:
    layer = _layer(_dora(_linear()))
    variant = layer.lora_variant.get("default")
    assert type(variant) is compat_peft.DoraLinearVariant, \
        f"compat.peft.DoraLinearVariant: peft's DoRA layer holds a {type(variant)} variant"
    for name in ("forward", "merge_safe", "merge_unsafe", "unmerge", "init"):
        assert callable(getattr(compat_peft.DoraLinearVariant, name, None)), \
            f"compat.peft.DoraLinearVariant: no {name}"


@reaches("compat.peft.VARIANT_KWARG_KEYS")
def test_variant_kwarg_keys_are_names() -> None:
    keys = set(compat_peft.VARIANT_KWARG_KEYS)
    assert keys and all(isinstance(k, str) for k in keys), \
        f"compat.peft.VARIANT_KWARG_KEYS: not a collection of keyword names ({compat_peft.VARIANT_KWARG_KEYS!r})"


@pytest.mark.parametrize("bits,make", [("4bit", _nf4), ("8bit", _int8)])
@reaches("compat.peft.lora_bnb_layers")
def test_lora_bnb_layers_are_the_classes_peft_wraps_bitsandbytes_bases_in(bits, make) -> None:
    classes = compat_peft.lora_bnb_layers()
    layer = _layer(_dora(make()))
    assert type(layer) is classes.get(bits), \
        f"compat.peft.lora_bnb_layers: peft wraps a {bits} base in {type(layer)}, not {classes.get(bits)}"


@reaches("compat.peft.cast_input_dtype")
def test_cast_input_dtype_casts_to_the_adapters_dtype() -> None:
    layer = _layer(_dora(_linear()))
    x = torch.randn(2, 32, dtype=torch.float64)
    got = compat_peft.cast_input_dtype(layer, x, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, x.float()), \
        "compat.peft.cast_input_dtype: the LoRA layer's input cast changed"


@reaches("compat.peft.swap_class")
def test_swap_class_keeps_the_layer_and_its_parameters() -> None:
    layer = _layer(_dora(_linear()))
    names = [n for n, _ in layer.named_parameters()]

    class Sub(type(layer)):
        pass

    compat_peft.swap_class(layer, Sub)
    assert type(layer) is Sub and [n for n, _ in layer.named_parameters()] == names, \
        "compat.peft.swap_class: the layer changed beyond its class"


@reaches("compat.bitsandbytes.swap_class")
def test_bitsandbytes_swap_class_keeps_the_stored_int8_weight() -> None:
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)

    class Sub(bnb.nn.Linear8bitLt):
        pass

    weight = layer.weight
    compat_bnb.swap_class(layer, Sub)
    assert type(layer) is Sub and layer.weight is weight, \
        "compat.bitsandbytes.swap_class: the layer changed beyond its class"


@reaches("compat.bitsandbytes.is_int8_weight / is_unpacked_4bit_weight")
def test_weight_kinds() -> None:
    int8, nf4 = _int8().weight, _nf4().weight
    assert compat_bnb.is_int8_weight(int8) and not compat_bnb.is_int8_weight(nf4), "compat.bitsandbytes.is_int8_weight"
    assert compat_bnb.is_unpacked_4bit_weight(nf4) and not compat_bnb.is_unpacked_4bit_weight(int8), \
        "compat.bitsandbytes.is_unpacked_4bit_weight"
    assert not compat_bnb.is_int8_weight(_linear().weight) and not compat_bnb.is_unpacked_4bit_weight(_linear().weight)


@reaches("compat.bitsandbytes.int8_rows")
def test_int8_rows_give_the_weight() -> None:
    base = _int8()
    cb, scb = compat_bnb.int8_rows(base)
    assert cb.dtype == torch.int8 and cb.shape == (48, 32) and scb.shape == (48,), \
        "compat.bitsandbytes.int8_rows: CB or SCB moved or changed shape"
    w0 = cb.float() * scb.float()[:, None] / 127
    assert (w0 - _linear().weight.data).abs().max() < 0.02, "compat.bitsandbytes.int8_rows: W0 != CB · SCB / 127"
    base(torch.randn(2, 32))  # once used, SCB lives on the layer's state
    assert torch.equal(compat_bnb.int8_rows(base)[1], scb), "compat.bitsandbytes.int8_rows: SCB after a forward"


@reaches("compat.bitsandbytes.drop_stale_int8_rows")
def test_drop_stale_int8_rows_keeps_a_layer_that_computes() -> None:
    base = _int8()
    x = torch.randn(2, 32)
    want = base(x)
    compat_bnb.drop_stale_int8_rows(base)
    torch.testing.assert_close(base(x), want, msg="compat.bitsandbytes.drop_stale_int8_rows: the layer changed")


@reaches("compat.bitsandbytes.quant_parts / quant_state")
def test_quant_parts_rebuild_the_quant_state() -> None:
    weight = _nf4().weight
    qs = weight.quant_state
    parts = compat_bnb.quant_parts(qs)
    rebuilt = compat_bnb.quant_state(*parts)
    want = bnb.functional.dequantize_4bit(weight.data, qs)
    assert torch.equal(bnb.functional.dequantize_4bit(weight.data, rebuilt), want), \
        "compat.bitsandbytes.quant_parts / quant_state: the rebuilt QuantState dequantizes differently"


@reaches("compat.bitsandbytes.quant_parts / quant_state")
def test_quant_parts_of_a_nested_state() -> None:
    lin = _linear()
    q = bnb.nn.Linear4bit(32, 48, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    weight = q.to("cpu").weight
    parts = compat_bnb.quant_parts(weight.quant_state)
    assert parts.absmax2 is not None and parts.blocksize2 > 0, "compat.bitsandbytes.quant_parts: no nested state"
    rebuilt = compat_bnb.quant_state(*parts)
    assert torch.equal(bnb.functional.dequantize_4bit(weight.data, rebuilt),
                       bnb.functional.dequantize_4bit(weight.data, weight.quant_state)), \
        "compat.bitsandbytes.quant_state: a nested QuantState dequantizes differently"


@reaches("compat.bitsandbytes.linear4bit_input")
def test_linear4bit_input_is_what_the_4bit_layer_multiplies() -> None:
    base = _nf4()
    x = torch.randn(2, 32, dtype=torch.float64)
    got = compat_bnb.linear4bit_input(base, x)
    assert got.dtype == base.compute_dtype == torch.float32 and base.compute_type_is_set, \
        "compat.bitsandbytes.linear4bit_input: the 4-bit layer's compute dtype handling changed"
    want = bnb.matmul_4bit(got, base.weight.t(), bias=base.bias, quant_state=base.weight.quant_state)
    torch.testing.assert_close(want, base(x.float()), msg="compat.bitsandbytes.linear4bit_input")


def test_reference_formula_is_finloras_layer_and_peft_dora() -> None:
    """`reference.dora_linear` against peft's DoRA and finlora's layer (CPU, fp32), and the Gram form of the norm
    against the norm of the combined weight."""
    theirs, ours = _dora(_linear()), _dora(_linear())
    use_fast_dora(ours)
    layer = _layer(theirs)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]
    x = torch.randn(5, 32)
    want = reference.dora_linear(x, w0, bias, a, b, m, s)
    torch.testing.assert_close(theirs(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        w2 = w0.pow(2).sum(1)
        gram_norm = reference.gram_row_norm(w2[None], (a @ w0.T)[None], (a @ a.T)[None], b[None], s)[0]
        torch.testing.assert_close(gram_norm, reference.row_norm(w0, a, b, s), rtol=1e-5, atol=1e-6)
