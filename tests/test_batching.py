"""Batching: every example whole and exactly once per epoch in every mode, seeded orders, and the packed
loss equal to the padded loss on the same examples; the throughput figures reach the run summary."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import DATA_DIR, compose_cfg
from transformers import AutoModelForCausalLM

from finlora.batching import LOSS_POSITIONS, STATS_KEY, model_inputs, pack, pad_right
from finlora.config import Batching, DataConfig, DataSource, ModelConfig, TaskConfig
from finlora.data import TaskDataModule, load_task, read_jsonl
from finlora.loss import answer_loss
from finlora.models import load_tokenizer
from finlora.prompts import IGNORE_INDEX, encode_example
from finlora.train import train


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return load_tokenizer(str(smollm_dir), ModelConfig(name_or_path=str(smollm_dir)))


def _examples(batch: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (input_ids, labels) of each example in a padded or packed batch, cut at the mask or where the
    positions restart; the first label is dropped (packing ignores it, and no loss ever reads it)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][r].tolist(), batch["labels"][r].tolist()
        if "attention_mask" in batch:
            n = int(batch["attention_mask"][r].sum())
            spans = [(0, n)]
        else:
            pos = batch["position_ids"][r].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            spans = list(zip(starts, starts[1:], strict=False))
        out += [(tuple(ids[a:b]), tuple(labels[a + 1:b])) for a, b in spans]
    return out


def _datamodule(tokenizer, batching: Batching, batch_size: int = 8) -> TaskDataModule:
    task = TaskConfig(name="mix", train=[DataSource(file="train/fpb_train.jsonl"),
                                         DataSource(file="train/fiqa_train.jsonl", repeat=2)])
    cfg = DataConfig(max_length=128, val_size=16, batching=batching)
    data = load_task(task, cfg, DATA_DIR)
    data.train = data.train[:300]
    return TaskDataModule(data, tokenizer, cfg, batch_size, shuffle_seed=3)


@pytest.mark.parametrize("batching", list(Batching))
def test_every_example_whole_and_once_per_epoch(tokenizer, batching):
    dm = _datamodule(tokenizer, batching)
    expected = Counter((tuple(e.input_ids), tuple(e.labels[1:])) for e in dm.train_set.items)
    loader = dm.train_dataloader()
    epochs = []
    for epoch in range(2):
        getattr(loader.sampler, "set_epoch", lambda _: None)(epoch)
        batches = list(loader)
        seen = [ex for b in batches for ex in _examples(b)]
        # Padding and a packed row's tail are no example: their labels are all ignored.
        seen = [ex for ex in seen if any(t != IGNORE_INDEX for t in ex[1])]
        assert Counter(seen) == expected
        assert all(b[STATS_KEY].examples == 8 for b in batches[:-1])
        assert sum(b[STATS_KEY].tokens for b in batches) == sum(len(e.input_ids) for e in dm.train_set.items)
        epochs.append(seen)
    again = [ex for b in _datamodule(tokenizer, batching).train_dataloader() for ex in _examples(b)]
    assert [ex for ex in again if any(t != IGNORE_INDEX for t in ex[1])] == epochs[0]  # seeded
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_grouped_and_packed_cut_padding(tokenizer):
    def padding(batching: Batching) -> float:
        stats = [b[STATS_KEY] for b in _datamodule(tokenizer, batching).train_dataloader()]
        return 1 - sum(s.tokens for s in stats) / sum(s.slots for s in stats)

    padded, grouped, packed = (padding(b) for b in (Batching.padded, Batching.grouped, Batching.packed))
    assert grouped < padded / 3 and packed < padded / 3, (padded, grouped, packed)


def test_packed_batches_are_the_padded_batches(tokenizer):
    """Packing changes the layout, never which examples go together, so a run learns what it would padded."""
    padded, packed = (_datamodule(tokenizer, b).train_dataloader() for b in (Batching.padded, Batching.packed))
    for a, b in zip(padded, packed, strict=True):
        assert sorted(_examples(a)) == sorted(ex for ex in _examples(b) if any(t != IGNORE_INDEX for t in ex[1]))


@pytest.mark.parametrize("row_length", [100, 4096])  # several rows with padded tails; one flat row
def test_packed_loss_equals_padded_loss(tiny_model_dir, tokenizer, row_length):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    rows = [r for name in ("fiqa", "fpb") for r in read_jsonl(DATA_DIR / "train" / f"{name}_train.jsonl")[:6]]
    batch = [encode_example(tokenizer, r, 128) for r in rows]
    padded, packed = pad_right(batch, tokenizer.pad_token_id), pack(batch, tokenizer.pad_token_id, row_length)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    losses, grads = [], []
    for inputs in (padded, packed):
        model.zero_grad()
        loss = model(**model_inputs(inputs)).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_static_batches_take_a_few_fixed_shapes_and_give_the_packed_loss(tiny_model_dir, tokenizer):
    """Static batches are the packed batches (same examples together, same loss) in one row of a fixed width
    with a fixed number of loss positions: the shapes a compiled step is built for."""
    static, packed = (_datamodule(tokenizer, b) for b in (Batching.static, Batching.packed))
    shapes = {(1, w) for w in static.static_widths}
    assert len(static.static_widths) <= 16
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    seen = set()
    for i, (a, b) in enumerate(zip(static.train_dataloader(), packed.train_dataloader(), strict=True)):
        seen.add(tuple(a["input_ids"].shape))
        assert a[LOSS_POSITIONS].shape == (static.label_slots,)
        real = [ex for ex in _examples(a) if any(t != IGNORE_INDEX for t in ex[1])]
        assert sorted(real) == sorted(ex for ex in _examples(b) if any(t != IGNORE_INDEX for t in ex[1]))
        if i < 3:
            with torch.no_grad():
                torch.testing.assert_close(answer_loss(model, a), answer_loss(model, b), rtol=1e-5, atol=1e-6)
    assert seen <= shapes and 1 < len(seen) < len(shapes)


def test_run_summary_reports_padding_and_tokens_per_s(tiny_model_dir, tmp_path):
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "quant=none", "adapter=lora", "task=fpb",
                       "trainer=cpu", "trainer.max_steps=4", "trainer.batch_size=4", "trainer.log_every_n_steps=1",
                       "data.val_size=8", "data.max_length=96", "data.batching=packed", "logger=csv",
                       "eval.enabled=false"], tmp_path)
    summary = train(cfg)
    assert 0 <= summary["padding_fraction"] < 0.5 and summary["tokens_per_s"] > 0
    assert summary["compile"] == "eager" and summary["compile_s"] is None and summary["batch_shapes"] >= 1
    header, *rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert {"train/padding_fraction", "train/tokens_per_s"} <= set(header.split(","))
