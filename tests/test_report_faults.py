"""Issue 34, rows 4 and 15, and a run shorter than its logging interval: `scripts/report.py --rerun-failed`
while the sweep still runs retrained its running jobs again in the same folders; a missing path, a file or a
cut-short job.json gave tracebacks, and a sweep under a path holding `'` could not be rerun (Hydra's parse
error); `trainer.max_steps=1` wrote no csv/metrics.csv, so the report had no curve of that run."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_cfg

from finlora.train import train

TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.batch_size=4", "data.val_size=8",
        "data.max_length=64", "logger=csv", "eval.enabled=false"]


def _report(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _status(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def test_rerun_failed_leaves_a_live_sweeps_jobs_to_it(tiny_model_dir, tmp_path):
    """Row 4: job 0 running and job 1 not yet started were both started again beside the live sweep."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep_dir}",
                             f"model.name_or_path={tiny_model_dir}", *TINY, "trainer.max_steps=100000",
                             "adapter.r=2,4"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not any(_status(p.parent).get("status") == "running" for p in sweep_dir.glob("0_*/job.json")):
            assert proc.poll() is None and time.time() < deadline, "job 0 never started"
            time.sleep(0.05)
        [job0] = sweep_dir.glob("0_*")
        record = _status(job0)
        rerun = _report(str(sweep_dir), "--rerun-failed", timeout=60)
        assert proc.poll() is None  # the sweep was left alone
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert rerun.returncode == 1, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"report: {job0.name} is not rerun: still running (pid {proc.pid} on host " in rerun.stderr
    assert "is not rerun: its sweep is still running and has yet to start it" in rerun.stderr
    assert _status(job0) == record and not list(sweep_dir.glob("1_*"))  # nothing rerun


def test_report_on_a_missing_path_or_a_file_says_so_in_one_line(tmp_path):
    """Row 15: FileNotFoundError / NotADirectoryError tracebacks."""
    (tmp_path / "a file").write_text("x")
    for path, what in ((tmp_path / "nope", "missing"), (tmp_path / "a file", "not a folder")):
        proc = _report(str(path))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"report: {shlex.quote(str(path))} is {what}: give a sweep's folder " \
                                      "(outputs/sweeps/<time>)"


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory) -> Path:
    """A real sweep of one job, under a path holding `'`, whose job failed (its data folder is missing)."""
    sweep_dir = tmp_path_factory.mktemp("quoted") / "it's" / "sweep"
    first = subprocess.run([sys.executable, "train.py", "-m", f'hydra.sweep.dir="{sweep_dir}"', *TINY,
                            f"paths.data_dir={sweep_dir.parents[1] / 'nodata'}", "adapter.r=2"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr[-3000:]
    return sweep_dir


def test_report_names_a_cut_short_job_record_and_goes_on(failed_sweep, tmp_path):
    """Row 15: a job.json cut short (copied, or a disk that filled) was a JSONDecodeError traceback."""
    sweep_dir = shutil.copytree(failed_sweep, tmp_path / "sweep")
    [record] = sweep_dir.glob("0_*/job.json")
    record.write_text(record.read_text()[:40])
    proc = _report(str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith(f"report: {shlex.quote(str(record))} cannot be read (Expecting value")
    assert line.endswith("); the job counts as having no record")
    assert "| no record |" in (sweep_dir / "report.md").read_text()


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_rerun_failed_under_a_path_holding_a_quote(failed_sweep):
    """Row 15: the rerun's `hydra.sweep.dir='…'` broke on the path's own `'` (Hydra's parse error, exit 2)."""
    [job] = failed_sweep.glob("0_*")
    before = _status(job)
    assert before["status"] == "failed" and "nodata" in before["error"]
    rerun = _report(str(failed_sweep), "--rerun-failed")
    assert rerun.returncode == 1 and "OverrideParseException" not in rerun.stdout + rerun.stderr
    after = _status(job)
    assert after["status"] == "failed" and after["started"] > before["started"]  # it ran again, in its folder
    command = f"python scripts/report.py {shlex.quote(str(failed_sweep))} --rerun-failed"
    assert command in (failed_sweep / "report.md").read_text()


def test_a_run_shorter_than_its_logging_interval_logs_its_last_step(tiny_model_dir, tmp_path):
    """"Also": with trainer.max_steps=1 (trainer.log_every_n_steps=10) no csv/metrics.csv was written."""
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY, "trainer.max_steps=1"], tmp_path)
    assert cfg.trainer.log_every_n_steps > 1
    train(cfg)
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0"]
