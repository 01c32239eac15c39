"""Evaluation: the generate input is the training prompt, left padding changes nothing, eval.py writes
its predictions and metrics for a base model, an adapter and a merged model."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter

import pytest
import torch
from conftest import DATA_DIR, compose_cfg
from peft.tuners.lora.variants import DoraLinearVariant

from finlora.adapters import attach_adapter
from finlora.config import (
    AdapterConfig,
    AdapterMethod,
    EvalSample,
    EvalSettings,
    ModelConfig,
    QuantConfig,
    TestSet,
)
from finlora.data import read_jsonl
from finlora.dora import FastDoraLinearVariant
from finlora.evaluate import evaluate, generate, pick_rows, wilson_interval
from finlora.models import load_model, load_tokenizer
from finlora.prompts import encode_example


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), cfg, QuantConfig(), torch.float32, torch.device("cpu"))
    return load_tokenizer(str(tiny_model_dir), cfg), model


def test_generation_prompt_is_training_prompt_minus_answer(tiny):
    tokenizer, model = tiny
    records = read_jsonl(DATA_DIR / "test" / "fiqa_test.jsonl")[:6]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, args, kwargs):
        if not seen:  # the first call is the prompt's prefill
            seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        generate(model, tokenizer, records, max_new_tokens=2, batch_size=6)
    finally:
        handle.remove()
    ids, mask = seen[0]
    prompts = sorted((ids[row][mask[row].bool()].tolist() for row in range(len(records))), key=len)
    expected = []
    for record in records:
        enc = encode_example(tokenizer, record, max_length=1024)
        n_answer = sum(label != -100 for label in enc.labels)
        expected.append(enc.input_ids[:-n_answer])
    assert prompts == sorted(expected, key=len)
    assert all(mask[row, -1] == 1 for row in range(len(records)))  # left padded: prompts end together


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    tokenizer, model = tiny
    records = read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[:5]
    batched = generate(model, tokenizer, records, max_new_tokens=4, batch_size=5)
    single = [generate(model, tokenizer, [r], max_new_tokens=4, batch_size=1)[0] for r in records]
    assert batched == single


@pytest.fixture(scope="module")
def dora_adapter(tiny_model_dir, tmp_path_factory):
    """A saved DoRA adapter on the tiny model, with a non-zero B (so that it changes the outputs)."""
    tokenizer = load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)))
    base = load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(),
                      torch.float32, torch.device("cpu"))
    peft_model = attach_adapter(base, AdapterConfig(method=AdapterMethod.dora, r=4), gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter, so merged and unmerged are really compared
    path = tmp_path_factory.mktemp("dora") / "adapter"
    peft_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_cli_base_adapter_and_merged(tiny_model_dir, dora_adapter, tmp_path):
    common = [f"model.name_or_path={tiny_model_dir}", "task=sentiment", "eval.limit=6", "eval.batch_size=4"]
    results = {}
    for name, extra in {"base": [], "adapter": [f"adapter_path={dora_adapter}"],
                        "merged": [f"adapter_path={dora_adapter}", "merge=true"]}.items():
        out = tmp_path / name
        results[name] = evaluate(compose_cfg(common + extra, out, config="eval"))
        for test_set in ("fpb", "fiqa", "tfns", "nwgi"):
            rows = [json.loads(line) for line in (out / "eval" / f"{test_set}_predictions.jsonl").open()]
            assert len(rows) == 6 and {"target", "generated", "predicted"} <= set(rows[0])
            saved = json.loads((out / "eval" / f"{test_set}_metrics.json").read_text())
            assert saved["n"] == 6 and saved["accuracy"] == results[name][f"test/{test_set}/accuracy"]
    assert results["merged"] == results["adapter"]
    generated = {name: (tmp_path / name / "eval" / "nwgi_predictions.jsonl").read_text() for name in results}
    assert generated["merged"] == generated["adapter"]


def test_eval_runs_a_dora_adapter_with_the_chosen_implementation(tiny_model_dir, dora_adapter, tmp_path, monkeypatch):
    """eval.py on a DoRA adapter computes it with finlora's DoRA by default (adapter.impl=finlora), with peft's
    on adapter.impl=peft; both give the same answers."""
    calls = {"finlora": 0, "peft": 0}
    fast, slow = FastDoraLinearVariant.forward, DoraLinearVariant.forward

    def counted_fast(self, *args, **kwargs):
        calls["finlora"] += 1
        return fast(self, *args, **kwargs)

    def counted_slow(*args, **kwargs):
        calls["peft"] += 1
        return slow(*args, **kwargs)

    monkeypatch.setattr(FastDoraLinearVariant, "forward", counted_fast)
    monkeypatch.setattr(DoraLinearVariant, "forward", staticmethod(counted_slow))
    common = [f"model.name_or_path={tiny_model_dir}", "task=fpb", "eval.limit=4", f"adapter_path={dora_adapter}"]
    answers = {}
    for impl in ("finlora", "peft"):
        before = dict(calls)
        out = tmp_path / impl
        evaluate(compose_cfg(common + ([] if impl == "finlora" else ["adapter.impl=peft"]), out, config="eval"))
        ran = {k: calls[k] - before[k] for k in calls}
        assert ran[impl] > 0 and ran["peft" if impl == "finlora" else "finlora"] == 0, (impl, ran)
        answers[impl] = [json.loads(line)["generated"] for line in (out / "eval" / "fpb_predictions.jsonl").open()]
    assert answers["finlora"] == answers["peft"]


def _fpb():
    return TestSet(name="fpb", file="test/fpb_test.jsonl", labels=["negative", "neutral", "positive"]), read_jsonl(
        DATA_DIR / "test" / "fpb_test.jsonl")


def test_limit_draws_a_seeded_stratified_sample_not_a_prefix():
    """Issue 13, item 3: `eval.limit` took the first N rows of files grouped by label."""
    test_set, records = _fpb()
    settings = EvalSettings(limit=100)
    rows = pick_rows(records, test_set, settings)
    assert rows == pick_rows(records, test_set, EvalSettings(limit=100)) and rows == sorted(set(rows))
    assert len(rows) == 100 and rows != list(range(100))
    assert rows != pick_rows(records, test_set, EvalSettings(limit=100, seed=7))
    in_file = Counter(r["target"] for r in records)
    in_sample = Counter(records[i]["target"] for i in rows)
    assert sum(in_sample.values()) == 100
    for label, count in in_file.items():  # the file's proportions, to within one row (largest remainders)
        assert abs(in_sample[label] - 100 * count / len(records)) < 1, (label, in_sample, in_file)
    assert pick_rows(records, test_set, EvalSettings(limit=100, sample=EvalSample.first)) == list(range(100))
    assert len(pick_rows(records, test_set, EvalSettings(limit=100, sample=EvalSample.random))) == 100
    assert pick_rows(records, test_set, EvalSettings()) == list(range(len(records)))


def test_wilson_interval_on_known_numbers():
    assert wilson_interval(0.5, 100) == pytest.approx([0.40383, 0.59617], abs=1e-5)  # z = 1.96
    assert wilson_interval(0.0, 10) == pytest.approx([0.0, 0.27754], abs=1e-5)
    assert wilson_interval(1.0, 10) == pytest.approx([0.72246, 1.0], abs=1e-5)


def test_metrics_file_records_rows_interval_and_conditions(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    evaluate(compose_cfg([f"model.name_or_path={tiny_model_dir}", "task=fpb", "eval.limit=6", "eval.batch_size=4"],
                         out, config="eval"))
    saved = json.loads((out / "eval" / "fpb_metrics.json").read_text())
    predictions = [json.loads(line) for line in (out / "eval" / "fpb_predictions.jsonl").open()]
    test_set, records = _fpb()
    assert saved["rows"] == pick_rows(records, test_set, EvalSettings(limit=6)) == [p["index"] for p in predictions]
    low, high = saved["accuracy_ci95"]
    assert low <= saved["accuracy"] <= high and high - low > 0.3  # 6 rows say little
    assert saved["conditions"] == {"batch_size": 4, "quant_bits": None, "precision": "32-true", "limit": 6,
                                   "sample": "stratified", "seed": 42}


def test_task_scores_during_training_are_logged_and_keep_the_best_adapter(tiny_model_dir, tmp_path):
    """Issue 13, item 4: `val/<task>/accuracy` at every validation, on a fixed sample of held-out rows, usable
    as `checkpoint.monitor`."""
    from finlora.train import train

    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "quant=none", "adapter=lora", "task=fpb",
                       "trainer=cpu", "trainer.max_steps=6", "trainer.batch_size=4", "trainer.lr=3e-3",
                       "trainer.val_every_n_steps=2", "data.val_size=12", "data.max_length=64", "logger=csv",
                       "eval.enabled=false", "eval.during_training.size=6", "checkpoint.monitor=val/fpb/accuracy",
                       "checkpoint.mode=max"], tmp_path)
    train(cfg)
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        logged = [(int(r["step"]), float(r["val/fpb/accuracy"])) for r in csv.DictReader(f) if r["val/fpb/accuracy"]]
    assert [step for step, _ in logged] == [1, 3, 5]  # Lightning logs validation at the step before it counts
    [best] = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert best.name.startswith("best-step") and "-accuracy" in best.name
    assert float(best.name.rsplit("accuracy", 1)[1].removesuffix(".ckpt")) == max(acc for _, acc in logged)


def test_monitor_needs_a_score_that_is_logged(tmp_path):
    from finlora.config import validate
    from finlora.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.monitor: must be val/loss or a task score val/fpb/<metric>"):
        validate(compose_cfg(["task=fpb", "checkpoint.monitor=val/fpb/accuracy", "eval.during_training.size=0"],
                             tmp_path))


def test_8bit_scoring_with_a_batch_warns_why_scores_move(tiny, tmp_path, caplog):
    """Issue 13, item 2: nothing said that an 8-bit base's scores depend on `eval.batch_size`."""
    from finlora.evaluate import evaluate_sets

    tokenizer, model = tiny
    test_set, records = _fpb()
    with caplog.at_level(logging.WARNING, "finlora.evaluate"):
        evaluate_sets(model, tokenizer, [(test_set, records)], EvalSettings(batch_size=2, limit=2), "32-true", 8,
                      tmp_path, [])
        evaluate_sets(model, tokenizer, [(test_set, records)], EvalSettings(batch_size=1, limit=2), "32-true", 8,
                      tmp_path, [])
    said = [r.getMessage() for r in caplog.records if "8-bit" in r.getMessage()]
    assert len(said) == 1 and "eval.batch_size=2" in said[0] and "eval.batch_size=1 scores each prompt alone" in said[0]
