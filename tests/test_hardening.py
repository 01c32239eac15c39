"""Issue 14: what an adversarial first hour found, each reproduced here. Checks that must come before the
model loads are run against a model folder without weights: had loading begun, it would fail otherwise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg
from transformers import LlamaConfig, LlamaForCausalLM

from finlora.checkpoints import resume_path
from finlora.errors import ConfigError
from finlora.run.report import load_sweep
from finlora.train import train

TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4",
        "data.val_size=8", "data.max_length=64", "logger=csv", "eval.enabled=false"]


def _cli(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _data(root: Path, train_rows: list[str]) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "train" / "fpb_train.jsonl").write_text("".join(r + "\n" for r in train_rows))
    (root / "test" / "fpb_test.jsonl").write_text('{"context": "c\\nAnswer: ", "target": "positive"}\n')
    return root


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_answer_too_long_for_max_length_is_refused_by_line_before_loading(weightless, tmp_path):
    """Row 4: a ValueError traceback after the model had loaded."""
    ok = [json.dumps({"context": f"Instruction: x{i}\nAnswer: ", "target": "positive"}) for i in range(20)]
    long = json.dumps({"context": "Instruction: y\nAnswer: ", "target": "word " * 200})
    data = _data(tmp_path / "data", [*ok, long])
    proc = _cli("train.py", *TINY, f"model.name_or_path={weightless}", f"paths.data_dir={data}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data / 'train' / 'fpb_train.jsonl'}:21: its answer takes " in proc.stderr
    assert "tokens with EOS, more than data.max_length=64 leaves room for" in proc.stderr


def test_unknown_target_module_is_refused_before_loading_naming_the_layers(weightless, tmp_path):
    """Row 5: a peft traceback after the model had loaded."""
    proc = _cli("train.py", *TINY, f"model.name_or_path={weightless}", "adapter.target_modules=[q_proj,nope]",
                cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "adapter.target_modules: ['nope'] name no module of LlamaForCausalLM" in proc.stderr
    assert "'down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'" in proc.stderr


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_adapter_on_another_base_is_refused_naming_both(tiny_model_dir, tmp_path):
    """Row 6: a size-mismatch traceback, or silently wrong scores when the shapes agree."""
    train(compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY], tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "base_model.json").read_text())["name_or_path"] == str(tiny_model_dir.resolve())
    other = tmp_path / "other-base"  # the same shapes, other weights
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model_dir)).save_pretrained(other)
    for f in tiny_model_dir.glob("*token*"):
        shutil.copy(f, other)
    common = ["task=fpb", "eval.limit=2", f"adapter_path={adapter}"]
    proc = _cli("eval.py", f"model.name_or_path={other}", *common, f"hydra.run.dir={tmp_path / 'e1'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"was trained on {tiny_model_dir.resolve()} (2 layers, weights" in proc.stderr
    assert f"not on the base asked for, {other.resolve()} (2 layers" in proc.stderr
    proc = _cli("eval.py", f"model.name_or_path={tiny_model_dir}", *common, f"hydra.run.dir={tmp_path / 'e2'}")
    assert proc.returncode == 0, proc.stderr[-2000:]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_last_checkpoint_resumes_from_the_newest_whole_one(tiny_model_dir, tmp_path, caplog):
    """Row 7: a bare traceback after the model had loaded, the file not named."""
    cfg = [f"model.name_or_path={tiny_model_dir}", *TINY, "trainer.max_steps=4", "checkpoint.every_n_steps=2",
           "checkpoint.keep_last=2"]
    train(compose_cfg(cfg, tmp_path))
    ckpts = tmp_path / "checkpoints"
    _truncate(ckpts / "last.ckpt")
    whole = max(ckpts.glob("step-*.ckpt"))
    assert resume_path(None, ckpts) == str(whole)
    assert f"{ckpts / 'last.ckpt'} (" in caplog.text
    for step in ckpts.glob("step-*.ckpt"):
        _truncate(step)
    with pytest.raises(ConfigError, match=r"every checkpoint of this run folder is damaged: .*last\.ckpt.*Move them "
                                          r"away to start the run over, or pass ckpt_path="):
        resume_path(None, ckpts)


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_damaged_checkpoint_given_by_path_is_named_before_loading(weightless, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    proc = _cli("train.py", *TINY, f"model.name_or_path={weightless}", f"ckpt_path={bad}",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"ckpt_path: {bad} cannot be read" in proc.stderr


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_killed_sweep_reruns_every_unfinished_job_and_keeps_its_records(tiny_model_dir, tmp_path):
    """Rows 10 and 11: after kill -9 during job 1 of 3, `--rerun-failed` ran job 1 alone (job 2 never ran),
    reported "2 jobs: 2 finished" with exit 0, and overwrote the sweep's multirun.yaml with one job's settings."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}",
                             f"model.name_or_path={tiny_model_dir}", *TINY, "adapter.r=2,4,8"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not any(json.loads(p.read_text()).get("status") == "running" for p in sweep_dir.glob("1_*/job.json")):
        assert proc.poll() is None and time.time() < deadline, "job 1 never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    multirun = (sweep_dir / "multirun.yaml").read_bytes()
    assert [j.status for j in load_sweep(sweep_dir).jobs] == ["ok", "crashed", "never started"]

    rerun = _cli("scripts/report.py", str(sweep_dir), "--rerun-failed")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    sweep = load_sweep(sweep_dir)
    assert [(j.status, j.overrides["adapter.r"]) for j in sweep.jobs] == [("ok", "2"), ("ok", "4"), ("ok", "8")]
    assert sorted(d.name.split("_")[0] for d in sweep_dir.iterdir() if d.is_dir()) == ["0", "1", "2"]
    assert (sweep_dir / "multirun.yaml").read_bytes() == multirun
    assert "3 jobs: 3 finished, 0 did not" in (sweep_dir / "report.md").read_text()


def test_resume_under_other_adapter_settings_is_refused_before_loading(tiny_model_dir, tmp_path):
    """A neighbour of row 7: rerunning a run folder with adapter=dora (or another r) resumed its LoRA
    checkpoint, silently (DoRA's magnitudes started fresh) or with a size-mismatch traceback."""
    train(compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY], tmp_path / "run"))
    proc = _cli("train.py", *TINY, f"model.name_or_path={tiny_model_dir}", "adapter=dora", "adapter.r=16",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "  adapter.method: 'lora' → 'dora'\n  adapter.r: 8 → 16\n" in proc.stderr
    assert "adapter.method, adapter.r change what its tensors are, so it cannot continue under them" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").read_text().count("method: lora") == 1  # the run's record stays


def test_adapter_cut_short_is_named_before_the_base_loads(tiny_model_dir, weightless, tmp_path):
    """A neighbour of rows 6 and 7: a truncated adapter file was a safetensors traceback after the base loaded."""
    train(compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY], tmp_path / "run"))
    weights = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    _truncate(weights)
    proc = _cli("eval.py", f"model.name_or_path={weightless}", "task=fpb", f"adapter_path={weights.parent}",
                f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"adapter_path: {weights} cannot be read" in proc.stderr
