"""What a run shows of itself (issue 36): its best checkpoint exported as `adapter_best/` and scored by the test stage,
beside the last weights; a few generated answers at every validation, as a W&B table and a JSONL file; and sweep
plots that fit the sweep (a grid's cells, a search's trials), with short labels and whole-step ticks, or one line
saying why there are none. One real tiny run through `train()`, its files read back with plain peft and a real W&B
offline run file, and laid out as the jobs of a grid and of an Optuna search for the real report."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import ROOT, compose_cfg, lively_weights
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from wandb_file import records

from finlora.config import validate
from finlora.data import load_task
from finlora.errors import ConfigError
from finlora.evaluate import generate
from finlora.prompts import build_prompt
from finlora.run import plots, report
from finlora.run.report import load_sweep, readable, write_report
from finlora.train import train

RUN = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=4", "trainer.batch_size=4",
       "trainer.lr=3e-3", "trainer.val_every_n_steps=2", "trainer.log_every_n_steps=1", "data.val_size=8",
       "data.max_length=64", "logger=wandb", "eval.limit=4", "eval.during_training.size=4",
       "eval.during_training.samples=3",
       # the worst validation loss is "best": a checkpoint that is not the last one, whatever the curve does
       "checkpoint.monitor=val/loss", "checkpoint.mode=max"]


@pytest.fixture(scope="module")
def lively_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with weights whose greedy answers differ from prompt to prompt."""
    path = tmp_path_factory.mktemp("lively")
    lively_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(lively_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("best")
    cfg = compose_cfg([f"model.name_or_path={lively_dir}", *RUN], out)
    return out, train(cfg), cfg


def _task(dict_cfg):
    cfg = validate(dict_cfg)
    return load_task(cfg.task, cfg.data, cfg.paths.data_dir)


def _state(path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in
            torch.load(path, weights_only=True, map_location="cpu")["state_dict"].items()}


def _saved(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _same(saved: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    """peft's saved names lack the adapter's name (`.default`)."""
    named = {k.replace(".default", ""): v for k, v in state.items()}
    return saved.keys() == named.keys() and all(torch.equal(saved[k], named[k]) for k in saved)


def test_best_checkpoint_is_exported_tested_and_recorded_beside_the_last(run, lively_dir):
    out, summary, _ = run
    with (out / "csv" / "metrics.csv").open() as f:
        val = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]]
    [best_ckpt] = (out / "checkpoints").glob("best-*.ckpt")
    record = json.loads((out / "adapter_best" / "best_checkpoint.json").read_text())
    assert record["value"] == pytest.approx(max(val)) and record["monitor"] == "val/loss"
    assert record["step"] == torch.load(best_ckpt, weights_only=True, map_location="cpu")["global_step"]
    assert summary["best_step"] == record["step"] and summary["steps"] == 4
    assert summary["best_adapter_dir"] == str(out / "adapter_best") and summary["adapter_dir"] == str(out / "adapter")
    assert summary["tested"] == str(out / "adapter_best")
    assert json.loads((out / "metrics.json").read_text())["tested"] == summary["tested"]

    # The two folders hold the weights of their checkpoints: the best one's and the last one's, which differ.
    best, last = _saved(out / "adapter_best"), _saved(out / "adapter")
    assert _same(best, _state(best_ckpt)) and _same(last, _state(out / "checkpoints" / "last.ckpt"))
    assert record["step"] == 2 < summary["steps"]  # training lowers the loss: the worst is the first validation
    assert not all(torch.equal(best[k], last[k]) for k in best)

    # adapter_best/ loads in plain peft, and gives the answers the test stage scored (it scored the best weights).
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter_best")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively_dir), out / "adapter_best")
    predictions = [json.loads(line) for line in (out / "eval" / "fpb_predictions.jsonl").open()]
    [(_, test)] = _task(run[2]).test
    rows = [test[p["index"]] for p in predictions]
    answers = generate(model, tokenizer, rows, validate(run[2]).task.test[0].max_new_tokens, 4)
    assert answers == [p["generated"] for p in predictions] and len(set(answers)) > 1

    # Each card says what it holds: the last weights point to the tested best, whose card has the test metrics.
    assert "the test stage scored the best checkpoint, `adapter_best/`" in (out / "adapter" / "README.md").read_text()
    card = (out / "adapter_best" / "README.md").read_text()
    assert "| test/fpb/accuracy |" in card and f"kept at step {record['step']}" in card


def test_samples_at_each_validation_in_a_file_and_a_wandb_table(run):
    out, _, cfg = run
    files = sorted((out / "samples").glob("*.jsonl"))
    assert [f.name for f in files] == ["val_step000002.jsonl", "val_step000004.jsonl"]
    val = _task(cfg).val
    samples = [[json.loads(line) for line in f.open()] for f in files]
    assert all(len(rows) == 3 for rows in samples)
    for rows in samples:  # the scored sample's first rows, in file order, prompted as evaluation prompts them
        assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
        assert all(r["prompt"] == build_prompt(val[r["index"]]) and r["target"] == str(val[r["index"]]["target"])
                   for r in rows)
    assert {r["step"] for r in samples[-1]} == {4}

    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records(run_file) if r.HasField("history")]
    logged = [h for h in history if "val/samples/path" in h]
    # (Lightning logs a validation at the step before it counts: the files are named by optimizer steps done)
    assert [h["trainer/global_step"] for h in logged] == [1, 3] and all(h["val/samples/nrows"] == 3 for h in logged)
    table = json.loads((run_file.parent / "files" / logged[-1]["val/samples/path"]).read_text())
    assert table["columns"] == ["step", "index", "prompt", "target", "generated", "predicted"]
    assert [row[2] for row in table["data"]] == [r["prompt"] for r in samples[-1]]
    assert [row[4] for row in table["data"]] == [r["generated"] for r in samples[-1]]


def test_samples_count_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="eval.during_training.samples: must be >= 0"):
        validate(compose_cfg(["eval.during_training.samples=-1"], tmp_path))


LR = "0.00012345678901234567"  # as Optuna's sampler writes a learning rate into a trial's overrides


def _sweep(root, run_dir, jobs: list[list[str]], sweeper: str) -> report.Sweep:
    """`run_dir`'s files as the jobs of a sweep run by `sweeper`, each with its overrides, as Hydra lays them out."""
    root.mkdir()
    for num, overrides in enumerate(jobs):
        job = root / f"{num}_{','.join(overrides)}"
        shutil.copytree(run_dir, job, ignore=shutil.ignore_patterns("adapter*", "checkpoints", "wandb", "samples"))
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
    save = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        figures[path.name] = {
            "titles": [ax.get_title() for ax in fig.axes] + ([fig._suptitle.get_text()] if fig._suptitle else []),
            "xlabels": [ax.get_xlabel() for ax in fig.axes],
            "xticks": [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()],
            "legend": [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)  # each plot of the report is saved there
    return figures


def test_a_grid_of_single_runs_claims_no_interval_and_ticks_whole_steps(run, tmp_path, drawn):
    run_dir = run[0]
    sweep = _sweep(tmp_path / "grid", run_dir, [[f"trainer.lr={LR}"], ["trainer.lr=0.001"]],
                   "hydra._internal.core_plugins.basic_sweeper.BasicSweeper")
    text = write_report(sweep).read_text()
    assert "![metric per cell](metric_by_cell.png)" in text and "No plots" not in text
    cells = drawn["metric_by_cell.png"]
    assert cells["titles"][:2] == ["final_val_loss", "test/fpb/accuracy"]
    assert not any("interval" in t for t in cells["titles"])  # one run a cell: no "(mean, 95% interval)"
    assert cells["xticks"][:2] == ["trainer.lr=0.000123", "trainer.lr=0.001"]
    curves = drawn["loss_curves.png"]
    with (run_dir / "csv" / "metrics.csv").open() as f:
        logged = list(csv.DictReader(f))
    steps = [sorted({r["step"] for r in logged if r[key]}, key=int) for key in ("train/loss", "val/loss")]
    assert curves["xticks"] == steps[0] + steps[1]  # the optimizer steps logged, whole numbers
    assert "trainer.lr=0.000123" in curves["legend"] and f"| {readable(LR, 4)} |" in text


def test_a_search_plots_objective_per_trial_and_against_each_parameter(run, tmp_path, drawn):
    run_dir = run[0]
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
    assert params["xticks"][:2] == ["2", "4"]  # the rank's whole values, not 2.5
    for png in ("objective_per_trial.png", "objective_vs_params.png", "loss_curves.png"):
        assert (sweep.dir / png).read_bytes()[:4] == b"\x89PNG"


def test_a_report_without_plots_says_why(run, tmp_path):
    run_dir = run[0]
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
