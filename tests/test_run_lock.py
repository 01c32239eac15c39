"""Issue 34, row 3: two `train.py` on one run folder. Today both ran (one folder with the second's config,
interleaved CSV rows, the last writer's adapter); the second must be refused at once (exit 2) naming the live
run's pid and host, and a killed run must not leave the folder locked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.batch_size=4", "data.val_size=8",
        "data.max_length=64", "logger=csv", "eval.enabled=false"]


def _train(model_dir: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", f"model.name_or_path={model_dir}", *TINY, *extra,
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_second_run_in_a_live_folder_is_refused_naming_pid_and_host_and_a_kill_frees_it(tiny_model_dir, tmp_path):
    first = _train(tiny_model_dir, tmp_path, "trainer.max_steps=100000")
    try:
        deadline = time.time() + 120
        while not (tmp_path / "config.yaml").exists():  # train() has started: data read, before the model loads
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.time() < deadline, "the first run never started"
            time.sleep(0.05)
        overrides = (tmp_path / ".hydra" / "overrides.yaml").read_bytes()
        started = time.time()
        second = _train(tiny_model_dir, tmp_path, "trainer.max_steps=1", "trainer.lr=1e-3")
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 2, out[-3000:]
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in out, out[-3000:]
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert time.time() - started < 30  # at once, not after loading anything
        assert (tmp_path / ".hydra" / "overrides.yaml").read_bytes() == overrides  # nothing of the second written
        assert not (tmp_path / "adapter").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    from finlora.run.lock import LOCK_FILE, RunLock, holder

    assert (tmp_path / LOCK_FILE).exists() and holder(tmp_path) is None  # left by the killed run, held by nobody
    RunLock.take(tmp_path).release()  # the next run takes it over


def test_a_rank_that_lightning_started_takes_no_lock(tmp_path, monkeypatch):
    """Lightning's DDP re-runs the command for each extra rank, in the same folder that rank 0 holds."""
    from finlora.run.lock import LOCK_FILE, hold

    monkeypatch.setenv("LOCAL_RANK", "1")
    hold(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
