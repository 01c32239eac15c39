"""The choices of finlora's config, as Enums (Hydra 1.3 pins omegaconf < 2.4, which has no `Literal`). Imports only
`enum`: any module may use them without loading the schema."""

from __future__ import annotations

from enum import Enum


class AdapterMethod(Enum):
    lora = "lora"
    dora = "dora"
    none = "none"  # full fine-tuning of every weight


class DoraImpl(Enum):
    finlora = "finlora"
    peft = "peft"


class Scheduler(Enum):
    """The learning rate after warmup (`trainer.warmup_steps`)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Batching(Enum):
    """How training examples become batches (`finlora.batching` says what each costs)."""

    auto = "auto"  # static where the step is recorded as CUDA graphs, else packed (`finlora.plan`)
    padded = "padded"
    grouped = "grouped"
    packed = "packed"
    static = "static"  # packed into one row of a few fixed widths: what compiled code and CUDA graphs reuse


class Compile(Enum):
    """How the training step runs on a GPU (`trainer.compile`)."""

    auto = "auto"  # inductor on the decoder layers for a recorded run long enough to pay for it, else eager
    eager = "eager"  # PyTorch as written
    inductor = "inductor"  # torch.compile: fused kernels, fewer launches
    cudagraphs = "cudagraphs"  # torch.compile(mode="reduce-overhead"): forward and backward replayed as CUDA graphs


class Int8Compute(Enum):
    """How an 8-bit base computes (`quant.int8_compute`; `finlora.quant.int8`)."""

    auto = "auto"  # weight_only on a CUDA GPU, llm_int8 on the CPU
    weight_only = "weight_only"  # the int8 weight dequantized for one 16-bit product: recordable, no host waits
    llm_int8 = "llm_int8"  # bitsandbytes' LLM.int8 matmul (int8 activations, outlier columns)


class NonFinitePolicy(Enum):
    stop = "stop"  # stop with the step and the last good checkpoint
    skip = "skip"  # drop the optimizer step whose loss or gradients are not finite


class TaskKind(str, Enum):
    """How a task's answers are parsed and scored (`finlora.metrics`)."""

    label = "label"
    numeric = "numeric"
    tags = "tags"
    text = "text"


class FourBitType(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class TrainPrompt(Enum):
    """A prompt style (`finlora.prompts`): what training sees (`data.train_prompt`) and what the test sets are
    scored on (`eval.prompt`); both default to the raw `context`, FinLoRA's evaluation prompt."""

    plain = "plain"  # the raw context: training and evaluation see the same prompt
    finlora_inst = "finlora_inst"  # FinLoRA's training format, "[INST] {context} [/INST]": an ablation


class RecordFormat(Enum):
    """What a row of a task's data holds (`finlora.data`, `finlora.prompts`)."""

    finlora = "finlora"  # a prompt (`columns.context`, maybe behind an instruction) and its answer (`columns.target`)
    chat = "chat"  # {role, content} messages ending with the assistant's answer, in the tokenizer's chat template


class EvalSample(Enum):
    """Which `eval.limit` rows of a test set are scored."""

    stratified = "stratified"  # a seeded random sample with the labels in the file's proportions (label tasks)
    random = "random"  # a seeded random sample
    first = "first"  # the first rows of the file (FinLoRA's files are grouped: rarely representative)


class Int8Cpu(Enum):
    """How an 8-bit base computes its matmuls while generating on the CPU (`finlora.evaluate`)."""

    llm_int8 = "llm_int8"  # LLM.int8: inputs quantized, outlier columns chosen per batch (scores move with the batch)
    dequant = "dequant"  # bitsandbytes' CPU training path: weights dequantized, inputs kept (batch-invariant)
    bf16 = "bf16"  # a bf16 copy, weights dequantized once, adapter merged: fast (a few answers move with the batch)


class FourBitEval(Enum):
    """How a 4-bit base (NF4 or FP4) computes while generating, on any device (`finlora.evaluate`)."""

    kernel = "kernel"  # bitsandbytes' 4-bit layers as loaded (transformers compiles no bitsandbytes model)
    dense = "dense"  # a copy of the 4-bit layers dequantized once to the compute dtype, adapter kept unmerged on top
    auto = "auto"  # dense when that copy takes at most half of the free memory, else kernel (a log line says which)


class DecodeCompile(Enum):
    """How the decode step is compiled on a static cache, on CUDA (`eval.decode_compile`; docs/benchmarks.md)."""

    recorded = "recorded"  # the traced step recorded as a CUDA graph by finlora (`capture.recorded_backend`): no
    # compiling after the trace, weights and KV cache read in place; the quickest first pass, what one job runs
    cudagraphs = "cudagraphs"  # Dynamo's CUDA-graph backend, the model's own kernels: a short compile, every job
    inductor = "inductor"  # Inductor's fused kernels in CUDA graphs: a longer first compile (then cached), faster
    # steps afterwards: for long evaluations and a sweep's later jobs


class Direction(Enum):
    minimize = "minimize"
    maximize = "maximize"


class ExportFormat(Enum):
    """What `export.py` writes (`finlora.export`)."""

    merged = "merged"  # a transformers model folder: the adapter folded into the base weights
    gguf = "gguf"  # one GGUF file for llama.cpp and its kin (Ollama, LM Studio), Llama-architecture bases


class HalfDtype(Enum):
    """The 16-bit dtype a merged model's weights are stored in."""

    bf16 = "bf16"
    f16 = "f16"


class GgufType(Enum):
    """The GGUF file's type for its matrices (norms and other vectors stay float32, as llama.cpp writes them)."""

    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"  # llama.cpp's 8-bit blocks: 32 weights and one f16 scale each, about half of f16's size
