"""Sweep plots that fit the sweep: a grid's metric per cell (no interval claimed over single runs), a search's
objective per trial and against each parameter, short number labels and whole-step ticks; a report without plots
says why. Real run folders of a tiny `train()` run, laid out as a sweep's jobs; the figures read back as drawn."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ROOT, compose_cfg
from omegaconf import OmegaConf

import finlora.run.report as report
from finlora.run.report import load_sweep, readable, write_report
from finlora.train import train

LR = "0.00012345678901234567"  # as Optuna's sampler writes a learning rate into a trial's overrides


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One finished tiny run: two optimizer steps, a validation at each, no test stage."""
    out = tmp_path_factory.mktemp("run")
    train(compose_cfg([f"model.name_or_path={tiny_model_dir}", "quant=none", "adapter=lora", "task=fpb",
                       "trainer=cpu", "trainer.max_steps=3", "trainer.batch_size=4", "trainer.val_every_n_steps=1",
                       "data.val_size=4", "data.max_length=64", "logger=csv", "eval.enabled=false",
                       "eval.during_training.size=0", "eval.during_training.samples=0", "checkpoint.keep_best=0"],
                      out))
    return out


def _sweep(root, run_dir, jobs: list[list[str]], sweeper: str) -> report.Sweep:
    """`run_dir`'s files as the jobs of a sweep run by `sweeper`, each with its overrides, as Hydra lays them out."""
    root.mkdir()
    for num, overrides in enumerate(jobs):
        job = root / f"{num}_{','.join(overrides)}"
        shutil.copytree(run_dir, job, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
        (job / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
        (job / "job.json").write_text(json.dumps({"status": "ok", "overrides": overrides}))
    OmegaConf.save(OmegaConf.create({"hydra": {
        "runtime": {"cwd": str(ROOT)}, "job": {"name": "train", "config": {"override_dirname": {"exclude_keys": []}}},
        "overrides": {"task": []}, "sweeper": {"_target_": sweeper}}}), root / "multirun.yaml")
    return load_sweep(root)


@pytest.fixture
def drawn(monkeypatch):
    """Each figure's titles, axis labels, tick labels and legend texts, read as it is saved."""
    figures: dict[str, dict] = {}
    save = report._save

    def keep(fig, path):
        fig.canvas.draw()
        figures[path.name] = {
            "titles": [ax.get_title() for ax in fig.axes] + ([fig._suptitle.get_text()] if fig._suptitle else []),
            "xlabels": [ax.get_xlabel() for ax in fig.axes],
            "xticks": [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()],
            "legend": [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]}
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return figures


def test_a_grid_of_single_runs_claims_no_interval_and_ticks_whole_steps(run_dir, tmp_path, drawn):
    sweep = _sweep(tmp_path / "grid", run_dir, [[f"trainer.lr={LR}"], ["trainer.lr=0.001"]],
                   "hydra._internal.core_plugins.basic_sweeper.BasicSweeper")
    text = write_report(sweep).read_text()
    assert "![metric per cell](metric_by_cell.png)" in text and "No plots" not in text
    cells = drawn["metric_by_cell.png"]
    assert cells["titles"] == ["final_val_loss"]  # one run a cell: no "(mean, 95% interval)"
    assert cells["xticks"] == ["trainer.lr=0.000123", "trainer.lr=0.001"]
    curves = drawn["loss_curves.png"]
    assert curves["xticks"] == ["2", "0", "1", "2"]  # whole optimizer steps: train/loss's one point, val/loss's three
    assert "trainer.lr=0.000123" in curves["legend"] and f"| {readable(LR, 4)} |" in text


def test_a_search_plots_objective_per_trial_and_against_each_parameter(run_dir, tmp_path, drawn):
    sweep = _sweep(tmp_path / "study", run_dir, [[f"trainer.lr={LR}", "adapter.r=2"],
                                                 ["trainer.lr=0.0091", "adapter.r=4"],
                                                 ["trainer.lr=0.0004", "adapter.r=2"]],
                   "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert sweep.search
    text = write_report(sweep).read_text()
    assert "(objective_per_trial.png)" in text and "(objective_vs_params.png)" in text
    assert "metric_by_cell.png" not in text and not (sweep.dir / "metric_by_cell.png").exists()
    trials = drawn["objective_per_trial.png"]
    assert trials["xlabels"] == ["trial"] and trials["xticks"] == ["0", "1", "2"]
    assert trials["titles"] == ["val/loss per trial"] and trials["legend"] == ["trial", "best so far (min)"]
    params = drawn["objective_vs_params.png"]
    assert params["xlabels"] == ["adapter.r", "trainer.lr"]
    assert params["titles"][-1] == "val/loss against each searched parameter (3 trials)"
    assert all(len(t) <= 8 for t in params["xticks"]), params["xticks"]  # no 17-digit learning rates
    for png in ("objective_per_trial.png", "objective_vs_params.png", "loss_curves.png"):
        assert (sweep.dir / png).read_bytes()[:4] == b"\x89PNG"


def test_a_report_without_plots_says_why(run_dir, tmp_path):
    sweep_dir = tmp_path / "failed"
    sweep = _sweep(sweep_dir, run_dir, [["adapter.r=2"], ["adapter.r=4"]],
                   "hydra._internal.core_plugins.basic_sweeper.BasicSweeper")
    for job in sweep.jobs:  # both jobs failed before training: a record, no config, metrics or logs
        for name in ("config.yaml", "metrics.json", "csv"):
            shutil.rmtree(job.dir / name) if (job.dir / name).is_dir() else (job.dir / name).unlink()
        (job.dir / "job.json").write_text(json.dumps({"status": "failed", "error": "DataError: no data"}))
    text = write_report(load_sweep(sweep_dir)).read_text()
    assert ("No plots: no job finished, so there is no metric per setting to plot; no job's csv/metrics.csv holds "
            "a train/loss or val/loss value.") in text
    assert not list(sweep_dir.glob("*.png"))


def test_readable_numbers():
    assert [readable(v) for v in (LR, "0.001", "8", "lora", "1e-5", "-")] == ["0.000123", "0.001", "8", "lora",
                                                                              "1e-05", "-"]
