"""Data: checked JSONL reading, the sentiment mixture, validation split, prompt parity and loss masks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import DATA_DIR
from transformers import AutoTokenizer

from finlora.batching import pad_right
from finlora.config import DataConfig, DataSource, TaskConfig, TestSet
from finlora.data import EncodedDataset, load_task, read_jsonl
from finlora.errors import DataError
from finlora.prompts import IGNORE_INDEX, build_prompt, encode_example, encode_prompt


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return AutoTokenizer.from_pretrained(smollm_dir)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"context": "c", "target": "t"})
    f = _write(tmp_path / "bad.jsonl", [good, good, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        read_jsonl(f)
    f = _write(tmp_path / "nokey.jsonl", [good, json.dumps({"context": "c"})])
    with pytest.raises(DataError, match=r"nokey.jsonl:2: record has no 'target'"):
        read_jsonl(f)
    f = _write(tmp_path / "nocontext.jsonl", [json.dumps({"target": "t"})])
    with pytest.raises(DataError, match=r"nocontext.jsonl:1: record has no 'context'"):
        read_jsonl(f)
    with pytest.raises(DataError, match=r"empty.jsonl: no records"):
        read_jsonl(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_non_utf8_file_names_file_line_and_byte(tmp_path):
    """Issue 14, row 2: a Latin-1 file was a UnicodeDecodeError traceback."""
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps({"context": "c", "target": "t"}).encode() + b"\n"
                  + '{"context": "caf\u00e9", "target": "t"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 17\)"):
        read_jsonl(f)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"context": "c", "target": "t"}).encode() + b"\n")
    assert [(r["context"], r["target"], r["_source"]) for r in read_jsonl(bom)] == [("c", "t", f"{bom}:1")]


@pytest.mark.parametrize("target,shown", [(None, "null"), ("", '""'), ("  ", '"  "'), ([1], "[1]"),
                                          ({"a": 1}, '{"a": 1}'), (True, "true")])
def test_target_that_is_not_text_is_refused_by_line(tmp_path, target, shown):
    """Issue 14, row 3: `"target": null` trained on the string "None"."""
    f = _write(tmp_path / "t.jsonl", [json.dumps({"context": "c", "target": "ok"}),
                                      json.dumps({"context": "c", "target": target})])
    with pytest.raises(DataError) as err:
        read_jsonl(f)
    assert str(err.value) == f"{f}:2: 'target' must be a non-empty string (or a number), got {shown}"


def test_number_target_is_read_as_its_json_form(tmp_path):
    f = _write(tmp_path / "n.jsonl", ['{"context": "c", "target": 12}', '{"context": "c", "target": 1.50}'])
    assert [r["target"] for r in read_jsonl(f)] == ["12", "1.5"]


def test_sentiment_mixture_weights_and_disjoint_validation():
    task = TaskConfig(name="sentiment", train=[
        DataSource(file="train/fpb_train.jsonl", repeat=6), DataSource(file="train/fiqa_train.jsonl", repeat=21),
        DataSource(file="train/tfns_train.jsonl", repeat=2)], test=[TestSet(name="fpb", file="test/fpb_test.jsonl")])
    data = load_task(task, DataConfig(val_size=200, seed=42), DATA_DIR)
    files = [read_jsonl(DATA_DIR / "train" / f"{name}_train.jsonl") for name in ("fpb", "fiqa", "tfns")]
    assert len(data.val) == 200
    val_contexts = {r["context"] for r in data.val}
    assert not val_contexts & {r["context"] for r in data.train}
    expected = sum(r * sum(row["context"] not in val_contexts for row in rows)
                   for rows, r in zip(files, (6, 21, 2), strict=True))
    assert len(data.train) == expected
    counts = Counter(r["context"] for r in data.train)
    fiqa_only = {r["context"] for r in files[1]} - {r["context"] for r in files[0] + files[2]}
    assert all(counts[c] % 21 == 0 for c in fiqa_only - val_contexts)
    assert len(data.test[0][1]) == 1212
    again = load_task(task, DataConfig(val_size=200, seed=42), DATA_DIR)
    assert [r["context"] for r in again.val] == [r["context"] for r in data.val]


def test_eval_prompt_is_training_prompt_minus_answer(tokenizer):
    for record in read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[:50]:
        enc = encode_example(tokenizer, record, max_length=512)
        prompt = encode_prompt(tokenizer, record)
        answer = tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert enc.input_ids == prompt + answer
        assert build_prompt(record) == record["context"]


def test_loss_covers_answer_and_eos_only(tokenizer):
    record = {"context": "Instruction: Sentiment?\nInput: Profit rose.\nAnswer: ", "target": "positive"}
    enc = encode_example(tokenizer, record, max_length=64)
    n_prompt = len(encode_prompt(tokenizer, record))
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.labels[n_prompt:-1]) == "positive"


def test_truncation_keeps_answer_and_cue_and_is_counted(tokenizer):
    long = {"context": "Instruction: Sentiment?\nInput: " + "very " * 300 + "good.\nAnswer: ", "target": "positive"}
    short = {"context": "Instruction: Sentiment?\nInput: ok\nAnswer: ", "target": "neutral"}
    ds = EncodedDataset([long, short, long], tokenizer, max_length=64)
    assert ds.num_truncated == 1 and ds.num_distinct == 2 and len(ds) == 3
    enc = ds[0]
    assert len(enc.input_ids) == 64
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX][:-1]) == "positive"
    assert tokenizer.decode(enc.input_ids).startswith("Instruction: Sentiment?")
    assert "Answer: positive" in tokenizer.decode(enc.input_ids)


def test_collate_pads_right_and_masks(tokenizer):
    recs = [{"context": "Answer: ", "target": "yes"}, {"context": "Instruction: a longer prompt\nAnswer: ",
                                                       "target": "no"}]
    batch = pad_right([encode_example(tokenizer, r, 64) for r in recs], pad_id=tokenizer.pad_token_id)
    n0 = len(encode_example(tokenizer, recs[0], 64).input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].all()
