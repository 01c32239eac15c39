"""Data from anywhere (issue 36, item 3): task entries read through `datasets` (a saved folder, a CSV with mapped
columns, a hub id offline), chat-format rows in the tokenizer's chat template, the same prompt for training and
evaluation, and FinLoRA's checks on every source. Checks meant to come before the model loads run against a model
folder without weights (`weightless`): had loading begun, it would fail."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import compose_cfg
from transformers import AutoTokenizer

from finlora.config import Columns, DataConfig, DatasetSource, DataSource, RecordFormat, TaskConfig, TestSet, validate
from finlora.data import EncodedDataset, load_task, read_jsonl
from finlora.errors import ConfigError, DataError
from finlora.prompts import IGNORE_INDEX, build_prompt, encode_example, encode_prompt
from finlora.train import train

LABELS = ("positive", "negative", "neutral")
TINY = ["quant=none", "adapter=lora", "trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4",
        "data.val_size=4", "data.max_length=96", "logger=csv"]


def chat(question: str, answer: str, system: bool = False) -> dict:
    return {"messages": [*([{"role": "system", "content": "Answer in one word."}] if system else []),
                         {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def saved_chats(folder, n_train: int = 24, n_test: int = 6):
    """A DatasetDict of chat rows (train and test splits) written by `save_to_disk`."""
    rows = [chat(f"Sentiment of: news item {i}?", LABELS[i % 3], system=i % 2 == 0) for i in range(n_train + n_test)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:n_train]),
                          "test": datasets.Dataset.from_list(rows[n_train:])}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_chat_rows_from_a_saved_folder_train_and_are_scored_on_the_same_prompt(tiny_model_dir, tmp_path):
    """The real train() path on a save_to_disk folder of chat rows (conf/task/chat.yaml): two steps, then the test
    stage generates on the test split; the summary and the model card say the prompt is the chat template."""
    data = saved_chats(tmp_path / "chats")
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY, "task=chat", f"task.train.0.source.path={data}",
                       "task.train.0.source.split=train", "task.test.0.source.split=test", "task.test.0.kind=label",
                       f"task.test.0.labels=[{','.join(LABELS)}]", "task.test.0.max_new_tokens=3",
                       "eval.during_training.size=0"], tmp_path / "run")
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["train_examples"] == 20 and summary["val_examples"] == 4
    assert summary["train_prompt"] == summary["eval_prompt"] == "chat_template"
    assert summary["test/chat/n"] == 6
    predictions = [json.loads(line) for line in (tmp_path / "run/eval/chat_predictions.jsonl").read_text().splitlines()]
    assert [p["target"] for p in predictions] == [LABELS[i % 3] for i in range(24, 30)]
    card = (tmp_path / "run/adapter/README.md").read_text()
    assert f"`{data}[train]`" in card and "chat template" in card


def test_chat_prompt_is_the_template_with_the_assistant_turn_opened(tokenizer):
    """Parity by construction: the training sequence is the evaluation prompt (the chat template with the assistant's
    turn opened) plus the answer and EOS, the loss on those alone; and it is the template's own rendering of the
    whole conversation (SmolLM2's template ends the turn with its EOS, <|im_end|>)."""
    for row in [chat("Sentiment of: profit rose?", "positive", system=True), chat("Loss widened?", "negative")]:
        record = {"messages": row["messages"][:-1], "target": row["messages"][-1]["content"], "context": "unused"}
        prompt = encode_prompt(tokenizer, record)
        rendered = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        assert build_prompt(record, tokenizer=tokenizer) == rendered
        assert prompt == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        enc = encode_example(tokenizer, record, max_length=256)
        assert enc.input_ids[:len(prompt)] == prompt and enc.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert tokenizer.decode(enc.labels[len(prompt):]) == record["target"] + tokenizer.eos_token
        whole = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert tokenizer.decode(enc.input_ids) == whole.rstrip("\n")


def test_chat_jsonl_is_checked_by_file_and_line_and_needs_a_chat_template(tokenizer_dir, tmp_path):
    good = json.dumps(chat("q", "a"))
    f = tmp_path / "chats.jsonl"
    spec = DataSource(file=str(f), format=RecordFormat.chat)
    for bad, why in [({"messages": [{"role": "user", "content": "q"}]}, "at least one message before it"),
                     ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
                      "the last one has role 'user'"),
                     ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "message 0 is"),
                     ({"turns": []}, "record has no 'messages'")]:
        f.write_text(f"{good}\n{json.dumps(bad)}\n")
        with pytest.raises(DataError, match=rf"chats.jsonl:2: .*{why}"):
            read_jsonl(f, spec)
    f.write_text(f"{good}\n")
    records = read_jsonl(f, spec)
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"chats.jsonl:1: a chat record needs the tokenizer's chat template"):
        EncodedDataset(records, plain, max_length=64)


def test_csv_with_mapped_columns_and_an_instruction_column(tmp_path):
    """A CSV through datasets: columns mapped onto context and target, an instruction column making FinLoRA's prompt,
    cells read as text (007 stays 007), a split sliced; its rows named by split and row."""
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer,task\nWhat is the ticker?,007,Answer with the code.\n"
                   "Profit rose 5%.,positive,Sentiment?\nLoss widened.,negative,Sentiment?\n")
    columns = Columns(context="question", target="answer", instruction="task")
    task = TaskConfig(name="qa", train=[DataSource(source=DatasetSource(path=str(csv), split="train[:2]"),
                                                   columns=columns)],
                      test=[TestSet(name="qa", source=DatasetSource(path=str(csv), split="train[2:]"), columns=columns,
                                    labels=list(LABELS))])
    data = load_task(task, DataConfig(val_size=0), tmp_path)
    assert sorted((r["context"], r["target"], r["_source"]) for r in data.train) == [
        ("Instruction: Answer with the code.\nInput: What is the ticker?\nAnswer: ", "007",
         f"{csv} (split train[:2]) row 0"),
        ("Instruction: Sentiment?\nInput: Profit rose 5%.\nAnswer: ", "positive", f"{csv} (split train[:2]) row 1")]
    assert [r["target"] for r in data.test[0][1]] == ["negative"]

    csv.write_text("question,answer\nok,positive\nempty answer,\n")
    task.train[0].columns = Columns(context="question", target="answer")
    with pytest.raises(DataError, match=r"qa.csv \(split train\[:2\]\) row 1: 'answer' must be a non-empty string"):
        load_task(task, DataConfig(val_size=0), tmp_path)


def test_unknown_column_is_refused_naming_key_source_and_columns_before_loading(weightless, tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("question,response\nq,a\n")
    cfg = compose_cfg([f"model.name_or_path={weightless}", *TINY, "task=custom", f"task.train.0.source.path={csv}"],
                      tmp_path / "run")
    with pytest.raises(DataError) as err:
        train(cfg)
    assert err.value.exit_code == 2
    assert str(err.value) == (f"task.train[0].columns.target: no column 'answer' in {csv} (split train[:90%]); its "
                              "columns: question, response")
    assert not (tmp_path / "run").exists()


def test_hub_id_offline_is_one_line_naming_the_key_before_loading(weightless, tmp_path, monkeypatch):
    """Offline, a hub data set not in the cache cannot load: one line naming the key. HF_HUB_OFFLINE=1 (conftest) is
    read when huggingface_hub and datasets are imported, before the fixture sets it, so it is set as they read it."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = compose_cfg([f"model.name_or_path={weightless}", *TINY, "task=custom",
                       "task.train.0.source.path=finlora-tests/no-such-data"], tmp_path / "run")
    with pytest.raises(DataError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("task.train[0].source.path: cannot load 'finlora-tests/no-such-data' (split "
                              "'train[:90%]'): ") and "OfflineModeIsEnabled" in message and "\n" not in message


def test_finlora_checks_apply_to_sources_by_split_and_row(tokenizer, tmp_path):
    """Test overlap, labels and over-long answers name a source's split and row as they name a file's line."""
    folder = tmp_path / "saved"
    rows = [{"text": f"news {i}", "label": LABELS[i % 3]} for i in range(8)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list([rows[5], {"text": "x", "label": "bullish"}])}
                         ).save_to_disk(str(folder))
    columns = Columns(context="text", target="label")

    def task(test_split: str) -> TaskConfig:
        return TaskConfig(name="n", train=[DataSource(source=DatasetSource(path=str(folder)), columns=columns)],
                          test=[TestSet(name="n", source=DatasetSource(path=str(folder), split=test_split),
                                        columns=columns, labels=list(LABELS))])

    with pytest.raises(DataError, match=r"not among its labels .* \(e\.g\. .*saved \(split test\) row 1: 'bullish'\)"):
        load_task(task("test"), DataConfig(val_size=0), tmp_path)
    with pytest.raises(DataError, match=r"no split 'dev'; its splits: train, test"):
        load_task(task("dev"), DataConfig(val_size=0), tmp_path)
    data = load_task(task("train"), DataConfig(val_size=0, allow_test_overlap=True), tmp_path)
    assert data.test[0][1][0]["_source"] == f"{folder} (split train) row 0"
    overlap = TaskConfig(name="n", train=task("train").train, test=[TestSet(
        name="n", file=str(tmp_path / "t.jsonl"), labels=list(LABELS))])
    (tmp_path / "t.jsonl").write_text('{"context": "news 5", "target": "neutral"}\n')
    with pytest.raises(DataError, match=rf"1 of 8 training rows are also test rows \(e\.g\. {folder} \(split train\) "
                                        rf"row 5 = {tmp_path}/t.jsonl:1\)"):
        load_task(overlap, DataConfig(val_size=0), tmp_path)
    long = [{"context": "c", "target": "word " * 80, "_source": f"{folder} (split train) row 3"}]
    with pytest.raises(DataError, match=r"saved \(split train\) row 3: its answer takes"):
        EncodedDataset(long, tokenizer, max_length=32)


@pytest.mark.parametrize("overrides,message", [
    (["task.train.0.file=train/fpb_train.jsonl", "task.train.0.source.path=qa.csv"],
     "task.train[0]: give a file (FinLoRA JSONL, relative to paths.data_dir) or a source (a datasets source), "
     "not both"),
    (["task.train.0.source.path=./missing.csv"], "task.train[0].source.path: no such file or folder: './missing.csv'"),
    (["task.train.0.source.path=notes.txt"], "task.train[0].source.path: 'notes.txt': a data file must end in one of "
                                             ".json, .jsonl, .csv, .parquet"),
])
def test_source_config_is_checked_naming_the_key(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")
    (tmp_path / "notes.txt").write_text("q")
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["task=custom", *overrides], tmp_path / "run"))
    assert message in str(err.value)


def test_chat_refuses_the_finlora_inst_wrap_and_needs_no_finlora_data_dir(tmp_path):
    data = saved_chats(tmp_path / "chats", n_train=3, n_test=1)
    base = ["task=chat", f"task.train.0.source.path={data}", "paths.data_dir=/nonexistent"]
    validate(compose_cfg(base, tmp_path / "run"))  # no FinLoRA file: no data folder needed
    with pytest.raises(ConfigError, match="data.train_prompt: finlora_inst wraps a FinLoRA context, and task.train"
                                          r"\[0\] has format chat"):
        validate(compose_cfg([*base, "data.train_prompt=finlora_inst"], tmp_path / "run"))
