"""Faults, for real: `python train.py` processes killed with SIGKILL (mid-run and mid-save), stopped with
SIGTERM and Ctrl-C, then resumed; a learning rate that really drives the loss to NaN; W&B that cannot
reach its server or dies mid-run; tokens planted in the environment; a checkpoint that would run code."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg
from safetensors.torch import load_file

from finlora.config import validate
from finlora.data import TaskData, TaskDataModule
from finlora.errors import ConfigError, NonFiniteLoss, OutOfMemory
from finlora.module import FinetuneModule
from finlora.train import train

MAX_STEPS = 8


def overrides(model_dir: Path, *extra: str) -> list[str]:
    """A tiny run with dropout (so the RNG matters), a checkpoint every 2 steps and validation every 4."""
    return [f"model.name_or_path={model_dir}", "quant=none", "adapter=lora", "adapter.dropout=0.1", "task=fpb",
            "trainer=cpu", f"trainer.max_steps={MAX_STEPS}", "trainer.batch_size=4", "trainer.log_every_n_steps=1",
            "trainer.val_every_n_steps=4", "data.val_size=8", "data.max_length=64", "logger=csv",
            "eval.enabled=false", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2", *extra]


def start(model_dir: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`python train.py` in its own session (Ctrl-C reaches the whole group there, as in a terminal)."""
    cmd = [sys.executable, "train.py", *overrides(model_dir, *extra), f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run(model_dir: Path, run_dir: Path, *extra: str, env: dict | None = None) -> str:
    code, out = finish(start(model_dir, run_dir, *extra, env=env))
    assert code == 0, out[-3000:]
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5), (k, (wa[k] - wb[k]).abs().max())


def train_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by optimizer step (Lightning logs it at step-1 for the batch that makes step `step`)."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted run, the baseline every interrupted-and-resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(tiny_model_dir, run_dir)
    return run_dir


def test_retention_keeps_last_k_and_best(tiny_model_dir, tmp_path):
    train(compose_cfg(overrides(tiny_model_dir), tmp_path))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [n for n in names if not n.startswith("best")] == ["last.ckpt", "step-000006.ckpt", "step-000008.ckpt"]
    assert len([n for n in names if n.startswith("best")]) == 1
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == MAX_STEPS


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny_model_dir, reference, tmp_path):
    proc = start(tiny_model_dir, tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-000004.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    killed_at = step_of(tmp_path / "checkpoints" / "last.ckpt")
    assert 2 <= killed_at < MAX_STEPS and not (tmp_path / "adapter").exists()

    out = run(tiny_model_dir, tmp_path)  # the same command in the same folder continues
    assert "resuming from" in out and "last.ckpt" in out
    assert_same_adapter(tmp_path, reference)
    # The loss logged after the resume continues the uninterrupted curve, step for step.
    before, after = train_losses(reference), train_losses(tmp_path)
    resumed = [s for s in after if s >= killed_at]
    assert resumed and min(resumed) == killed_at
    for s in resumed:
        assert after[s] == pytest.approx(before[s], abs=1e-5), (s, after[s], before[s])


KILL_AT_RENAME = """
import os, signal, sys
def hook(event, args):
    if event == "os.rename" and str(args[1]).endswith(os.environ["KILL_AT_RENAME"]):
        n = int(os.environ.get("KILL_COUNT", "0")) + 1
        os.environ["KILL_COUNT"] = str(n)
        if n == int(os.environ["KILL_NTH"]):
            os.kill(os.getpid(), int(os.environ.get("KILL_SIGNAL", signal.SIGKILL)))
sys.addaudithook(hook)
"""


def kill_at_rename(tmp_path: Path, target: str, nth: int, signum: int = signal.SIGKILL) -> dict[str, str]:
    """Environment for a child that sends itself `signum` just before its `nth` rename onto `target`: the
    moment a save has written everything and not yet put it in place."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(KILL_AT_RENAME)
    return {"PYTHONPATH": f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "KILL_AT_RENAME": target,
            "KILL_NTH": str(nth), "KILL_SIGNAL": str(int(signum))}


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_keeps_the_previous_one(tiny_model_dir, reference, tmp_path):
    code, out = finish(start(tiny_model_dir, tmp_path, env=kill_at_rename(tmp_path, "last.ckpt", 2)))
    assert code == -signal.SIGKILL, out[-2000:]
    ckpts = tmp_path / "checkpoints"
    assert step_of(ckpts / "last.ckpt") == 2  # the first save, whole; the second never replaced it
    assert list(ckpts.glob(".last.ckpt-*.tmp"))  # the second save, written, never renamed
    run(tiny_model_dir, tmp_path)
    assert not list(ckpts.glob(".*.tmp"))
    assert_same_adapter(tmp_path, reference)


def test_sigkill_between_adapter_renames_loses_nothing(tmp_path):
    script = ("from pathlib import Path\nfrom finlora.outputs import atomic_dir\nimport sys\n"
              "with atomic_dir(Path(sys.argv[1])) as d:\n    (d / 'v').write_text(sys.argv[2])\n")
    target = tmp_path / "adapter"
    subprocess.run([sys.executable, "-c", script, target, "1"], check=True)
    env = {**os.environ, **kill_at_rename(tmp_path, "/adapter", 1)}
    done = subprocess.run([sys.executable, "-c", script, target, "2"], env=env)
    assert done.returncode == -signal.SIGKILL
    assert not target.exists() and (tmp_path / ".adapter.old" / "v").read_text() == "1"
    subprocess.run([sys.executable, "-c", script, target, "3"], check=True)
    assert (target / "v").read_text() == "3" and not (tmp_path / ".adapter.old").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, reference, tmp_path, signum):
    proc = start(tiny_model_dir, tmp_path, "logger=wandb")
    wait_for(tmp_path / "checkpoints" / "step-000002.ckpt", proc)
    os.killpg(proc.pid, signum)  # the whole group, as a scheduler's SIGTERM or a terminal's Ctrl-C does
    code, out = finish(proc)
    name = signal.Signals(signum).name
    assert code == 128 + signum, out[-3000:]
    assert f"stopped by {name} after step" in out and "Traceback" not in out
    stopped_at = step_of(tmp_path / "checkpoints" / "last.ckpt")
    assert f"after step {stopped_at};" in out and 2 <= stopped_at < MAX_STEPS
    assert not (tmp_path / "adapter").exists()
    from wandb_file import records  # here: the other tests of this file run where wandb is not installed

    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert any(r.HasField("exit") for r in records(run_file)), "the W&B run was not closed"
    if signum == signal.SIGTERM:
        run(tiny_model_dir, tmp_path, "logger=wandb")
        assert_same_adapter(tmp_path, reference)


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint(tiny_model_dir, tmp_path):
    cfg = compose_cfg(overrides(tiny_model_dir, "trainer.lr=1e30", "checkpoint.every_n_steps=1"), tmp_path)
    with pytest.raises(NonFiniteLoss) as err:
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"step {step_of(last) + 1}: loss nan" in str(err.value) and str(last) in str(err.value)
    assert not (tmp_path / "adapter").exists()
    weights = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_loss_skipped_when_configured(tiny_model_dir, tmp_path, caplog):
    cfg = compose_cfg(overrides(tiny_model_dir, "trainer.lr=1e30", "trainer.on_nonfinite_loss=skip"), tmp_path)
    with caplog.at_level(logging.WARNING, "finlora.callbacks"):
        assert train(cfg)["steps"] == MAX_STEPS
    skipped = [r for r in caplog.records if "skipped this optimizer step" in r.getMessage()]
    assert len(skipped) == MAX_STEPS - 1  # step 1 made the weights huge; every later loss is NaN
    assert all(torch.isfinite(w).all() for w in adapter(tmp_path).values())


def test_gpu_oom_message_suggests_overrides(tiny_model_dir, tmp_path, monkeypatch):
    """Only the message is tested here: the CPU cannot run out of GPU memory, so the step raises torch's
    real OutOfMemoryError as CUDA would."""
    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FinetuneModule, "training_step", oom)
    cfg = compose_cfg(overrides(tiny_model_dir), tmp_path)
    with pytest.raises(OutOfMemory) as err:
        train(cfg)
    message = str(err.value)
    for tip in ("trainer.batch_size=2 trainer.grad_accum=2", "trainer.gradient_checkpointing=true", "quant=4bit"):
        assert tip in message, message
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_wandb_unreachable_falls_back_to_offline(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    cfg = compose_cfg(overrides(tiny_model_dir, "logger=wandb", "trainer.max_steps=2"), tmp_path)
    with caplog.at_level(logging.WARNING, "finlora.loggers"):
        assert train(cfg)["steps"] == 2
    said = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(said) == 1 and "offline" in said[0], said
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_failing_mid_run_never_stops_training(tiny_model_dir, tmp_path, caplog):
    import lightning as L
    import wandb

    class KillWandb(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                wandb.finish()  # W&B's run is gone; its next log call raises

    from finlora import callbacks

    cfg = compose_cfg(overrides(tiny_model_dir, "logger=wandb"), tmp_path)
    real_callbacks = callbacks.run_callbacks

    def with_killer(*args, **kwargs):
        c = real_callbacks(*args, **kwargs)
        c.all.append(KillWandb())
        return c

    with caplog.at_level(logging.WARNING, "finlora.loggers"), pytest.MonkeyPatch.context() as mp:
        mp.setattr("finlora.train.run_callbacks", with_killer)
        assert train(cfg)["steps"] == MAX_STEPS
    said = [r.getMessage() for r in caplog.records if "W&B failed mid-run" in r.getMessage()]
    assert len(said) == 1, said
    assert max(train_losses(tmp_path)) == MAX_STEPS - 1  # the CSV log kept every step


def test_tokens_never_reach_configs_wandb_or_outputs(tiny_model_dir, tmp_path, monkeypatch):
    hf, wb = "hf_" + "PlantedSecret" * 3, "f00d" * 10
    monkeypatch.setenv("HF_TOKEN", hf)
    monkeypatch.setenv("WANDB_API_KEY", wb)
    cfg = compose_cfg(overrides(tiny_model_dir, "logger=wandb", "trainer.max_steps=2"), tmp_path)
    assert validate(cfg).model.trust_remote_code is False
    train(cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    for p in files:
        data = p.read_bytes()
        assert hf.encode() not in data and wb.encode() not in data, f"token found in {p}"
    # A token typed into the config is refused before anything is written or logged.
    with pytest.raises(ConfigError, match=r"logger.tags\[0\]: looks like a token"):
        validate(compose_cfg(overrides(tiny_model_dir, "logger=wandb", f"logger.tags=[{hf}]"), tmp_path / "x"))


def test_checkpoints_load_without_running_code(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="holds pickled Python objects, not only tensors"):
        train(compose_cfg(overrides(tiny_model_dir), tmp_path))  # a rerun in this folder resumes from it
    assert not marker.exists()


@pytest.mark.parametrize("batching", ["padded", "grouped", "packed"])
def test_loader_resumes_mid_epoch_in_a_later_epoch(tiny_model_dir, batching):
    """The order after a resume in epoch 2 is the uninterrupted order, for each batching."""
    from transformers import AutoTokenizer

    from finlora.config import Batching, DataConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"context": "x " * (i % 7 + 1), "target": str(i)} for i in range(40)]
    data = TaskData(rows, [], [])

    def loader():
        dm = TaskDataModule(data, tokenizer, DataConfig(max_length=32, batching=Batching(batching)), 4, 7)
        return dm.train_dataloader()

    def epoch(dl, e):
        if hasattr(dl.sampler, "set_epoch"):
            dl.sampler.set_epoch(e)
        return [b["input_ids"].tolist() for b in dl]

    dl = loader()
    first, second = epoch(dl, 0), epoch(dl, 1)
    assert first != second
    dl = loader()
    epoch(dl, 0)
    it = iter(dl)
    if hasattr(dl.sampler, "set_epoch"):
        dl.sampler.set_epoch(1)
    head = [next(it)["input_ids"].tolist() for _ in range(3)]
    state = dl.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + epoch(resumed, 1) == second


def test_killed_test_stage_keeps_the_training_summary(tiny_model_dir, tmp_path, monkeypatch):
    """A run cut off while it scores its test sets (a job's time limit, say) still leaves its adapter and
    the training half of metrics.json; only the test metrics are missing."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("finlora.train.evaluate_sets", killed)
    cfg = compose_cfg(overrides(tiny_model_dir, "eval.enabled=true", "eval.limit=4"), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["final_train_loss"] > 0
    assert not any(k.startswith("test/") for k in summary)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_saves_say_nothing_about_weights_only(tiny_model_dir, tmp_path, caplog):
    """Issue 14, row 17: every checkpoint save logged "`weights_only` was not set, defaulting to `False`",
    which read as contradicting the README (checkpoints are *loaded* with weights_only=True)."""
    with caplog.at_level(logging.INFO, "lightning.pytorch"):
        train(compose_cfg(overrides(tiny_model_dir, "trainer.max_steps=2"), tmp_path))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not [r.getMessage() for r in caplog.records if "weights_only" in r.getMessage()]


def test_nonfinite_loss_before_any_checkpoint_gives_advice_that_can_work(tiny_model_dir, tmp_path):
    """Issue 14, row 13: the advice was `ckpt_path=last` when no checkpoint existed; the error also goes to the
    run's log file, and the run's folder (it had started) is kept."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides(tiny_model_dir, "trainer.lr=1e30",
                                                                                "checkpoint.every_n_steps=50"),
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    assert "No checkpoint was saved yet, so nothing to resume" in proc.stderr and "ckpt_path=last" not in proc.stderr
    assert "No checkpoint was saved yet" in (run_dir / "train.log").read_text()


def test_sigterm_exits_promptly_without_another_validation(tiny_model_dir, tmp_path):
    """Issue 14, row 12: after saving, a full validation pass ran and Lightning said `max_epochs=1` reached."""
    proc = start(tiny_model_dir, tmp_path, "trainer.max_steps=400", "trainer.val_every_n_steps=200")
    wait_for(tmp_path / "checkpoints" / "step-000002.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM after step" in out and "Traceback" not in out and "max_epochs" not in out
    assert "val/loss" not in (tmp_path / "csv" / "metrics.csv").read_text()


def test_sigterm_while_scoring_ends_in_one_line_and_keeps_the_adapter(tiny_model_dir, tmp_path):
    """A SIGTERM in the test stage (a sweep's time limit, a scheduler) killed the process with no word: its job
    record stayed "running" and the sweep report called it crashed."""
    proc = start(tiny_model_dir, tmp_path, "eval.enabled=true", "eval.batch_size=1", "eval.limit=600")
    wait_for(tmp_path / "metrics.json", proc)  # written as the test stage starts
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM while scoring the test sets" in out and "Traceback" not in out
    assert f"eval.py adapter_path={tmp_path / 'adapter'}" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_second_ctrl_c_aborts_at_once_with_one_line(tiny_model_dir, tmp_path):
    """Issue 14, row 12: a second Ctrl-C went through Lightning's graceful shutdown and exited 1."""
    proc = start(tiny_model_dir, tmp_path, "trainer.max_steps=400", "trainer.val_every_n_steps=200",
                 "checkpoint.every_n_steps=1")
    wait_for(tmp_path / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc)
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert "finlora: Ctrl-C again: aborted at once" in out or "stopped by SIGINT after step" in out


def test_wandb_with_a_key_but_no_server_goes_offline_without_waiting(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Issue 14, row 14: a wrong key with no reachable server cost about 100 s (W&B's own retries)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = compose_cfg(overrides(tiny_model_dir, "logger=wandb", "trainer.max_steps=2"), tmp_path)
    with caplog.at_level(logging.WARNING, "finlora.loggers"):
        assert train(cfg)["steps"] == 2
    said = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(said) == 1 and "cannot reach http://127.0.0.1:9" in said[0] and "offline" in said[0], said
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
