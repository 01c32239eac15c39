"""Issue 16's study parts: the DoRA magnitudes' own learning rate (read from a real optimizer step), the
[INST] training-prompt ablation (what training and evaluation actually tokenized), the seed aggregation
of the sweep report (intervals on known numbers), and the study's command end to end (slow)."""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import DATA_DIR, ROOT, compose_cfg
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import finlora.data.datamodule
import finlora.evaluate
from finlora.adapters import attach_adapter
from finlora.batching import pad_right
from finlora.config import (
    AdapterConfig,
    AdapterMethod,
    DataConfig,
    ModelConfig,
    QuantConfig,
    Scheduler,
    TrainerConfig,
    TrainPrompt,
    validate,
)
from finlora.data import read_jsonl
from finlora.errors import ConfigError
from finlora.models import load_model, load_tokenizer
from finlora.module import MAGNITUDE, FinetuneModule
from finlora.prompts import encode_example, encode_prompt
from finlora.run.report import difference_stats, load_sweep, seed_stats, t_quantile
from finlora.train import train

report_main = runpy.run_path(str(ROOT / "scripts" / "report.py"))["main"]


# --- adapter.magnitude_lr_scale ----------------------------------------------------------------------------------

class BeforeStep(L.Callback):
    """Every trainable parameter and its gradient just before the (only) optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad]
        self.values = {n: p.detach().clone() for n, p in named}
        self.grads = {n: p.grad.detach().clone() for n, p in named}


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_magnitude_learning_rate_is_scaled(tiny_model_dir, tmp_path, scale):
    """One AdamW step from fresh moments moves each parameter by lr·g/(|g|+eps): the magnitudes by the scaled
    learning rate, everything else by trainer.lr; the saved adapter has the same tensors either way."""
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir), model_cfg)
    base = load_model(str(tiny_model_dir), model_cfg, QuantConfig(), torch.float32, torch.device("cpu"))
    model = attach_adapter(base, AdapterConfig(method=AdapterMethod.dora, r=4, alpha=8, dropout=0.0,
                                               magnitude_lr_scale=scale), gradient_checkpointing=False)
    rows = read_jsonl(DATA_DIR / "train" / "fpb_train.jsonl")[:4]
    batch = pad_right([encode_example(tokenizer, r, 96) for r in rows], tokenizer.pad_token_id)
    lr = 1e-3
    module = FinetuneModule(model, TrainerConfig(lr=lr, scheduler=Scheduler.constant, grad_clip=0, max_steps=1), scale)
    seen = BeforeStep()
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=1, logger=False, callbacks=[seen],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))

    magnitudes = {n for n, p in model.named_parameters() if p.requires_grad and MAGNITUDE in n}
    assert len(magnitudes) == 2 * 3  # two layers × q, k, v
    groups = trainer.optimizers[0].param_groups
    by_id = {id(p): n for n, p in model.named_parameters()}
    if scale == 1:
        assert [g["lr"] for g in groups] == [lr]
    else:
        assert [g["lr"] for g in groups] == [lr, lr * scale]
        assert {by_id[id(p)] for p in groups[1]["params"]} == magnitudes
        assert not magnitudes & {by_id[id(p)] for p in groups[0]["params"]}
    moved = {"magnitude": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        step_lr = lr * scale if name in magnitudes else lr
        g = seen.grads[name]
        expected = seen.values[name] - step_lr * g / (g.abs() + 1e-8)
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-6), name
        clear = g.abs() > 1e-5  # where eps is negligible the step is exactly the learning rate
        moved["magnitude" if name in magnitudes else "other"].append((p.detach() - seen.values[name]).abs()[clear])
    assert torch.allclose(torch.cat(moved["magnitude"]), torch.tensor(lr * scale), rtol=1e-3)
    assert torch.allclose(torch.cat(moved["other"]), torch.tensor(lr), rtol=1e-3)

    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sum(k.endswith(MAGNITUDE) for k in keys) == 6
    assert all(k.endswith((MAGNITUDE, "lora_A.weight", "lora_B.weight")) for k in keys)
    assert "magnitude_lr_scale" not in (tmp_path / "adapter_config.json").read_text()


@pytest.mark.parametrize("overrides,message", [
    (["adapter=lora", "adapter.magnitude_lr_scale=10"],
     "adapter.magnitude_lr_scale: only DoRA has magnitude vectors; with adapter.method=lora it must stay 1"),
    (["adapter=none", "quant=none", "adapter.magnitude_lr_scale=0.5"], "with adapter.method=none it must stay 1"),
    (["adapter=dora", "adapter.magnitude_lr_scale=0"], "adapter.magnitude_lr_scale: must be > 0, got 0.0"),
])
def test_magnitude_lr_scale_is_checked(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(overrides, tmp_path))


def test_magnitude_lr_scale_is_accepted_for_dora(tmp_path):
    cfg = validate(compose_cfg(["adapter=dora", "adapter.magnitude_lr_scale=10"], tmp_path))
    assert cfg.adapter.magnitude_lr_scale == 10


# --- data.train_prompt ------------------------------------------------------------------------------------------

def test_finlora_inst_wraps_the_training_prompt_only(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)))
    record = read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[0]
    answer = tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    wrapped = tokenizer(f"[INST] {record['context']} [/INST]")["input_ids"]
    assert encode_example(tokenizer, record, 512, TrainPrompt.finlora_inst).input_ids == wrapped + answer
    assert encode_example(tokenizer, record, 512).input_ids == encode_prompt(tokenizer, record) + answer
    assert encode_prompt(tokenizer, record) == tokenizer(record["context"])["input_ids"]


@pytest.mark.parametrize("style", ["plain", "finlora_inst"])
def test_training_and_evaluation_prompts_are_as_configured(tiny_model_dir, tmp_path, monkeypatch, style):
    """A whole run: every training and validation-loss example is tokenized with the configured prompt, every
    generation (in-training score and test stage) with the raw context; the run's config and metrics say so."""
    tokenizer = load_tokenizer(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)))
    trained, generated = [], []

    def pack(batch, **kwargs):
        trained.extend(tokenizer.decode(e.input_ids) for e in batch)
        return real_pack(batch, **kwargs)

    def encode_prompt(tok, record, style):  # the prompt generate builds (on the CPU its shared prefix goes in first)
        ids = real_encode_prompt(tok, record, style)
        generated.append(tokenizer.decode(ids))
        return ids

    real_pack, real_encode_prompt = finlora.data.datamodule.pack, finlora.evaluate.encode_prompt
    monkeypatch.setattr(finlora.data.datamodule, "pack", pack)  # records what the real function is given, then runs it
    monkeypatch.setattr(finlora.evaluate, "encode_prompt", encode_prompt)
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "quant=none", "adapter=lora", "task=fpb",
                       "trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.val_every_n_steps=2",
                       "data.val_size=4", "data.max_length=128", "logger=csv", "eval.limit=3",
                       "eval.during_training.size=4", f"data.train_prompt={style}"], tmp_path)
    summary = train(cfg)

    contexts = {r["context"] for r in read_jsonl(DATA_DIR / "train" / "fpb_train.jsonl")}
    contexts |= {r["context"] for r in read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")}
    assert len(trained) == 2 * 4 + 4  # two steps of 4, and the 4 validation-loss rows
    wrapped = style == "finlora_inst"
    for text in trained:
        prompt = text.rsplit(" [/INST]", 1)[0].removeprefix("[INST] ") if wrapped else text
        assert text.startswith("[INST] Instruction") == wrapped and ("[/INST]" in text) == wrapped
        assert any(prompt.startswith(c) for c in contexts)
    assert len(generated) == 4 + 3  # the in-training score's 4 rows, the test stage's 3
    assert all(g in contexts for g in generated), generated
    assert OmegaConf.load(tmp_path / "config.yaml").data.train_prompt == style
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["train_prompt"], metrics["eval_prompt"]) == (style, "plain") == (summary["train_prompt"],
                                                                                     "plain")


def test_train_prompt_is_a_checked_choice():
    with pytest.raises(Exception, match="data.train_prompt"):
        compose_cfg(["data.train_prompt=inst"])
    assert DataConfig().train_prompt is TrainPrompt.plain


# --- seed aggregation in the sweep report ---------------------------------------------------------------------

@pytest.mark.parametrize("df,t", [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (9, 2.2621572),
                                  (29, 2.0452296), (120, 1.9799304)])
def test_t_quantile_matches_the_tables(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)


def test_seed_stats_on_known_numbers():
    s = seed_stats([0.70, 0.72, 0.74])
    half = 4.3026527 * 0.02 / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.72), pytest.approx(0.02))
    assert (s.low, s.high) == (pytest.approx(0.72 - half), pytest.approx(0.72 + half))
    assert s.text(scale=100, digits=1) == "72.0 ± 2.0 [67.0, 77.0]"
    one = seed_stats([0.5])
    assert (one.std, one.low, one.text()) == (None, None, "0.500 (n=1)")
    d = difference_stats([0.70, 0.72, 0.74], [0.60, 0.61, 0.62])
    se = math.sqrt(0.02**2 / 3 + 0.01**2 / 3)
    assert d.mean == pytest.approx(0.11) and d.std == pytest.approx(se)
    assert (d.low, d.high) == (pytest.approx(0.11 - 4.3026527 * se), pytest.approx(0.11 + 4.3026527 * se))


def _job(sweep_dir, num: int, overrides: dict, status: str, accuracy: float | None):
    """A job folder as `train.py -m` leaves one, with the files the report reads."""
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    job = sweep_dir / f"{num}_{name}"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"{k}={v}" for k, v in overrides.items()]), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": str(ROOT)}, "job": {"name": "train"},
                                               "sweeper": {"_target_": "hydra._internal.BasicSweeper"}}}),
                   job / ".hydra" / "hydra.yaml")
    (job / "job.json").write_text(json.dumps({"status": status}))
    method = overrides["adapter"]
    OmegaConf.save(OmegaConf.create({"adapter": {"method": method, "r": 8}, "quant": {"bits": None},
                                     "seed": overrides["seed"]}), job / "config.yaml")
    if accuracy is not None:
        (job / "metrics.json").write_text(json.dumps({"steps": 10, "test/fpb/accuracy": accuracy}))


def test_report_aggregates_seeds_per_cell(tmp_path):
    sweep_dir = tmp_path / "sweep"
    values = {"lora": [0.70, 0.72, 0.74], "dora": [0.60, 0.61, 0.62]}
    num = 0
    for method, accs in values.items():
        for seed, acc in enumerate(accs, 1):
            _job(sweep_dir, num, {"adapter": method, "seed": seed}, "ok", acc)
            num += 1
    _job(sweep_dir, num, {"adapter": "dora", "seed": 4}, "failed", None)  # not part of any mean
    sweep = load_sweep(sweep_dir)
    assert [(c.values, len(c.jobs)) for c in sweep.cells] == [({"adapter": "lora"}, 3), ({"adapter": "dora"}, 3)]
    assert report_main([str(sweep_dir)]) == 0
    report = (sweep_dir / "report.md").read_text()
    assert "| adapter | seeds | test/fpb/accuracy |" in report
    assert "| lora | 1,2,3 | 0.720 ± 0.020 [0.670, 0.770] |" in report
    assert "| dora | 1,2,3 | 0.610 ± 0.010 [0.585, 0.635] |" in report
    assert (sweep_dir / "metric_by_cell.png").read_bytes()[:4] == b"\x89PNG"


# --- the study: scripts/dora_gap.py -------------------------------------------------------------------------------

dora_gap = runpy.run_path(str(ROOT / "scripts" / "dora_gap.py"))
SMOKE = ["trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4", "data.max_length=96", "data.val_size=8",
         "eval.limit=4", "eval.batch_size=8", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_study_smoke_sweep_and_report(tiny_model_dir, tmp_path):
    """The real command on the tiny model, 2 steps a job: two cells × two seeds as `train.py -m` sweeps, the
    report from the run files it keeps (predictions included); a job cut short is rerun alone by the same
    command. (Issue 37's cells and analysis: tests/test_gap_study.py.)"""
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    command = [sys.executable, str(ROOT / "scripts" / "dora_gap.py"), "--runs", str(runs), "--docs", str(docs),
               "--parallel", "2", "--seeds", "1", "2", "--cells", "lora-inst-a16-d0.05", "dora-raw-a16-d0.05-mlr10",
               "--", f"model.name_or_path={tiny_model_dir}", *SMOKE]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (docs / "dora_gap.md").read_text()
    assert "| LoRA, [INST] prompt, alpha 16, dropout 0.05, 2 steps | 1,2 | " in report
    assert "| DoRA, raw prompt, alpha 16, dropout 0.05, magnitude lr ×10, 2 steps | 1,2 | " in report
    for cell, key, value in (("lora-inst-a16-d0.05", "data.train_prompt", "finlora_inst"),
                             ("dora-raw-a16-d0.05-mlr10", "adapter.magnitude_lr_scale", 10.0)):
        sweep = load_sweep(runs / cell)
        assert sweep.swept == ["seed"] and [j.status for j in sweep.jobs] == ["ok", "ok"]
        for job in sweep.jobs:
            copied = docs / "dora_gap" / cell / f"seed{job.overrides['seed']}"
            assert OmegaConf.select(OmegaConf.load(copied / "config.yaml"), key) == value
            assert json.loads((copied / "metrics.json").read_text()) == job.metrics
            kept = json.loads((copied / "predictions.json").read_text())
            assert set(kept) == {"fpb", "fiqa", "tfns", "nwgi"} and len(kept["fpb"]["answers"]) == 4

    # A job killed mid-run (its record left "running", no metrics): the same command reruns it and nothing else.
    first, second = load_sweep(runs / "dora-raw-a16-d0.05-mlr10").jobs
    record = json.loads((second.dir / "job.json").read_text())
    (second.dir / "job.json").write_text(json.dumps(record | {"status": "running"}))
    (second.dir / "metrics.json").unlink()
    before = json.loads((first.dir / "job.json").read_text())["started"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lora-inst-a16-d0.05: 0 command(s)" in proc.stdout
    assert "dora-raw-a16-d0.05-mlr10: 1 command(s)" in proc.stdout
    assert json.loads((first.dir / "job.json").read_text())["started"] == before
    assert json.loads((second.dir / "job.json").read_text())["status"] == "ok"

    # A time limit stops the sweeps still running and writes the report of what finished, inside the limit.
    shutil.rmtree(runs / "dora-raw-a16-d0.05-mlr10")
    shutil.rmtree(docs / "dora_gap" / "dora-raw-a16-d0.05-mlr10")
    started = time.monotonic()
    cut = command.index("--")
    proc = subprocess.run([*command[:cut], "--time-limit", "3", *command[cut:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1 and time.monotonic() - started < 3 + 60 + 30, proc.stdout[-3000:]
    report = (docs / "dora_gap.md").read_text()
    assert "| LoRA, [INST] prompt, alpha 16, dropout 0.05, 2 steps | 1,2 | " in report
    assert "magnitude lr ×10, 2 steps | 1,2 |" not in report
