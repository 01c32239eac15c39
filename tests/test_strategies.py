"""FSDP's wrap policy is peft's `fsdp_auto_wrap_policy`: on the tiny Llama it wraps exactly the modules finlora's own
recipe wrapped before (each decoder layer, each leaf module with a parameter that trains), for LoRA, DoRA and full
fine-tuning. Built on the CPU, no process group needed."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from finlora.strategies import lightning_strategy


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_fsdp_wraps_each_decoder_layer_and_each_trainable_leaf(tiny_model_dir, method):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                 use_dora=method == "dora"))
    policy = lightning_strategy("fsdp", model).kwargs["auto_wrap_policy"]
    wrapped = [name for name, m in model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    layers = [name for name, m in model.named_modules() if isinstance(m, LlamaDecoderLayer)]
    trainable_leaves = [name for name, m in model.named_modules() if not list(m.children())
                        and any(p.requires_grad for p in m.parameters(recurse=False))]
    assert len(layers) == 2 and trainable_leaves
    assert sorted(wrapped) == sorted(layers + trainable_leaves)
    if method != "full":  # A, B (and the magnitude) of q, k and v in each of the 2 layers
        assert len(trainable_leaves) == 2 * 3 * (3 if method == "dora" else 2)
