"""finlora's DoRA: the function peft's DoRA computes, at close to the cost of LoRA.

peft (>= 0.18) keeps the DoRA computation of a LoRA layer in a per-adapter variant object,
``module.lora_variant[adapter]`` (`DoraLinearVariant`, for plain and bitsandbytes 8-/4-bit layers alike).
`use_fast_dora` swaps that object for `FastDoraLinearVariant`, whose ``forward`` is ours; the parameters
(``lora_A``, ``lora_B``, ``lora_magnitude_vector``), their names, ``save_pretrained``, ``adapter_config.json``
(``use_dora: true``) and merging stay peft's, so adapters move freely between the two implementations.

Each layer computes y = m / ‖W0 + s·B·A‖_rows ⊙ (W0·x + s·B·A·dropout(x)) + b, the row norm detached
(`reference`). What differs from peft is how:

- The norm is factored through A·W0ᵀ and A·Aᵀ (`reference.gram_row_norm`), so W0 + s·B·A is never built and
  nothing is dequantized per call; layers of one shape are refreshed together (`constants`), on the weight where it
  lies (`bases`).
- The norm depends on parameters only, so it is cached on the layer's `state.LayerState` until they change: keyed on
  the parameters' version counters and storage, the scaling, and its group's count of optimizer steps (bumped through
  `finlora.adapter_steps.after_optimizer_step`).
- In training, a layer on a base that dequantizes its weight (bitsandbytes 4-bit, or weight-only 8-bit) computes its
  norm in its own forward from one dequantization of W0 (`layer.DoraLinearQuantized`, `ops.Dequantized4bit`).
- One autograd node scales the base output and adds the LoRA branch with the scale folded into B, saves the output y
  and takes the magnitude's gradient from it (`ops`); on CUDA with a 16-bit branch, Triton kernels form y and the
  gradients in one pass each (`kernels`).
- Under torch.compile the constants are refreshed eagerly before a compiled training step and read by one custom
  operator (`steps.fresh_norms`, `ops.dora_tail_op`); a compiled decode step rebuilds the norm in its graph from the
  frozen ‖W0_i‖² (`steps.prepare_compile`). Recorded as a CUDA graph, the cache is emptied first
  (`steps.forget_norms`), so the recorded forward recomputes the norms at every replay.
- With dropout > 0 in training, dropout applies to the LoRA branch only (the formula above); peft instead runs the
  base matmul a second time on dropout(x). Outside training, or with dropout 0, both compute the same function. The
  branch keeps x and the mask for backward, not a dropped copy (`finlora.lora_dropout`).

Modules, in the order they build on each other: `reference` (the formula), `state` (what a layer keeps), `bases`
(the frozen base weight), `kernels` (Triton), `ops` (autograd and custom operators), `constants` (batched refresh),
`layer` (the peft layer's forward), `steps` (switching layers; the adapter-step protocol).
"""

from finlora.dora.layer import DoraLinearQuantized, FastDoraLinearVariant
from finlora.dora.steps import DoraSteps, clear_dora_cache, forget_norms, fresh_norms, prepare_compile, use_fast_dora

__all__ = [
    "DoraLinearQuantized",
    "DoraSteps",
    "FastDoraLinearVariant",
    "clear_dora_cache",
    "forget_norms",
    "fresh_norms",
    "prepare_compile",
    "use_fast_dora",
]
