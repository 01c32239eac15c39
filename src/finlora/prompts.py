"""The one place where a record becomes model input, for training and evaluation alike.

FinLoRA evaluates on the raw `context` string ("Instruction: …\\nInput: …\\nAnswer: "), without a chat
template; training uses the same string, so the evaluation prompt of an example is always its training
prompt minus the answer (tests/test_data.py proves it token for token). One ablation departs from this on
purpose: `data.train_prompt=finlora_inst` trains on FinLoRA's own training format, the context wrapped as
"[INST] {context} [/INST]" (axolotl's user-defined `format` in FinLoRA's lora/finetune scripts, the answer
tokenized on its own and appended), while evaluation keeps the raw context, as FinLoRA's did; and
`eval.prompt=finlora_inst` scores on that wrap, to tell a prompt mismatch from the wrap itself.

A chat record (`format: chat` in the task) holds its prompt as {role, content} messages: its prompt is the
tokenizer's chat template applied to them with the assistant's turn opened, for training and evaluation alike,
and the answer (the last assistant message) follows it with EOS, the loss on it alone.
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
INSTRUCTION_PROMPT = "Instruction: {}\nInput: {}\nAnswer: "  # FinLoRA's context, from an instruction and an input
MESSAGES = "messages"  # a chat record's prompt: its {role, content} messages before the answer


def build_prompt(record: dict, style: TrainPrompt = TrainPrompt.plain,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The text the model sees before its answer: a chat record's messages in the tokenizer's chat template;
    else the raw context (evaluation's, always), or FinLoRA's wrap."""
    if MESSAGES in record:
        if tokenizer is None or not tokenizer.chat_template:
            name = tokenizer.name_or_path if tokenizer is not None else "no tokenizer"
            raise DataError(f"a chat record needs the tokenizer's chat template, and {name} has none: use a chat "
                            "model, or format: finlora with columns mapped onto context and target")
        return tokenizer.apply_chat_template(record[MESSAGES], add_generation_prompt=True, tokenize=False)
    return FINLORA_INST.format(record["context"]) if style is TrainPrompt.finlora_inst else record["context"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: dict,
                  style: TrainPrompt = TrainPrompt.plain) -> list[int]:
    """Prompt tokens; with the default style exactly as evaluation feeds them to `generate`. A chat template
    writes the special tokens it wants (its BOS among them), so none are added to it."""
    return tokenizer(build_prompt(record, style, tokenizer), add_special_tokens=MESSAGES not in record)["input_ids"]


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
