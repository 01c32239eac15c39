"""predict.py (issue 36, item 2) and the base's quantization taken from the adapter's record (item 5): answers
from a real adapter trained here on an 8-bit tiny base, with evaluation's prompt and decoding, written as JSONL or
printed for prompts piped to stdin; bad rows refused by file:line before the model loads."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, ROOT, compose_cfg

from finlora.data import read_jsonl
from finlora.errors import ConfigError, DataError
from finlora.evaluate import evaluate
from finlora.predict import predict
from finlora.train import train

ROWS = 6  # FPB test rows answered by eval.py and predict.py alike


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """FinLoRA's FPB files cut short (32 training rows, 24 test rows), so a real run trains in seconds."""
    folder = tmp_path_factory.mktemp("data")
    for split, name, n in (("train", "fpb_train.jsonl", 32), ("test", "fpb_test.jsonl", 24)):
        (folder / split).mkdir()
        lines = (DATA_DIR / split / name).read_text().splitlines(keepends=True)
        (folder / split / name).write_text("".join(lines[:: len(lines) // n][:n]))
    return folder


def tiny_run(model_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    """Two steps of DoRA (dropout 0.05) on an 8-bit base, as the quickstart trains."""
    return train(compose_cfg([f"model.name_or_path={model_dir}", f"paths.data_dir={data}", "quant=8bit",
                              "adapter=dora", "task=fpb", "trainer=cpu", "trainer.max_steps=2",
                              "trainer.log_every_n_steps=1", "trainer.batch_size=4", "data.val_size=8",
                              "data.max_length=64", "logger=csv", "eval.enabled=false", *extra], out))


@pytest.fixture(scope="module")
def adapter_8bit(lively_dir, small_data, tmp_path_factory) -> Path:
    """A real adapter, trained two steps on the lively tiny model's 8-bit base (different prompts, different
    answers)."""
    run_dir = tmp_path_factory.mktemp("run")
    tiny_run(lively_dir, small_data, run_dir)
    return run_dir / "adapter"


@pytest.mark.slow  # two runs with validations: about 30 s here
def test_two_identical_runs_give_the_same_validation_loss_and_figures(lively_dir, small_data, tmp_path):
    """Issue 36: two quickstart runs gave the same train losses (to 1e-5) but val losses 0.7374 and 0.7141. Under one
    seed, every logged value of a second identical run (train and val losses, in-training scores, a validation after
    each step) is the first's, bit for bit (docs/evaluation.md, "Reproducible validation loss"); and
    scripts/quickstart_figures.py reads those figures back from the runs' own files and says they agree."""
    runs = [tmp_path / "a", tmp_path / "b"]
    summaries = [tiny_run(lively_dir, small_data, run, "trainer.val_every_n_steps=1") for run in runs]
    assert summaries[0]["final_val_loss"] == summaries[1]["final_val_loss"] is not None

    def logged(run: Path) -> list[list[str]]:
        with (run / "csv" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        keys = ["step", "train/loss", "val/loss", "val/fpb/accuracy", "val/fpb/f1"]
        return [[r[k] for k in keys] for r in rows if r["train/loss"] or r["val/loss"]]

    assert logged(runs[0]) == logged(runs[1])
    assert sum(1 for row in logged(runs[0]) if row[2]) == 2  # both validations are compared

    spec = importlib.util.spec_from_file_location("quickstart_figures", ROOT / "scripts" / "quickstart_figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    figures = [script.figures(run) for run in runs]
    assert (figures[0]["train_loss"], figures[0]["val_loss"]) == (summaries[0]["final_train_loss"],
                                                                  summaries[0]["final_val_loss"])
    assert [v["step"] for v in figures[0]["validations"]] == [0, 1]
    assert all("accuracy" in v for v in figures[0]["validations"])  # the in-training scores
    page = script.render(figures, [61.0, None], "python train.py experiment=quickstart")
    assert "| 1 | 1.0 min | 2 |" in page and f"{summaries[0]['final_val_loss']:.4f}" in page
    assert "Repeated runs agree exactly on: train_loss, val_loss, validations, tests; differ on: nothing." in page


def test_training_records_the_quantization_with_the_adapter(adapter_8bit):
    record = json.loads((adapter_8bit / "base_model.json").read_text())
    assert record["quant"] == {"bits": 8, "quant_type": "nf4", "double_quant": True, "int8_compute": "auto"}


def test_predict_answers_as_eval_generates_on_the_recorded_8bit_base(lively_dir, small_data, adapter_8bit,
                                                                     tmp_path, capsys):
    """The same rows through eval.py and predict.py (no quant= given to either): the same answers, both on the
    8-bit base the adapter was trained on, each saying so and where its results are."""
    common = [f"model.name_or_path={lively_dir}", f"adapter_path={adapter_8bit}", f"paths.data_dir={small_data}"]
    evaluate(compose_cfg([*common, "task=fpb", f"eval.limit={ROWS}", "eval.sample=first"], tmp_path / "eval",
                         config="eval"))
    said_eval = capsys.readouterr().out
    scored = json.loads((tmp_path / "eval" / "eval" / "fpb_metrics.json").read_text())
    assert scored["conditions"]["quant_bits"] == 8
    assert "base quantization: 8-bit, as the adapter was trained" in said_eval
    assert f"answers and metrics: {tmp_path / 'eval' / 'eval'}" in said_eval

    tests = read_jsonl(small_data / "test" / "fpb_test.jsonl")[:ROWS]
    instruction, text = tests[1]["context"].removeprefix("Instruction: ").removesuffix("\nAnswer: ").split(
        "\nInput: ")
    rows = [{"id": f"r{i}", "context": r["context"]} for i, r in enumerate(tests)]
    rows[1] = {"id": "r1", "instruction": instruction, "context": text}  # FinLoRA's parts: the same prompt
    rows.append({"prompt": tests[0]["context"]})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers" / "a.jsonl"
    result = predict(compose_cfg([*common, f"input={tmp_path / 'rows.jsonl'}", f"output={out}",
                                  "max_new_tokens=4"], tmp_path / "predict", config="predict"))  # FPB's
    said = capsys.readouterr().out
    assert result == {"answered": ROWS + 1, "output": str(out)}
    assert "base quantization: 8-bit, as the adapter was trained" in said and f"({ROWS + 1} rows): {out}" in said
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    generated = [json.loads(line)["generated"] for line in (tmp_path / "eval" / "eval" / "fpb_predictions.jsonl")
                 .read_text().splitlines()]
    assert len(set(generated)) > 1  # a comparison with teeth
    assert [line["answer"] for line in lines] == [*generated, generated[0]]
    assert lines[1] == {"index": 1, "id": "r1", "instruction": instruction, "context": text, "answer": generated[1]}
    assert lines[-1] == {"index": ROWS, "prompt": tests[0]["context"], "answer": generated[0]}
    assert not list((tmp_path / "predict").glob("predictions.jsonl"))  # output= took its place


def test_an_explicit_quant_wins_and_is_warned_of(lively_dir, small_data, adapter_8bit, tmp_path, caplog):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Profits rose."}) + "\n")
    with caplog.at_level(logging.WARNING, "finlora.build"):
        predict(compose_cfg([f"model.name_or_path={lively_dir}", f"adapter_path={adapter_8bit}",
                             f"input={rows}", "quant=none", "max_new_tokens=2"], tmp_path, config="predict"))
    [warned] = [r.getMessage() for r in caplog.records]
    assert warned.startswith("quant: the adapter was trained on 8-bit (") and "not on none" in warned
    assert (tmp_path / "predictions.jsonl").is_file()


@pytest.mark.parametrize("line,said", [
    ('{"context": "Profits rose."', "malformed JSON"),
    ('{"text": "Profits rose."}', "a row needs a 'context' (FinLoRA's) or a 'prompt', one of the two; it has 'text'"),
    ('{"prompt": "a", "context": "b"}', "one of the two, not both"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"instruction": "Classify.", "prompt": "x"}', "'instruction' goes with a 'context'"),
])
def test_a_bad_row_is_refused_by_file_and_line_before_the_model_loads(weightless, tmp_path, line, said):
    """`weightless` has no weights: had loading begun, the error would be another."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        predict(compose_cfg([f"model.name_or_path={weightless}", f"input={rows}"], tmp_path, config="predict"))
    assert str(err.value).startswith(f"{rows}:3: ") and said in str(err.value)


def test_input_or_interactive_is_required(tmp_path):
    with pytest.raises(ConfigError, match="input: give input=<file.jsonl> or interactive=true"):
        predict(compose_cfg([], tmp_path, config="predict"))


@pytest.mark.slow  # a process of its own: about 15 s of imports and start-up here
def test_interactive_answers_each_piped_line_and_a_bad_file_exits_2(lively_dir, small_data, adapter_8bit,
                                                                      tmp_path):
    """`predict.py interactive=true` answers each line of stdin (a prompt as typed, or a JSON row), one answer
    a line, until EOF; the answers are those of the file mode. A bad input file: one line, exit status 2."""
    prompts = ["Profits rose sharply.", json.dumps({"prompt": "Sales fell."})]
    env = os.environ | {"FINLORA_DATA_DIR": str(small_data)}
    common = [f"model.name_or_path={lively_dir}", f"adapter_path={adapter_8bit}", "max_new_tokens=6"]
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), *common, "interactive=true",
                           f"hydra.run.dir={tmp_path / 'chat'}"], input="\n".join(prompts) + "\n",
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                 ("Profits rose sharply.", "Sales fell.")))
    predict(compose_cfg([*common, f"input={tmp_path / 'rows.jsonl'}"], tmp_path / "file", config="predict"))
    answers = [json.loads(line)["answer"] for line in (tmp_path / "file" / "predictions.jsonl").open()]
    printed = proc.stdout
    assert printed.index(answers[0]) < printed.rindex(answers[1]), printed
    assert "2 prompts answered" in proc.stderr

    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n[1, 2]\n')
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), *common, f"input={tmp_path / 'bad.jsonl'}",
                           f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"finlora: {tmp_path / 'bad.jsonl'}:2: expected a JSON object, got list"
    assert not (tmp_path / "bad").exists()

