"""The one place where a FinLoRA record becomes model input, for training and evaluation alike.

FinLoRA evaluates on the raw `context` string ("Instruction: …\\nInput: …\\nAnswer: "), without a chat
template; training uses the same string, so the evaluation prompt of an example is always its training
prompt minus the answer (tests/test_data.py proves it token for token). One ablation departs from this on
purpose: `data.train_prompt=finlora_inst` trains on FinLoRA's own training format, the context wrapped as
"[INST] {context} [/INST]" (axolotl's user-defined `format` in FinLoRA's lora/finetune scripts, the answer
tokenized on its own and appended), while evaluation keeps the raw context, as FinLoRA's did.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from finlora.config import TrainPrompt
from finlora.errors import DataError

IGNORE_INDEX = -100  # label value that the causal-LM loss skips


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


FINLORA_INST = "[INST] {} [/INST]"  # FinLoRA's training format around the context
FINLORA_CONTEXT = "Instruction: {}\nInput: {}\nAnswer: "  # FinLoRA's context, from an instruction and an input


def build_prompt(record: dict, style: TrainPrompt = TrainPrompt.plain) -> str:
    """The text the model sees before its answer: the raw context (evaluation's, always), or FinLoRA's wrap."""
    return FINLORA_INST.format(record["context"]) if style is TrainPrompt.finlora_inst else record["context"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: dict,
                  style: TrainPrompt = TrainPrompt.plain) -> list[int]:
    """Prompt tokens; with the default style exactly as evaluation feeds them to `generate`."""
    return tokenizer(build_prompt(record, style), add_special_tokens=True)["input_ids"]


def encode_example(tokenizer: PreTrainedTokenizerBase, record: dict, max_length: int,
                   style: TrainPrompt = TrainPrompt.plain) -> Encoded:
    """Prompt + answer + EOS, with the loss on the answer and EOS only.

    The answer is tokenized on its own and appended, so with the plain style the prompt's tokens are the
    very ones that evaluation generates from. Too long an example loses prompt tokens from the middle (the
    instruction at the start and the cue at the end survive); the answer is never cut.
    """
    prompt = encode_prompt(tokenizer, record, style)
    answer = tokenizer(str(record["target"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    budget = max_length - len(answer)
    truncated = len(prompt) > budget
    if truncated:
        if budget < 2:
            raise DataError(f"its answer takes {len(answer)} tokens with EOS, more than data.max_length={max_length} "
                            "leaves room for (the answer is never cut): raise data.max_length or shorten the target")
        tail = min(16, budget // 2)
        prompt = prompt[: budget - tail] + prompt[-tail:]
    return Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, truncated)
