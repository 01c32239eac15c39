"""Real multiruns of `train.py -m` on the tiny Llama: through Ray with two declared GPUs, through the basic
launcher with a failing job and its rerun, and through submitit's local executor; DDP refused in a sweep;
the report read back from the files the jobs wrote."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from wandb_file import records

from finlora.run.job import multi_device_problem
from finlora.run.report import load_sweep, unexplained_differences

main = runpy.run_path(str(ROOT / "scripts" / "report.py"))["main"]  # the command's own entry

SHORT = ["quant=none", "trainer=cpu", "task=fpb", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
         "trainer.val_every_n_steps=2", "trainer.batch_size=4", "data.max_length=96", "data.val_size=8",
         "eval.limit=4"]


def _multirun(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def _jobs(sweep_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "job.json").read_text()) for d in sweep_dir.iterdir() if (d / "job.json").is_file()}


@pytest.fixture(scope="module")
def ray_sweep(tiny_model_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two jobs on a local Ray instance that declares two GPUs: the launcher's defaults give each job one."""
    sweep_dir = tmp_path_factory.mktemp("ray") / "rank_sweep"
    proc = _multirun(sweep_dir, "hydra/launcher=ray", "+hydra.launcher.ray.init.num_gpus=2",
                     f"model.name_or_path={tiny_model_dir}", *SHORT, "logger=wandb", "logger.tags=[ci]",
                     "adapter.r=4,8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep_dir, proc


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_ray_sweep_puts_each_job_on_its_own_gpu_at_once(ray_sweep):
    sweep_dir, _ = ray_sweep
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs.values())
    assert sorted(j["cuda_visible_devices"] for j in jobs.values()) == ["0", "1"]
    a, b = jobs.values()
    assert a["started"] < b["ended"] and b["started"] < a["ended"], "the two jobs did not run at the same time"
    assert a["pid"] != b["pid"]


def test_ray_sweep_jobs_have_their_own_wandb_runs_grouped_by_sweep(ray_sweep):
    sweep_dir, _ = ray_sweep
    runs = {}
    for job_dir in (d for d in sweep_dir.iterdir() if (d / "job.json").is_file()):
        files = list((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, job_dir
        recs = records(files[0])
        run = next(r.run for r in recs if r.HasField("run"))
        summary = {i.key: i.value_json for r in recs if r.HasField("summary") for i in r.summary.update}
        runs[job_dir.name] = run
        assert run.run_group == "rank_sweep"
        assert run.display_name == job_dir.name  # its number and swept key, as its folder says
        assert set(run.tags) == {"ci", "adapter:dora", "quant:none", "task:fpb"}
        assert {"final_val_loss", "test/fpb/accuracy", "steps"} <= set(summary)
    assert len({r.run_id for r in runs.values()}) == 2
    assert {r.display_name.split("_", 1)[1].split(",")[0] for r in runs.values()} == {"r=4", "r=8"}


def test_sweep_ends_with_a_table_and_a_report(ray_sweep, tmp_path):
    sweep_dir, proc = ray_sweep
    assert "The jobs' configs differ only in the swept keys" in proc.stdout
    report = (sweep_dir / "report.md").read_text()
    assert "2 jobs: 2 finished, 0 did not" in report and "Swept: `adapter.r`" in report
    assert report.count("| ok |") == 2 and "cpu (GPU 0)" in report and "cpu (GPU 1)" in report
    for png in ("metric_vs_r.png", "loss_curves.png"):
        assert (sweep_dir / png).read_bytes()[:4] == b"\x89PNG"

    # From the files alone, without W&B: a copy whose second job ran with another cache folder is flagged.
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("wandb", "adapter", "checkpoints"))
    second = sorted(d for d in copy.iterdir() if (d / "config.yaml").is_file())[1]
    config = OmegaConf.load(second / "config.yaml")
    config.paths.cache_dir = "/elsewhere"
    OmegaConf.save(config, second / "config.yaml")
    assert main([str(copy)]) == 0
    text = (copy / "report.md").read_text()
    assert "**Warning**: the jobs also differ in keys that were not swept: `paths.cache_dir`" in text


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_failed_job_does_not_stop_the_sweep_and_reruns_alone(tiny_model_dir, tmp_path):
    """Basic launcher: the first job's model folder is missing; the sweep still runs the next job, exits 1 after
    the table, and the printed command reruns just the failed job in its folder once the model is there."""
    sweep_dir, missing = tmp_path / "sweep", tmp_path / "model-not-yet"
    proc = _multirun(sweep_dir, f"model.name_or_path={missing},{tiny_model_dir}", *SHORT, "logger=csv")
    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = _jobs(sweep_dir)
    assert [jobs[k]["status"] for k in sorted(jobs)] == ["failed", "ok"]
    failed = jobs[min(jobs)]
    assert "model.name_or_path" in failed["error"] and failed["exit_code"] == 2
    assert f"1 of 2 jobs failed; rerun them (each in its own folder) with:\n  python scripts/report.py {sweep_dir} " \
           "--rerun-failed" in proc.stderr
    assert "--rerun-failed" in (sweep_dir / "report.md").read_text()

    shutil.copytree(tiny_model_dir, missing)
    rerun = subprocess.run([sys.executable, "scripts/report.py", str(sweep_dir), "--rerun-failed"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert sorted(_jobs(sweep_dir)) == sorted(jobs)  # the same folders, no new ones
    assert all(j["status"] == "ok" for j in _jobs(sweep_dir).values())
    assert all((sweep_dir / name / "metrics.json").is_file() for name in jobs)
    assert load_sweep(sweep_dir).swept == ["model.name_or_path"]


def test_ddp_inside_a_sweep_is_refused_before_any_rank_starts(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, "trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp", "adapter.r=4")
    assert proc.returncode == 1
    assert "each rank would start the sweep again" in proc.stderr
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 1 and next(iter(jobs.values()))["status"] == "failed"
    assert not list(sweep_dir.glob("*/config.yaml"))  # refused before the run began


@pytest.mark.parametrize("devices,refused", [(1, False), ("1", False), ([0], False), (2, True), (-1, True),
                                             ("auto", True), ("0,1", True)])
def test_multi_device_problem(devices, refused):
    assert (multi_device_problem(devices) is not None) == refused


def test_unexplained_differences_names_keys_no_swept_key_covers():
    configs = [{"adapter.r": 4, "adapter.alpha": 8, "seed": 1, "run_name": "a"},
               {"adapter.r": 8, "adapter.alpha": 16, "seed": 2, "run_name": "b"}]
    assert unexplained_differences(configs, ["adapter"]) == {"seed": [1, 2]}
    assert unexplained_differences(configs, ["adapter.r"]) == {"adapter.alpha": [8, 16], "seed": [1, 2]}


def test_slurm_launcher_defaults_compose():
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.timeout_min > 0


@pytest.mark.slow
def test_submitit_local_sweep(tiny_model_dir, tmp_path):
    """submitit's local executor: each job in its own process, as on SLURM."""
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, "hydra/launcher=submitit_local", f"model.name_or_path={tiny_model_dir}", *SHORT,
                     "logger=csv", "adapter=lora,dora")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs.values())
    assert len({j["pid"] for j in jobs.values()}) == 2
    assert (sweep_dir / "report.md").is_file()
