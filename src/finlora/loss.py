"""The training loss with logits only where the loss is.

The loss covers the answer tokens and EOS only (`prompts.encode_example`), a few tokens of each example.
A causal LM's own forward computes logits for every position, in float32 for the loss: at Llama-3's
128,256-token vocabulary that is 0.5 MB per token, most of a step's activation memory on short answers,
all of it for prompt tokens whose logits nobody reads. Here the decoder runs as usual and the LM head and
cross-entropy run on the positions that predict a label only, in chunks with recomputation when there are
many. The value is the one transformers computes (the mean over the label tokens of the shifted
cross-entropy); tests/test_loss.py checks the loss and every gradient against the model's own forward.
The positions come with the batch (`batching.LOSS_POSITIONS`, found on the host), so nothing here waits
for the GPU; a fixed number of them (static batches, padded with ignored labels) keeps every shape fixed.
Packed rows get their block-causal mask here too (`block_causal_mask`): transformers would build the same
one, after checking on the host whether the rows are packed at all, which waits for the GPU every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from finlora.batching import LOSS_POSITIONS, LOSS_TARGETS, loss_positions
from finlora.compat.transformers import attn_implementation
from finlora.prompts import IGNORE_INDEX

CHUNK_TOKENS = 4096  # label positions whose logits are made at once; more are done chunk by chunk, recomputed
INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def answer_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Mean cross-entropy of the next-token predictions at the positions whose label is not ignored."""
    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    inputs = {k: v for k, v in batch.items() if k in INPUT_KEYS}
    if ("attention_mask" not in inputs and "position_ids" in inputs and _attention(causal) == "sdpa"
            and not torch.compiler.is_compiling()):  # compiled, transformers builds it in the graph, unchecked
        inputs["attention_mask"] = block_causal_mask(inputs["position_ids"])
    if _head_transforms_logits(causal):  # softcapping or scaling lives in the model's own forward
        return model(**inputs, labels=batch["labels"], use_cache=False).loss
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    if LOSS_POSITIONS in batch:
        positions, targets = batch[LOSS_POSITIONS], batch[LOSS_TARGETS]
    else:  # a batch made elsewhere: found here, at the cost of one wait for the GPU
        positions, targets = loss_positions(batch["labels"])
    hidden = hidden.flatten(0, 1).index_select(0, positions)
    if len(targets) <= CHUNK_TOKENS:
        return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX)
    total = sum(checkpoint(_chunk_loss_sum, head, hidden[i:i + CHUNK_TOKENS], targets[i:i + CHUNK_TOKENS],
                           use_reentrant=False) for i in range(0, len(targets), CHUNK_TOKENS))
    return total / (targets != IGNORE_INDEX).sum()


def block_causal_mask(position_ids: Tensor) -> Tensor:
    """The SDPA mask of packed rows, [rows, 1, width, width], True where a token may attend: earlier tokens of
    its own example, which starts wherever the positions do not go up by one (as transformers finds them;
    a row's padding is an example of its own). Built on the GPU, with no wait for it."""
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    example = starts.cumsum(-1)
    width = position_ids.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & earlier)[:, None]


def _attention(causal: nn.Module) -> str | None:
    return attn_implementation(getattr(causal, "config", None))


def _chunk_loss_sum(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _head_transforms_logits(causal: nn.Module) -> bool:
    config = getattr(causal, "config", None)
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)) or (
        not hasattr(causal, "get_decoder") or causal.get_output_embeddings() is None)
