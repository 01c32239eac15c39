"""`predict(cfg)`, what `predict.py` runs: answers from a base model (with a saved adapter, or merged) for the prompts
of a JSONL file, or for prompts typed one a line (`interactive=true`).

Answers come from evaluation's engine (`evaluate.generate`, with eval.py's decoding keys) and prompt
(`prompts.encode_prompt` of a record's `context`), so a prompt answered here gets the answer that `eval.py`
would generate for it. Rows: FinLoRA's `{"context": …}` (the full "Instruction: …\\nInput: …\\nAnswer: "), or with
an `"instruction"` beside it the context is the input and the prompt is built in FinLoRA's form; or a plain
`{"prompt": …}`, used as it is. Every row is checked, naming `file:line`, before the model loads.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig
from rich.console import Console

from finlora.build import build, placement, quant_as_trained
from finlora.config import PredictConfig, validate
from finlora.data import json_lines
from finlora.errors import DataError
from finlora.evaluate import decoding, generate
from finlora.outputs import write_jsonl
from finlora.prompts import INSTRUCTION_PROMPT

log = logging.getLogger(__name__)

PROMPT_KEYS = ("instruction", "context", "prompt")  # a row's fields that make its prompt, copied to its answer's line


def read_rows(path: Path) -> list[dict]:
    """The rows of a prompts file, each checked (`prompt_record`); a bad one is a `DataError` naming file:line."""
    rows = []
    for lineno, row in json_lines(path):
        try:
            prompt_record(row)
        except DataError as err:
            raise DataError(f"{path}:{lineno}: {err}") from None
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows to answer (an empty file)")
    return rows


def prompt_record(row: dict) -> dict:
    """The FinLoRA record whose `context` is `row`'s prompt (the form `encode_prompt` reads)."""
    fields = [k for k in ("context", "prompt") if k in row]
    if len(fields) != 1:
        raise DataError("a row needs a 'context' (FinLoRA's) or a 'prompt', one of the two"
                        + (f"; it has {', '.join(map(repr, row))}" if not fields else ", not both"))
    for key in (*fields, *(["instruction"] if "instruction" in row else [])):
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{key!r} must be a non-empty string, got {json.dumps(row[key])[:40]}")
    if "instruction" in row and "prompt" in row:
        raise DataError("'instruction' goes with a 'context' (FinLoRA's form), not with a 'prompt'")
    text = row[fields[0]]
    return {"context": INSTRUCTION_PROMPT.format(row["instruction"], text) if "instruction" in row else text}


def answer_line(index: int, row: dict, answer: str) -> dict:
    """An answer's line in the output: the row's index (and `id`, if it has one), its prompt's fields, the answer."""
    return {"index": index, **{k: row[k] for k in ("id", *PROMPT_KEYS) if k in row}, "answer": answer}


def predict(dict_cfg: DictConfig) -> dict:
    """`predict.py`: the rows' answers written to `output` (default `<run folder>/predictions.jsonl`), or, with
    `interactive`, each line of stdin answered on stdout; the output's place is said at the end."""
    quantization = quant_as_trained(dict_cfg)
    cfg = validate(dict_cfg, PredictConfig)
    log.info("%s", quantization)
    where = placement(cfg)
    rows = read_rows(Path(cfg.input)) if cfg.input else []
    tokenizer, model = build(cfg, where)
    options = decoding(cfg.eval, where.precision)
    if cfg.interactive:
        answered = converse(lambda record: generate(model, tokenizer, [record], cfg.max_new_tokens, **options,
                                                    description="answering")[0], sys.stdin, sys.stdout)
        Console(stderr=True).print(f"{quantization}\n{answered} prompts answered", highlight=False, soft_wrap=True)
        return {"answered": answered}
    answers = generate(model, tokenizer, [prompt_record(r) for r in rows], cfg.max_new_tokens, **options,
                       description="answering")
    output = Path(cfg.output) if cfg.output else Path(cfg.output_dir) / "predictions.jsonl"
    write_jsonl(output, [answer_line(i, r, a) for i, (r, a) in enumerate(zip(rows, answers, strict=True))])
    Console().print(f"{quantization}\nanswers ({len(rows)} rows): {output}", highlight=False, soft_wrap=True)
    return {"answered": len(rows), "output": str(output)}


def converse(answer, lines: TextIO, out: TextIO) -> int:
    """Answer each non-blank line of `lines` (a prompt as typed, or a JSON row as in an input file) on `out`, one
    answer a line, until the end of input; a bad JSON row is said on stderr and skipped. Returns how many were
    answered."""
    answered = 0
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            record = prompt_record(json.loads(text)) if text.lstrip().startswith("{") else {"context": text}
        except (DataError, ValueError, AttributeError) as err:
            print(f"finlora: not answered: {err}", file=sys.stderr, flush=True)
            continue
        print(answer(record), file=out, flush=True)
        answered += 1
    return answered
