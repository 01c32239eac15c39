"""Issue 37's study parts that run without a GPU: FinLoRA's recipes as configs, the study's planner, a resumed
job keeping its training record, scoring on the [INST] prompt, and the analysis over kept predictions."""

from __future__ import annotations

import json
import runpy
import shutil

import pytest
import torch
from conftest import DATA_DIR, ROOT, compose_cfg
from omegaconf import OmegaConf

import finlora.evaluate
from finlora.config import ModelConfig, QuantConfig, TrainPrompt, validate
from finlora.data import read_jsonl
from finlora.models import load_model, load_tokenizer
from finlora.run.gap import keep_predictions, read_runs, report_sections
from finlora.train import train

dora_gap = runpy.run_path(str(ROOT / "scripts" / "dora_gap.py"))


@pytest.mark.parametrize("experiment,method,alpha,dropout,prompt,accum,scheduler", [
    ("finlora_sentiment_lora_r8_8bit", "lora", 32, 0.1, "plain", 8, "constant"),
    ("finlora_sentiment_dora_r8_8bit", "dora", 16, 0.05, "finlora_inst", 2, "cosine"),
    ("finlora_sentiment_dora_a32_r8_8bit", "dora", 32, 0.05, "finlora_inst", 2, "cosine"),
])
def test_finlora_recipes_compose(experiment, method, alpha, dropout, prompt, accum, scheduler, tmp_path):
    cfg = validate(compose_cfg([f"experiment={experiment}"], tmp_path))
    a, t = cfg.adapter, cfg.trainer
    assert (a.method.value, a.alpha, a.dropout, a.r) == (method, alpha, dropout, 8)
    assert (cfg.data.train_prompt.value, cfg.eval.prompt.value) == (prompt, "plain")
    assert (t.lr, t.max_epochs, t.batch_size, t.grad_accum, t.scheduler.value) == (1e-4, 4, 8, accum, scheduler)
    assert cfg.quant.bits == 8 and a.target_modules == ["q_proj", "k_proj", "v_proj"]
    text = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert "Open-Finance-Lab/FinLoRA@7e1cf82803aa56a5f698d71e1528395e16b21093" in text


def test_study_cells():
    """The grid holds the baseline and both published recipes' adapter settings; every other cell is a grid
    cell plus one change; names are unique."""
    cells = {c.name: set(c.settings) for c in dora_gap["CELLS"]}
    assert len(cells) == len(dora_gap["CELLS"]) == 16 + 2 + 3 + 2 + 2
    grid = {n: s for n, s in cells.items() if n.count("-") == 3}
    assert len(grid) == 16
    assert {"lora-raw-a16-d0.05", "dora-raw-a16-d0.05", "lora-raw-a32-d0.1", "dora-inst-a16-d0.05",
            "dora-inst-a32-d0.05"} <= set(grid)
    for name, settings in cells.items():
        if name not in grid:
            base = "-".join(name.split("-")[:4])
            assert len(settings - grid[base]) == 1 and grid[base] <= settings, name
    assert {n for n in cells if "mlr" in n} == {f"dora-raw-a16-d0.05-mlr{k}" for k in (3, 10, 30)}


@pytest.mark.slow
def test_every_study_cell_composes_and_validates():
    """All 25 cells (17 s; the fast plan test composes three)."""
    names = [c.name for c, _ in dora_gap["validated"](dora_gap["CELLS"], [])]
    assert names == [c.name for c in dora_gap["CELLS"]]


def test_study_refuses_a_bad_cell_before_any_sweep(tmp_path, capsys):
    runs = tmp_path / "runs"
    rc = dora_gap["main"](["--runs", str(runs), "--docs", str(tmp_path), "--cells", "dora-raw-a16-d0.05-mlr10",
                           "lora-raw-a16-d0.05", "--", "adapter.magnitude_lr_scale=3"])
    assert rc == 2 and not runs.exists()
    assert "cell lora-raw-a16-d0.05: " in capsys.readouterr().err


def test_plan_counts_jobs_and_time(tmp_path, capsys):
    """A finished seed is skipped; without NWGI's training file its cells are blocked; the GPU time comes from
    the step and row times issue 16's run files recorded (the whole study: `--plan` alone, 115 jobs)."""
    runs = tmp_path / "runs"
    cells = ["lora-raw-a16-d0.05", "dora-inst-a16-d0.05-4ep", "lora-raw-a16-d0.05-nwgi"]
    assert dora_gap["main"](["--plan", "--runs", str(runs), "--data-dir", str(DATA_DIR), "--cells", *cells]) == 0
    out = capsys.readouterr().out
    assert out.startswith("10 jobs to run (3 cells × 5 seeds, less those finished or blocked); 86,150 optimizer "
                          "steps and 78,820 scored rows in all.")
    assert "  lora-raw-a16-d0.05-nwgi: blocked, needs " in out
    assert "  lora-raw-a16-d0.05: 5 of 5 seeds to run, 3,446 steps and 7,882 scored rows a job" in out
    assert "  dora-inst-a16-d0.05-4ep: 5 of 5 seeds to run, 13,784 steps" in out
    assert "GPU time at the measured rates: 1.5 GPU-hours" in out and "211 ms a step" in out
    job = runs / "lora-raw-a16-d0.05" / "0_seed=1"  # a finished job of an earlier lease, as `train.py -m` leaves it
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["seed=1"]), job / ".hydra" / "overrides.yaml")
    hydra = OmegaConf.create({"hydra": {"runtime": {"cwd": str(ROOT)}, "overrides": {"task": ["seed=1,2"]},
                                        "job": {"name": "train", "config": {"override_dirname": {"exclude_keys": []}}},
                                        "sweeper": {"_target_": "hydra._internal.BasicSweeper"}}})
    for f in (job / ".hydra" / "hydra.yaml", job.parent / "multirun.yaml"):
        OmegaConf.save(hydra, f)
    (job / "job.json").write_text(json.dumps({"status": "ok"}))
    assert dora_gap["main"](["--plan", "--runs", str(runs), "--measured", str(tmp_path / "none"),
                             "--data-dir", str(DATA_DIR), "--cells", cells[0], "--seeds", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 jobs to run") and "1 of 2 seeds to run" in out and "GPU time: to be measured" in out


TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4",
        "data.val_size=8", "data.max_length=64", "logger=csv", "eval.enabled=false", "checkpoint.keep_best=0"]


def test_a_job_resumed_after_its_last_step_keeps_its_training_record(tiny_model_dir, tmp_path):
    """Issue 16's seed-2 jobs: cut while being scored, resumed, only scored, and their losses and step times
    were null. The resumed attempt now carries the training attempt's record."""
    common = [*TINY, f"model.name_or_path={tiny_model_dir}"]
    first = train(compose_cfg(common, tmp_path))
    again = train(compose_cfg(common, tmp_path))  # resumes from last.ckpt at step 2 = max_steps: trains nothing
    assert again["steps"] == first["steps"] == 2 and again["training_from_earlier_attempt"] is True
    for key in ("final_train_loss", "tokens_per_s", "padding_fraction"):
        assert again[key] == first[key] is not None, key
    assert again["batch_shapes"] == first["batch_shapes"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["final_train_loss"] == first["final_train_loss"]
    assert "training_from_earlier_attempt" not in first


def test_eval_prompt_scores_on_the_inst_wrap(tiny_model_dir, monkeypatch, tmp_path):
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir), model_cfg)
    model = load_model(str(tiny_model_dir), model_cfg, QuantConfig(), torch.float32, torch.device("cpu"))
    records = read_jsonl(DATA_DIR / "test" / "fpb_test.jsonl")[:2]
    seen = []
    real = finlora.evaluate.encode_prompt
    monkeypatch.setattr(finlora.evaluate, "encode_prompt", lambda *a: seen.append(real(*a)) or seen[-1])
    for style in TrainPrompt:
        finlora.evaluate.generate(model, tokenizer, records, 1, 2, prompt=style)
    wrapped = [tokenizer(f"[INST] {r['context']} [/INST]")["input_ids"] for r in records]
    assert seen == [tokenizer(r["context"])["input_ids"] for r in records] + wrapped
    assert validate(compose_cfg(["eval.prompt=finlora_inst"], tmp_path)).eval.prompt is TrainPrompt.finlora_inst


def _job(folder, cell, seed, adapter, answers_tfns, fpb_acc, mean=0.5):
    """A job's run files as the study keeps them: config.yaml, metrics.json, predictions.json (TFNS: every row)."""
    job = folder / cell / f"seed{seed}"
    job.mkdir(parents=True)
    cfg = OmegaConf.load(ROOT / "docs" / "dora_gap" / "lora-baseline" / "seed1" / "config.yaml")
    cfg.adapter.method, cfg.seed, cfg.eval.limit, cfg.trainer.max_steps = adapter, seed, None, 300
    OmegaConf.save(cfg, job / "config.yaml")
    metrics = {f"test/{t}/{m}": mean for t in ("fpb", "fiqa", "tfns", "nwgi") for m in ("accuracy", "f1", "f1_parsed")}
    (job / "metrics.json").write_text(json.dumps(metrics | {"test/fpb/accuracy": fpb_acc}))
    eval_dir = job / "eval"
    eval_dir.mkdir()
    (eval_dir / "tfns_predictions.jsonl").write_text("".join(
        json.dumps({"index": i, "predicted": a}) + "\n" for i, a in enumerate(answers_tfns)))
    keep_predictions(eval_dir, {"tfns": ["negative", "neutral", "positive"]}, job / "predictions.json")
    shutil.rmtree(eval_dir)


def test_analysis_pairs_seeds_and_tests_rows(tmp_path):
    """Two cells, DoRA and LoRA, two seeds: the paired differences, the TOST line, and McNemar and the
    bootstrap from the kept TFNS predictions, which are also rescored on FinLoRA's published labels."""
    fixed = [r["target"] for r in read_jsonl(DATA_DIR / "test" / "tfns_test_fixed.jsonl")]
    published = [r["target"] for r in read_jsonl(DATA_DIR / "test" / "tfns_test.jsonl")]
    wrong = {"negative": "positive", "neutral": "negative", "positive": "neutral"}
    lora = [wrong[t] if i < 100 else t for i, t in enumerate(fixed)]  # LoRA misses the first 100 rows
    for seed, shift in ((1, 0.01), (2, 0.03)):
        _job(tmp_path, "lora-x", seed, "lora", lora, 0.60)
        _job(tmp_path, "dora-x", seed, "dora", fixed, 0.60 + shift)  # DoRA right everywhere
    cells = read_runs(tmp_path, DATA_DIR)
    assert len(cells) == 2
    run = next(c for s, c in cells.items() if s.method == "lora")[1]
    assert sum(run.right["tfns"]) == len(fixed) - 100
    assert run.metrics["test/tfns_published/accuracy"] == pytest.approx(
        sum(a == t for a, t in zip(lora, published, strict=True)) / len(fixed))
    text = "\n".join(report_sections(tmp_path, DATA_DIR))
    assert "| DoRA − LoRA: raw prompt, alpha 16, dropout 0.05, 300 steps | fpb | 1,2 | +2.0 [-10.7, +14.7] |" in text
    assert "McNemar 200:0 rows, p = 1.24e-60" in text  # 100 rows × 2 seeds right only in DoRA
    assert "| tfns_published |" in text or "### tfns_published" in text
    assert "**Primary result:**" in text
