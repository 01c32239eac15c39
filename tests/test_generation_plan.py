"""The generation plan (`finlora.generation`): resolved from the settings and facts about the model and the machine,
without a model or a GPU, so the CUDA plan (static cache, compiled decode step, even batches) is checked here too."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from finlora.config import DecodeCompile, DecodeSettings, FourBitEval, Int8Cpu
from finlora.generation import (
    AUTO_CAP,
    CPU_BATCH,
    DECODE_COMPILE,
    ModelFacts,
    QuantModes,
    quant_modes,
    resolve_plan,
    rows_that_fit,
)

GIB = 2**30
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device string: no GPU is needed to plan for one
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1000)


def _cuda(free: int = 80 * GIB) -> ModelFacts:
    return ModelFacts(device=CUDA, compiles_decoding=True, pad_token_id=2, eos_token_id=3, free_bytes=free,
                      text_config=CONFIG, dtype=torch.float32)


def test_a_cpu_plan_generates_eagerly_in_the_batches_of_before_and_shares_the_prefix():
    facts = ModelFacts(device=CPU, pad_token_id=2, eos_token_id=3)
    plan = resolve_plan(DecodeSettings(), "32-true", quant_modes("cpu", Int8Cpu.bf16, FourBitEval.auto), facts,
                        [([10, 20, 30], 4), ([250], 8), ([], 2)])
    assert (plan.static, plan.compile_config, plan.auto, plan.rows) == (False, None, True, 3)  # auto: ≤ CPU_BATCH
    assert plan.shares_prefix and plan.cache_len == 512 and plan.device == CPU  # 250 + 8 tokens: two steps of 256
    assert plan.options() == {"do_sample": False, "pad_token_id": 2, "eos_token_id": 3, "use_cache": True}
    assert plan.quant == QuantModes(int8_cpu=Int8Cpu.bf16) and not plan.int8_dequantized
    with plan.autocast():
        assert not torch.is_autocast_enabled("cpu")
    many = resolve_plan(DecodeSettings(), "32-true", plan.quant, facts, [(list(range(1, 100)), 4)])
    assert many.rows == CPU_BATCH
    fixed = resolve_plan(DecodeSettings(batch_size=8, share_prefix=False), "bf16-mixed", plan.quant, facts,
                         [([10], 4)])
    assert (fixed.rows, fixed.auto, fixed.shares_prefix) == (8, False, False)
    with fixed.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_the_8bit_cpu_modes_and_what_they_allow():
    """`eval.int8_cpu`: bf16 needs native bf16 matmuls (else dequant); off the CPU it means nothing. LLM.int8
    layers rule out a shared prefix (their outlier columns are chosen per batch), dequant does not."""
    assert quant_modes("cpu", Int8Cpu.bf16, FourBitEval.auto, bf16_matmuls=True).int8_cpu is Int8Cpu.bf16
    assert quant_modes("cpu", Int8Cpu.bf16, FourBitEval.auto, bf16_matmuls=False).int8_cpu is Int8Cpu.dequant
    assert quant_modes("cpu", Int8Cpu.llm_int8, FourBitEval.auto, bf16_matmuls=False).int8_cpu is Int8Cpu.llm_int8
    assert quant_modes("cuda", Int8Cpu.bf16, FourBitEval.auto).int8_cpu is None
    facts = ModelFacts(device=CPU, int8_layers=True)
    settings = DecodeSettings(batch_size=4)
    for asked, shares, dequantized in ((Int8Cpu.llm_int8, False, False), (Int8Cpu.dequant, True, True)):
        plan = resolve_plan(settings, "32-true", quant_modes("cpu", asked, FourBitEval.auto), facts, [([9], 2)])
        assert (plan.shares_prefix, plan.int8_dequantized) == (shares, dequantized), asked
    on_gpu = resolve_plan(settings, "32-true", quant_modes("cuda", Int8Cpu.dequant, FourBitEval.auto),
                          ModelFacts(device=CUDA, int8_layers=True), [([9], 2)])
    assert not on_gpu.int8_dequantized and not on_gpu.shares_prefix


def test_the_4bit_mode_is_resolved_from_the_copy_and_the_free_memory():
    dense = quant_modes("cuda", Int8Cpu.bf16, FourBitEval.auto, four_bit_bytes=10 * GIB, free_bytes=30 * GIB)
    assert dense.four_bit is FourBitEval.dense and dense.four_bit_why.startswith("eval.four_bit=auto: dense")
    kernel = quant_modes("cuda", Int8Cpu.bf16, FourBitEval.auto, four_bit_bytes=10 * GIB, free_bytes=15 * GIB)
    assert kernel.four_bit is FourBitEval.kernel
    asked = quant_modes("cuda", Int8Cpu.bf16, FourBitEval.dense, four_bit_bytes=10 * GIB, free_bytes=GIB)
    assert asked.four_bit is FourBitEval.dense
    assert quant_modes("cuda", Int8Cpu.bf16, FourBitEval.dense).four_bit is None  # no 4-bit layer


def test_a_cuda_plan_compiles_one_decode_shape_for_the_task():
    """On CUDA with a static cache: one cache length and one row count for every set (each set in as few batches as
    memory allows, rounded up to 8), the decode step compiled as `eval.decode_compile` says, no shared prefix."""
    sets = [(list(range(10, 30)), 4), ([12] * 5, 6), ([11] * 45, 4)]
    plan = resolve_plan(DecodeSettings(decode_compile=DecodeCompile.inductor), "bf16-mixed", QuantModes(), _cuda(),
                        sets)
    assert plan.static and plan.compile_config is DECODE_COMPILE[DecodeCompile.inductor]
    assert (plan.rows, plan.cache_len, plan.auto, plan.shares_prefix) == (48, 256, True, False)
    assert plan.options()["compile_config"] is plan.compile_config
    assert plan.precision == "bf16-mixed" and plan.device == CUDA
    eager = plan.eager()  # the fallback when the step does not compile: the rest of the task eagerly
    assert (eager.static, eager.compile_config, eager.rows) == (False, None, 48) and "compile_config" not in \
        eager.options()
    assert plan.halved().rows == 24 and plan.halved().static
    tight = resolve_plan(DecodeSettings(), "bf16-mixed", QuantModes(), _cuda(free=64 * 2**20), sets)
    assert tight.rows % 8 == 0 and tight.rows < 48
    fixed = resolve_plan(DecodeSettings(batch_size=16), "bf16-mixed", QuantModes(), _cuda(), sets)
    assert (fixed.rows, fixed.static) == (16, True)  # a chosen batch size is kept as it is
    growing = resolve_plan(DecodeSettings(static_cache=False), "bf16-mixed", QuantModes(), _cuda(), sets)
    assert (growing.static, growing.compile_config, growing.rows) == (False, None, AUTO_CAP)
    elsewhere = resolve_plan(DecodeSettings(batch_size=4), "bf16-mixed", QuantModes(), ModelFacts(device=CUDA), sets)
    assert not elsewhere.static  # where transformers compiles no decode step, a static cache buys nothing


@pytest.mark.parametrize("free", [0, 2**20, GIB, 10**15])
def test_auto_rows_are_a_power_of_two_that_fits(free):
    rows = rows_that_fit(CONFIG, 2, 256, free)
    assert 1 <= rows <= AUTO_CAP and rows & (rows - 1) == 0
    assert rows == 1 or rows_that_fit(CONFIG, 2, 256, free // 2) <= rows


def test_plan_generation_measures_the_model_and_the_machine(lively, monkeypatch):
    """`evaluate.plan_generation` on the CPU: an fp32 model is generated with as it is; with transformers compiling
    the decode step (here stood in for), the CUDA plan: a static cache, even batches, the decode compile config."""
    import finlora.evaluate
    from finlora.evaluate import generate_sets, plan_generation

    tokenizer, model = lively
    encoded = [[[1, 2, 3]] * 20, [[4, 5]] * 5]
    same, plan = plan_generation(model, tokenizer, encoded, [4, 6], DecodeSettings(), "32-true")
    assert same is model and (plan.rows, plan.static, plan.shares_prefix, plan.cache_len) == (20, False, True, 256)
    assert (plan.pad_token_id, plan.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    monkeypatch.setattr(finlora.evaluate, "compiles_decoding", lambda device: True)
    _, static = plan_generation(model, tokenizer, encoded, [4, 6], DecodeSettings(), "32-true")
    assert (static.static, static.rows, static.shares_prefix) == (True, 24, False)
    assert static.compile_config is DECODE_COMPILE[DecodeCompile.recorded]
    assert list(generate_sets(model, tokenizer, [("none", [], 4), ("none either", [], 2)])) == [[], []]
