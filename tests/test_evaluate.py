"""Evaluation: the generate input is the training prompt, left padding changes nothing, eval.py writes
its predictions and metrics for a base model, an adapter and a merged model."""

from __future__ import annotations

import copy
import csv
import json
import logging
from collections import Counter

import pytest
import torch
from conftest import DATA_DIR, compose_cfg
from peft.tuners.lora.variants import DoraLinearVariant

from finlora.adapters import attach_adapter
from finlora.capture import recorded_backend
from finlora.config import (
    AdapterConfig,
    AdapterMethod,
    DecodeCompile,
    EvalSample,
    EvalSettings,
    Int8Cpu,
    ModelConfig,
    QuantConfig,
    TestSet,
)
from finlora.data import read_jsonl
from finlora.dora import FastDoraLinearVariant
from finlora.evaluate import cpu_int8_mode, evaluate, generate, pick_rows, wilson_interval
from finlora.models import load_model, load_tokenizer
from finlora.prompts import encode_example, encode_prompt


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
        generate(model, tokenizer, records, max_new_tokens=2, batch_size=6, share_prefix=False)  # whole prompts
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


def _mixed_records(n_each: int) -> list[dict]:
    """Prompts of every sentiment set, 31 to 150 tokens long, in file order (not sorted by length)."""
    return [r for name in ("fpb", "fiqa", "tfns", "nwgi") for r in read_jsonl(DATA_DIR / "test" / f"{name}_test.jsonl")
            [: n_each * 7 : 7]]


def _one_by_one(model, tokenizer, records: list[dict], max_new_tokens: int, eos: int) -> list[str]:
    """transformers' greedy generate on each prompt alone, unpadded: what any batching must reproduce."""
    answers = []
    for record in records:
        ids = torch.tensor([encode_prompt(tokenizer, record)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        tokens = out[0, ids.shape[1]:].tolist()
        answers.append(tokenizer.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens,
                                        skip_special_tokens=True))
    return answers


def test_greedy_answers_are_identical_at_every_batch_size(lively):
    """Issue 13, item 1: length-sorted batches of 1, 8, 32 or `auto` rows give, on an fp32 base, the answers
    of each prompt generated alone, in the records' order."""
    tokenizer, model = lively
    records = _mixed_records(10)
    reference = _one_by_one(model, tokenizer, records, 6, tokenizer.eos_token_id)
    assert len(set(reference)) > 10  # the prompts really get different answers
    for batch_size in (1, 8, 32, "auto"):
        assert generate(model, tokenizer, records, 6, batch_size) == reference, batch_size
    assert model.training is False


def test_shared_prefix_runs_once_and_changes_no_answer(lively):
    """`eval.share_prefix`: FinLoRA's instruction, the prefix every FPB prompt starts with, goes through the
    model once, alone; the batches then hold only the rest of each prompt, and every answer is the one the prompt
    gets alone and whole (fp32), at every batch size."""
    from finlora.evaluate import MIN_PREFIX, shared_prefix

    tokenizer, model = lively
    records = _fpb()[1][::60]
    prompts = [encode_prompt(tokenizer, r) for r in records]
    shared = shared_prefix(prompts)
    assert shared >= MIN_PREFIX
    assert tokenizer.decode(prompts[0][:shared]).startswith("Instruction: What is the sentiment")
    widths = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    answers = generate(model, tokenizer, records, 6, 8)
    hook.remove()
    assert widths[0] == (1, shared) and widths.count((1, shared)) == 1
    assert all(w[1] <= max(len(p) for p in prompts) - shared for w in widths[1:])  # no batch re-reads the prefix
    assert len(set(answers)) > 3
    assert answers == _one_by_one(model, tokenizer, records, 6, tokenizer.eos_token_id)
    assert generate(model, tokenizer, records, 6, 3) == answers == generate(model, tokenizer, records, 6, 8,
                                                                             share_prefix=False)
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each prompt keeps a token of its own


def test_static_cache_path_gives_the_same_answers(lively, monkeypatch):
    """The CUDA path (a static KV cache of one rounded-up length, every batch filled to the same number of
    rows), run here on the CPU where transformers does not compile it: the same answers, in order."""
    import finlora.evaluate

    tokenizer, model = lively
    records = _mixed_records(5)
    eager = generate(model, tokenizer, records, 6, 8)
    calls = []
    original = type(model).generate

    def spy(self, *args, **kwargs):
        cache = _cache_of(kwargs)
        calls.append((kwargs["input_ids"].shape[0], type(cache).__name__, cache.get_max_length(), id(cache)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(finlora.evaluate, "compiles_decoding", lambda device: True)
    monkeypatch.setattr(type(model), "generate", spy)
    assert generate(model, tokenizer, records, 6, 8) == eager
    # 20 rows: 8 + 8 + 4 filled to 8, all on one cache, emptied before each batch (`TaskCache`)
    assert len(calls) == 3 and len({c[:3] for c in calls}) == 1 and calls[0][:3] == (8, "StaticCache", 256)
    assert len({c[3] for c in calls}) == 1


def _cache_of(generate_kwargs: dict):
    """The KV cache finlora hands `generate` (by transformers' new name or its old one)."""
    return generate_kwargs.get("cache", generate_kwargs.get("past_key_values"))


def test_a_tasks_sets_share_one_decode_shape(lively, monkeypatch):
    """The CUDA path over several sets at once (`generate_sets`, as `evaluate_sets` runs a task): sets of 20, 5
    and 45 rows, one of them with a prompt long enough for a longer cache, all go through one shape of rows ×
    cache length, so transformers compiles the decode step once; each set's answers are its answers alone."""
    import finlora.evaluate
    from finlora.evaluate import generate_sets

    tokenizer, model = lively
    records = _mixed_records(12)
    long = dict(records[0], context=records[0]["context"].replace("Input: ", "Input: " + "shares fell " * 120))
    sets = [("a", records[:20], 4), ("b", records[20:24] + [long], 6), ("c", records[:45], 4)]
    alone = [generate(model, tokenizer, rows, new, 8) for _, rows, new in sets]
    assert len(encode_prompt(tokenizer, long)) + 6 > 256  # the long prompt's cache needs a second step of 256
    calls = []
    original = type(model).generate

    def spy(self, *args, **kwargs):
        cache = _cache_of(kwargs)
        calls.append((kwargs["input_ids"].shape[0], type(cache).__name__, cache.get_max_length(),
                      kwargs["compile_config"].backend))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(finlora.evaluate, "compiles_decoding", lambda device: True)
    monkeypatch.setattr(type(model), "generate", spy)
    assert list(generate_sets(model, tokenizer, sets, "auto")) == alone
    # auto on the CPU: at most 32 rows; 45 rows in two batches of 24 sets the rows of every batch
    assert len(calls) == 1 + 1 + 2 and set(calls) == {(24, "StaticCache", 512, recorded_backend)}
    calls.clear()
    assert list(generate_sets(model, tokenizer, sets, "auto", decode_compile=DecodeCompile.inductor)) == alone
    assert {c[3] for c in calls} == {"inductor"}


def test_auto_batch_halves_when_out_of_memory_and_a_fixed_one_says_so(lively, monkeypatch, tmp_path):
    """`auto` goes on with half the rows after an out-of-memory error (as CUDA raises it); a batch size the
    user chose is not second-guessed: the error reaches the caller, whose advice names a smaller one."""
    from finlora.config import validate
    from finlora.train import oom_advice

    tokenizer, model = lively
    records = _mixed_records(5)
    expected = generate(model, tokenizer, records, 4, 8)
    original, sizes = type(model).generate, []

    def tight(self, *args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", tight)
    assert generate(model, tokenizer, records, 4, "auto") == expected
    assert sizes[:3] == [20, 10, 5] and set(sizes[3:]) == {5}
    with pytest.raises(torch.OutOfMemoryError):
        generate(model, tokenizer, records, 4, 8)
    assert "eval.batch_size=1" in str(oom_advice(validate(compose_cfg([], tmp_path)), "eval"))
    assert "eval.batch_size=4" in str(oom_advice(validate(compose_cfg(["eval.batch_size=8"], tmp_path)), "eval"))


def test_each_row_stops_at_its_eos(lively):
    """A row ends at EOS while the others of its batch go on to max_new_tokens: made visible by declaring
    EOS a token that some rows generate early and others never."""
    tokenizer, model = lively
    records = _mixed_records(6)
    tokens = []
    for record in records:
        ids = torch.tensor([encode_prompt(tokenizer, record)])
        tokens.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist())
    early = Counter(t for row in tokens for t in set(row[1:4]))
    eos = next(t for t, n in early.most_common() if n < len(records) and t != tokenizer.pad_token_id)
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(eos)
    assert stopping.eos_token_id == eos
    stopped = generate(model, stopping, records, 6, 32)
    assert stopped == _one_by_one(model, tokenizer, records, 6, eos)
    cut = [row[:row.index(eos)] if eos in row else row for row in tokens]
    assert stopped == [tokenizer.decode(row, skip_special_tokens=True) for row in cut]
    assert any(eos in row for row in tokens) and any(eos not in row for row in tokens)


@pytest.mark.slow
def test_real_embedded_model_answers_identical_alone_and_batched(smollm_dir):
    cfg = ModelConfig(name_or_path=str(smollm_dir))
    tokenizer = load_tokenizer(str(smollm_dir), cfg)
    model = load_model(str(smollm_dir), cfg, QuantConfig(), torch.float32, torch.device("cpu"))
    records = _mixed_records(2)
    assert generate(model, tokenizer, records, 4, 8) == _one_by_one(model, tokenizer, records, 4,
                                                                     tokenizer.eos_token_id)


def test_8bit_on_the_cpu_scores_through_the_dequantized_weight_batch_invariant(tiny_model_dir):
    """`eval.int8_cpu=dequant`: bitsandbytes' CPU training path, whose answers do not depend on the batch; the
    8-bit layers are back in eval mode afterwards, and LLM.int8 leaves them there."""
    import bitsandbytes as bnb

    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir), cfg)
    model = load_model(str(tiny_model_dir), cfg, QuantConfig(bits=8), torch.float32, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    records = _mixed_records(6)
    seen = []
    hook = layers[0].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    alone = [generate(model, tokenizer, [r], 4, 1, int8_cpu=Int8Cpu.dequant)[0] for r in records]
    assert generate(model, tokenizer, records, 4, 24, int8_cpu=Int8Cpu.dequant) == alone
    assert seen and all(seen) and not any(m.training for m in layers)
    seen.clear()
    assert len(generate(model, tokenizer, records[:2], 4, 2, int8_cpu=Int8Cpu.llm_int8)) == 2
    hook.remove()
    shapes = []  # LLM.int8 would score a prefix computed alone differently: no shared prefix under it
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    generate(model, tokenizer, records[:4], 2, 4, int8_cpu=Int8Cpu.llm_int8)
    hook.remove()
    assert shapes and 1 not in shapes
    assert seen and not any(seen) and not any(m.state.is_training for m in layers)


def _8bit_with_adapter(model_dir, method: AdapterMethod):
    """The tiny model on an 8-bit base with a fresh adapter whose B is not zero (so that it changes outputs)."""
    cfg = ModelConfig(name_or_path=str(model_dir))
    base = load_model(str(model_dir), cfg, QuantConfig(bits=8), torch.float32, torch.device("cpu"))
    model = attach_adapter(base, AdapterConfig(method=method, r=4), gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return load_tokenizer(str(model_dir), cfg), model


@pytest.mark.parametrize("method", [AdapterMethod.lora, AdapterMethod.dora])
def test_bf16_copy_computes_the_8bit_model_with_its_adapter_and_leaves_it_untouched(tiny_model_dir, method):
    """`eval.int8_cpu=bf16`: the copy's logits are the adapted 8-bit model's (its int8 weights dequantized, in
    fp32) to bf16's rounding, far closer than the base without the adapter; the copy holds plain bf16 layers
    only, and the model it came from keeps its 8-bit layers, adapter, values and trainable parameters."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from finlora.evaluate import int8_as_bf16, int8_dequantized

    _, model = _8bit_with_adapter(tiny_model_dir, method)
    ids = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    int8_dequantized(model, True)  # the function the CPU trained: the int8 weight dequantized, fp32
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            unadapted = model(input_ids=ids).logits
    model.eval()
    twin = int8_as_bf16(model)
    with torch.no_grad():
        got = twin(input_ids=ids).logits.float()
    error, adapter_effect = (got - want).abs().max(), (unadapted - want).abs().max()
    assert error < adapter_effect / 20, (error, adapter_effect)  # bf16 rounding (an exact fp32 merge: ~1e-6)
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, LoraLayer)) for m in twin.modules())
    assert {p.dtype for p in twin.parameters()} == {torch.bfloat16}
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14  # 2 layers × 7 projections
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert int8_as_bf16(twin) is twin  # nothing 8-bit left: a copy is made once


def test_bf16_answers_are_batch_invariant_and_recorded(tiny_model_dir, tmp_path, caplog):
    """The bf16 copy answers alike at batch sizes 1 and 8 here (no LLM.int8 outlier columns chosen per batch; on
    the real model bf16 rounding still flips about 2% of answers, docs/benchmarks.md, and the run says so), is the
    CPU's default, and `<set>_metrics.json` says it was used."""
    from finlora.evaluate import evaluate_sets

    tokenizer, model = _8bit_with_adapter(tiny_model_dir, AdapterMethod.dora)
    records = _mixed_records(4)
    alone = generate(model, tokenizer, records, 4, 1, int8_cpu=Int8Cpu.bf16)
    assert generate(model, tokenizer, records, 4, 8, int8_cpu=Int8Cpu.bf16) == alone
    assert EvalSettings().int8_cpu is Int8Cpu.bf16
    test_set, rows = _fpb()
    with caplog.at_level(logging.WARNING, "finlora.evaluate"):
        evaluate_sets(model, tokenizer, [(test_set, rows)], EvalSettings(batch_size=4, limit=4), "32-true", 8,
                      tmp_path, [])
    recorded = json.loads((tmp_path / "fpb_metrics.json").read_text())["conditions"]["int8_cpu"]
    if cpu_int8_mode(Int8Cpu.bf16) is Int8Cpu.dequant:  # no native bf16 matmuls here: the run says what it used
        assert recorded == "dequant"
        return
    [said] = [r.getMessage() for r in caplog.records if "8-bit" in r.getMessage()]
    assert "bf16 matmuls round by batch shape" in said and "eval.int8_cpu=dequant" in said
    assert recorded == "bf16"


def test_auto_batches_are_as_few_and_as_even_as_memory_allows(tiny):
    from finlora.evaluate import CPU_BATCH, auto_batch_size, even_batches

    assert even_batches(1212, 1024, 8) == 608  # two batches, 4 filler rows, not 1,024 + 188 filled to 1,024
    assert even_batches(235, 1024, 8) == 240 and even_batches(200, 64, 1) == 50 and even_batches(7, 64, 1) == 7
    _, model = tiny
    assert auto_batch_size(model, torch.device("cpu"), 256, 1000, "32-true") == CPU_BATCH == 32  # as before
    assert auto_batch_size(model, torch.device("cpu"), 256, 10, "32-true") == 10


def test_auto_on_the_cpu_keeps_the_batches_of_before(lively, monkeypatch):
    """On the CPU `auto` cuts the sorted prompts as batch size 32 did (32 + 8 for 40 rows, not 20 + 20): an
    8-bit base's LLM.int8 answers depend on the batches, so the quickstart's scores stay what they were."""
    tokenizer, model = lively
    original, sizes = type(model).generate, []

    def spy(self, *args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    generate(model, tokenizer, _mixed_records(10), 2, "auto")
    assert sizes == [32, 8]


def test_batch_size_is_auto_or_a_positive_integer():
    assert EvalSettings().batch_size == "auto" and not EvalSettings().problems()
    assert not EvalSettings(batch_size=64).problems()
    for bad in (0, -2, "big", 2.5, True):
        [problem] = EvalSettings(batch_size=bad).problems()
        assert problem.startswith("eval.batch_size: must be auto or an integer > 0"), problem


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


def test_compiled_decoding_is_recorded_with_the_conditions(tiny, tmp_path, monkeypatch):
    """Where the decode step is compiled (CUDA; here the CPU standing in), how it was compiled is among the
    conditions of every set's metrics: Inductor's fused kernels and the model's own round differently."""
    import finlora.evaluate
    from finlora.evaluate import evaluate_sets

    tokenizer, model = tiny
    monkeypatch.setattr(finlora.evaluate, "compiles_decoding", lambda device: True)
    test_set, records = _fpb()
    settings = EvalSettings(limit=4, batch_size=4, decode_compile=DecodeCompile.inductor)
    evaluate_sets(model, tokenizer, [(test_set, records)], settings, "32-true", None, tmp_path, [])
    assert json.loads((tmp_path / "fpb_metrics.json").read_text())["conditions"]["decode_compile"] == "inductor"


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

    with pytest.raises(ConfigError,
                       match="checkpoint.monitor: this run does not log 'val/fpb/accuracy'; it logs val/loss"):
        validate(compose_cfg(["task=fpb", "checkpoint.monitor=val/fpb/accuracy", "eval.during_training.size=0"],
                             tmp_path))


def test_8bit_scoring_with_a_batch_warns_why_scores_move(tiny, tmp_path, caplog):
    """Issue 13, item 2: nothing said that an 8-bit base's scores depend on `eval.batch_size`. They do with
    LLM.int8 and a batch; not at batch size 1, nor on the CPU through the dequantized weight."""
    from finlora.evaluate import evaluate_sets

    tokenizer, model = tiny
    test_set, records = _fpb()
    with caplog.at_level(logging.WARNING, "finlora.evaluate"):
        for batch_size, int8_cpu in ((2, Int8Cpu.llm_int8), (1, Int8Cpu.llm_int8), (2, Int8Cpu.dequant)):
            evaluate_sets(model, tokenizer, [(test_set, records)],
                          EvalSettings(batch_size=batch_size, limit=2, int8_cpu=int8_cpu), "32-true", 8, tmp_path, [])
    said = [r.getMessage() for r in caplog.records if "8-bit" in r.getMessage()]
    assert len(said) == 1 and "eval.batch_size=2" in said[0] and "eval.batch_size=1 scores each prompt alone" in said[0]


def test_bf16_scoring_falls_back_to_dequant_on_a_cpu_without_native_bf16(monkeypatch, caplog):
    """Emulated bf16 matmuls are slower than float32: such a CPU scores an 8-bit base through `dequant`."""
    import finlora.compat.torch
    from finlora.config import Int8Cpu

    cpu_int8_mode.cache_clear()
    monkeypatch.setattr(finlora.compat.torch, "mkldnn_bf16_supported", lambda: False)
    try:
        with caplog.at_level("WARNING", logger="finlora.evaluate"):
            assert cpu_int8_mode(Int8Cpu.bf16) is Int8Cpu.dequant
        assert cpu_int8_mode(Int8Cpu.llm_int8) is Int8Cpu.llm_int8
        assert any("no native bf16 matmuls" in r.getMessage() for r in caplog.records)
    finally:
        cpu_int8_mode.cache_clear()


def _4bit_with_adapter(model_dir, method: AdapterMethod, cpu_kernel: bool = False):
    """The model on a 4-bit (NF4) base with a fresh adapter whose B is not zero, DoRA computed by finlora's DoRA.
    Unless `cpu_kernel`, bitsandbytes computes its 4-bit layers as on CUDA past its fused kernels' few rows: the
    weight dequantized (`dequantize_4bit`), then `F.linear`; on an AVX512-BF16 CPU its eval mode would otherwise
    repack the weights for a fused bf16 kernel (`Linear4bit.support_avx512bf16_for_cpu`)."""
    import bitsandbytes as bnb

    from finlora.dora import use_fast_dora

    cfg = ModelConfig(name_or_path=str(model_dir))
    base = load_model(str(model_dir), cfg, QuantConfig(bits=4), torch.float32, torch.device("cpu"))
    for layer in base.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu &= cpu_kernel
    model = attach_adapter(base, AdapterConfig(method=method, r=4), gradient_checkpointing=False)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    use_fast_dora(model)
    return load_tokenizer(str(model_dir), cfg), model


@pytest.mark.parametrize("method", [AdapterMethod.lora, AdapterMethod.dora])
def test_dense_4bit_copy_answers_as_bitsandbytes_and_leaves_the_model_untouched(lively_dir, method):
    """`eval.four_bit=dense`: the copy's logits equal, bit for bit, those of bitsandbytes' 4-bit layers computing
    through their dequantized weight, with the adapter (LoRA, or finlora's DoRA) unmerged on top; greedy answers
    are the same at batch sizes 1, 8 and 32. The copy holds plain layers where the 4-bit ones were and shares every
    other tensor (the adapter's too), and transformers would compile its decode step (not the model's); the model
    keeps its 4-bit layers, values and trainable parameters."""
    import bitsandbytes as bnb
    from transformers import CompileConfig, GenerationConfig, StaticCache

    from finlora.compat.transformers import compile_on_every_device, compiles_decode_step
    from finlora.config import FourBitEval
    from finlora.evaluate import four_bit_as_dense

    tokenizer, model = _4bit_with_adapter(lively_dir, method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    twin, mode = four_bit_as_dense(model, FourBitEval.dense)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, twin(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.equal(model(input_ids=ids).logits, want)  # the adapter changes the outputs
    assert mode is FourBitEval.dense and torch.equal(got, want)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in twin.modules())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 2 layers × 7 projections
    assert twin.get_base_model().hf_quantizer is None and model.get_base_model().hf_quantizer is not None
    lora = {n: p for n, p in twin.named_parameters() if "lora_" in n}
    assert lora and all(p is model.get_parameter(n) for n, p in lora.items())
    assert four_bit_as_dense(twin, FourBitEval.dense) == (twin, None)  # nothing 4-bit left: one copy
    compile_config = CompileConfig()
    compile_on_every_device(compile_config)  # transformers' own switch: judged as on CUDA, here on the CPU
    cache = StaticCache(config=model.config, max_cache_len=32)
    compiles = [compiles_decode_step(m.get_base_model(), {"cache": cache, "past_key_values": cache},
                                     GenerationConfig(compile_config=compile_config)) for m in (twin, model)]
    assert compiles == [True, False]  # transformers compiles the copy's decode step, not bitsandbytes' layers
    records = _mixed_records(5)
    for batch_size, rows in ((32, records), (8, records), (1, records[::4])):
        kernel = generate(model, tokenizer, rows, 5, batch_size, four_bit=FourBitEval.kernel)
        assert generate(model, tokenizer, rows, 5, batch_size, four_bit=FourBitEval.dense) == kernel, batch_size
        assert len(set(kernel)) > len(rows) // 2  # the prompts really get different answers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_dense_copy_of_weights_repacked_for_the_cpu_kernel(lively_dir):
    """On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight at its first eval-mode forward for a fused bf16
    kernel (block scales rounded to bf16, the weight formed in bf16); the copy then holds the weight that kernel
    computes with (values exact in bf16): on inputs exact in bf16, a layer's outputs are the kernel's up to its
    bf16 rounding of them."""
    import bitsandbytes as bnb

    from finlora.quant.generation import _dequantized_4bit

    _, model = _4bit_with_adapter(lively_dir, AdapterMethod.lora, cpu_kernel=True)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    unpacked = _dequantized_4bit(layer)
    layer.eval()
    with torch.no_grad():
        want = layer(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the weights as they are")
    dense = _dequantized_4bit(layer)
    assert dense.dtype == torch.float32 and dense.shape == unpacked.shape
    assert torch.equal(dense.bfloat16().float(), dense) and not torch.equal(unpacked.bfloat16().float(), unpacked)
    assert (x @ dense.T - want).abs().max() <= 2**-8 * want.abs().max()  # the kernel's bf16 outputs


def test_four_bit_mode_is_chosen_by_memory_and_recorded(lively_dir, tmp_path, caplog):
    """`eval.four_bit=auto` makes the dense copy when it takes at most half of the free memory, else keeps
    bitsandbytes' kernels, saying which and why in one line (for all sets) that names the key; `<set>_metrics.json`
    records the mode used."""
    from finlora.config import FourBitEval
    from finlora.evaluate import evaluate_sets, four_bit_mode

    gib = 2**30
    assert four_bit_mode(FourBitEval.auto, 13 * gib, 70 * gib)[0] is FourBitEval.dense
    mode, why = four_bit_mode(FourBitEval.auto, 130 * gib, 38 * gib)  # Llama-3.1-70B's layers beside its 4-bit base
    assert mode is FourBitEval.kernel and why.startswith("eval.four_bit=auto: kernel") and "130.00 GiB" in why
    assert four_bit_mode(FourBitEval.auto, 20 * gib, 39 * gib)[0] is FourBitEval.kernel  # fits, but not in half
    assert four_bit_mode(FourBitEval.kernel, gib, 80 * gib)[0] is FourBitEval.kernel
    assert four_bit_mode(FourBitEval.dense, 40 * gib, 38 * gib)[0] is FourBitEval.dense  # asked for: as asked
    assert EvalSettings().four_bit is FourBitEval.auto
    tokenizer, model = _4bit_with_adapter(lively_dir, AdapterMethod.lora)
    test_set, rows = _fpb()
    for asked, used in (("auto", "dense"), ("kernel", "kernel")):
        caplog.clear()
        with caplog.at_level(logging.INFO, "finlora.evaluate"):
            evaluate_sets(model, tokenizer, [(test_set, rows)],
                          EvalSettings(batch_size=4, limit=4, four_bit=FourBitEval(asked)), "32-true", 4, tmp_path, [])
        said = [r.getMessage() for r in caplog.records if "eval.four_bit" in r.getMessage()]
        assert said == [] if asked == "kernel" else len(said) == 1 and said[0].startswith("eval.four_bit=auto: dense")
        assert json.loads((tmp_path / "fpb_metrics.json").read_text())["conditions"]["four_bit"] == used


def test_dense_that_cannot_fit_is_refused_before_the_model_loads(tmp_path):
    """`eval.four_bit=dense` with a base whose dense layers cannot fit: refused from the model's config alone,
    naming the key (this folder holds a config of Llama-3.1-70B's layer shapes, 800 layers, about 3 TB dense in
    float32, and no weights: nothing else could load)."""
    from transformers import LlamaConfig

    from finlora.errors import ConfigError
    from finlora.models import SHAPES

    folder = tmp_path / "llama-70b-config-only"
    LlamaConfig(**SHAPES["llama-3.1-70b"], num_hidden_layers=800).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"eval.four_bit=dense: the 4-bit base \(\d+\.\d GiB\) and its dense copy"):
        evaluate(compose_cfg([f"model.name_or_path={folder}", "quant=4bit", "eval.four_bit=dense",
                              "accelerator=cpu"], tmp_path / "out", config="eval"))
