"""Several devices (issue 17), as far as the CPU allows: Lightning's DDP over two CPU processes (gloo) runs
a real training, with the adapter, metrics and test stage written once, by rank zero; the FSDP and 70B
presets compose; a base too big for the GPUs at hand is refused before loading, saying what would fit."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_cfg
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

from finlora.devices import capacity_problem, gpu_count
from finlora.errors import ConfigError
from finlora.models import SHAPES
from finlora.train import train

LLAMA_70B = LlamaConfig(**SHAPES["llama-3.1-70b"], num_hidden_layers=80, tie_word_embeddings=False)
GIB = 2**30


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_ddp_on_two_cpu_processes_trains_and_writes_once(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"model.name_or_path={tiny_model_dir}", "quant=none",
           "adapter=dora", "task=fpb", "trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.max_steps=3", "trainer.batch_size=4", "data.max_length=96", "data.val_size=8", "eval.limit=8",
           "eval.during_training.size=0", "logger=csv", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same folder
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test/fpb/n"] == 8
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["fpb_metrics.json", "fpb_predictions.jsonl"]
    assert len((run / "eval" / "fpb_predictions.jsonl").read_text().splitlines()) == 8  # scored once, not per rank
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    assert any("lora_magnitude_vector" in n for n, _ in tuned.named_parameters())


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs"))])
@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_a_signal_to_rank_zero_alone_stops_both_ranks_at_one_step(tiny_model_dir, tmp_path, accelerator):
    """Rank one hears of rank zero's SIGTERM through the ranks' vote (`StopVote`, read a step late; on GPUs
    from pinned memory behind an event): both save the same step and end with the signal's status, where rank
    one would otherwise fail or wait for rank zero forever."""
    from test_faults import finish, start, step_of, wait_for

    proc = start(tiny_model_dir, tmp_path, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=400",
                 "trainer.val_every_n_steps=1000", f"trainer.accelerator={accelerator}")
    wait_for(tmp_path / "checkpoints" / "step-000002.ckpt", proc)
    os.kill(proc.pid, signal.SIGTERM)  # rank zero only: rank one is a process of its own
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    stopped = step_of(tmp_path / "checkpoints" / "last.ckpt")
    assert f"stopped by SIGTERM after step {stopped};" in out and "Traceback" not in out and stopped < 400
    assert f"stopped by SIGTERM after step {stopped};" in (tmp_path / "train_ddp_process_1.log").read_text()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_on_two_gpus_replays_the_step_and_the_update_and_trains_as_unrecorded(tiny_model_dir, tmp_path):
    """`trainer.capture` under DDP: each rank replays its forward, backward and optimizer update (reading the
    gradients where DDP's buckets hold them) from CUDA graphs, and the losses follow the unrecorded run's."""
    losses = {}
    for capture in ("false", "true"):
        run = tmp_path / f"capture-{capture}"
        cmd = [sys.executable, str(ROOT / "train.py"), f"model.name_or_path={tiny_model_dir}", "quant=none",
               "adapter=dora", "adapter.dropout=0", "task=fpb", "trainer=ddp", "trainer.devices=2",
               f"trainer.capture={capture}", "data.batching=static", "trainer.max_steps=12", "trainer.batch_size=4",
               "trainer.log_every_n_steps=1", "data.max_length=96", "data.val_size=8", "eval.enabled=false",
               "eval.during_training.size=0", "logger=csv", f"hydra.run.dir={run}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "could not be recorded" not in done.stdout + done.stderr
        rows = csv.DictReader((run / "csv" / "metrics.csv").open())
        losses[capture] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses["true"]) == len(losses["false"]) == 12
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # a benchmark script's helper, 30 s of two processes: out of the fast suite's 10 minutes
def test_each_rank_profiles_its_own_host_steps(tiny_model_dir, tmp_path):
    """`scripts/train_profiled.py` (how a DDP run's host time was traced): Lightning runs the script again for
    rank one, so both ranks write their profile of the chosen steps."""
    env = os.environ | {"FINLORA_PROFILE_DIR": str(tmp_path / "profile"), "FINLORA_PROFILE_FROM": "1",
                        "FINLORA_PROFILE_STEPS": "2"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_profiled.py"), f"model.name_or_path={tiny_model_dir}",
           "quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.max_steps=4", "trainer.batch_size=4", "data.max_length=64", "data.val_size=8", "eval.enabled=false",
           "eval.during_training.size=0", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        text = (tmp_path / "profile" / f"rank{rank}.txt").read_text()
        assert text.startswith("# cProfile of steps 1-3") and "training_step" in text


def test_fsdp_and_70b_presets_compose(tmp_path):
    cfg = compose_cfg(["model=llama3_1_70b_instruct", "trainer=fsdp", "quant=4bit"], tmp_path)
    assert cfg.model.name_or_path == "meta-llama/Llama-3.1-70B-Instruct"
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.devices == -1 and cfg.trainer.accelerator == "gpu"


def test_fsdp_without_a_gpu_is_refused_before_anything_is_written(tmp_path):
    cfg = compose_cfg(["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.strategy=fsdp",
                       "trainer.devices=2", "logger=csv"], tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.strategy: Lightning's FSDP runs on CUDA GPUs only"):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists()


def test_a_base_too_big_for_the_gpus_is_refused_saying_what_would_fit():
    bf16 = capacity_problem(LLAMA_70B, None, False, gpus=1, gpu_bytes=80 * GIB, sharded=False)
    assert bf16 and "131 GiB of weights (16-bit)" in bf16 and "quant=4bit" in bf16 and "trainer=fsdp" in bf16
    small = capacity_problem(LLAMA_70B, 4, False, gpus=1, gpu_bytes=24 * GIB, sharded=False)
    assert small and "trainer=fsdp trainer.devices=3" in small and "quant=4bit" not in small
    assert capacity_problem(LLAMA_70B, 4, False, gpus=1, gpu_bytes=80 * GIB, sharded=False) is None  # QLoRA fits
    assert capacity_problem(LLAMA_70B, None, False, gpus=4, gpu_bytes=80 * GIB, sharded=True) is None


@pytest.mark.parametrize("devices,expected", [(1, 1), ("2", 2), ([0, 1], 2), ("0,1,2", 3)])
def test_gpu_count(devices, expected):
    assert gpu_count(devices) == expected
