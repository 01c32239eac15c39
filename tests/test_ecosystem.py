"""finlora open to its ecosystem: any Lightning Trainer argument (`trainer.extra`), callbacks by `_target_`, short
sweep folders, an Optuna search, portable adapters with a model card, and complete W&B / TensorBoard / CSV
records. Real parts throughout: tiny random Llama runs, W&B offline files, TensorBoard event files, a real
Optuna study run by `train.py -m`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import wandb
import yaml
from conftest import ROOT, compose_cfg
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM
from wandb_file import records

from finlora.adapters import check_saved_adapter
from finlora.config import LoggerConfig, ModelConfig, validate
from finlora.errors import ConfigError
from finlora.loggers import WANDB_ID_FILE, build_loggers, finish
from finlora.models import base_identity, portable_name
from finlora.run.job import SUFFIX_CHARS, job_suffix
from finlora.train import train

TINY = ["quant=none", "trainer=cpu", "task=fpb", "trainer.batch_size=4", "data.max_length=96", "data.val_size=8",
        "trainer.log_every_n_steps=1"]


class RecordTrainer(L.Callback):
    """A user's own callback, reached by import path: writes what the Trainer was built with."""

    def __init__(self, path: str, note: str = "") -> None:
        self.path, self.note = path, note

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.path).write_text(json.dumps({
            "note": self.note, "limit_val_batches": trainer.limit_val_batches,
            "num_sanity_val_steps": trainer.num_sanity_val_steps,
            "callbacks": [type(c).__name__ for c in trainer.callbacks]}))


def _problems(overrides: list[str], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides, tmp_path))
    return str(err.value)


def test_trainer_extra_is_checked_against_lightning_trainer(tmp_path):
    msg = _problems(["trainer.extra.max_steps=5", "trainer.extra.accumulate_grad_batches=2",
                     "trainer.extra.limit_val_batchs=2", "trainer.extra.limit_train_batches=abc",
                     "trainer.extra.callbacks=[]"], tmp_path)
    assert "trainer.extra.max_steps: clashes with trainer.max_steps" in msg
    assert "trainer.extra.accumulate_grad_batches: clashes with trainer.grad_accum" in msg
    assert "trainer.extra.limit_val_batchs: lightning.Trainer has no argument" in msg and "limit_val_batches" in msg
    assert "trainer.extra.limit_train_batches: 'abc' is not a valid value" in msg
    assert "trainer.extra.callbacks: clashes with the callbacks group" in msg
    validate(compose_cfg(["trainer.extra.limit_val_batches=0.5", "trainer.extra.deterministic=warn",
                          "trainer.extra.profiler=simple"], tmp_path))


def test_callbacks_are_checked_before_the_model_loads(tmp_path):
    msg = _problems(["callbacks=early_stopping", "callbacks.early_stopping.patiense=2",
                     "+callbacks.a._target_=no.such.Module", "+callbacks.b._target_=collections.OrderedDict",
                     "+callbacks.c.monitor=val/loss", "+callbacks.d._target_=lightning.pytorch.callbacks.EarlyStopping",
                     "+callbacks.d.monitor=val/nothing"], tmp_path)
    assert "callbacks.early_stopping: the arguments" in msg and "patiense" in msg
    assert "callbacks.a._target_: cannot import 'no.such.Module'" in msg
    assert "callbacks.b._target_: collections.OrderedDict is not a lightning.pytorch.callbacks.Callback" in msg
    assert "callbacks.c: needs a _target_" in msg
    assert "callbacks.d.monitor: this run does not log 'val/nothing'" in msg
    assert "sweep.objective" not in msg
    assert "sweep.objective: this run does not log 'test/tfns/accuracy'" in _problems(
        ["task=fpb", "sweep.objective=test/tfns/accuracy"], tmp_path)
    # Unset, the objective is val/loss, unchecked: a run without a validation split stays valid.
    validate(compose_cfg(["data.val_size=0", "checkpoint.keep_best=0"], tmp_path))
    assert "sweep.objective: this run does not log 'val/loss'" in _problems(
        ["data.val_size=0", "sweep.objective=val/loss"], tmp_path)


def test_a_refused_extra_stops_train_py_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}",
                           "trainer.extra.max_epochs=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "trainer.extra.max_epochs: clashes with trainer.max_epochs" in proc.stderr
    assert not run_dir.exists()


def test_job_folder_suffix_is_bounded_and_puts_swept_keys_first(monkeypatch):
    overrides = [f"trainer.extra.k{i}=value{i}" for i in range(20)] + ["adapter.r=8", "model.name_or_path=/a/b"]
    monkeypatch.setenv("FINLORA_SWEPT", "adapter.r")
    suffix = job_suffix(overrides, ["model.name_or_path"])
    assert suffix.startswith("r=8,k0=value0") and suffix.endswith("+17")
    assert len(suffix) <= SUFFIX_CHARS + 3 and "/" not in suffix


def test_tensorboard_csv_and_a_portable_adapter_with_its_card(tiny_model_dir, tmp_path):
    """One real run: Trainer arguments and callbacks from the config reach Lightning; TensorBoard holds the
    hyperparameters and metrics; the CSV log holds the test metrics; the adapter names its base portably and
    carries a model card, and still loads with peft and passes eval.py's base check."""
    record = tmp_path / "trainer.json"
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.hub_id=finlora-tests/tiny-llama", *TINY,
                       "adapter=dora", "trainer.max_steps=4", "trainer.val_every_n_steps=2", "eval.limit=4",
                       "eval.during_training.size=0", "logger=tensorboard", "trainer.extra.limit_val_batches=1",
                       "trainer.extra.num_sanity_val_steps=1", "callbacks=[early_stopping,lr_monitor]",
                       f"+callbacks.mine._target_={__name__}.RecordTrainer", f"+callbacks.mine.path={record}",
                       "+callbacks.mine.note=hello", "sweep.objective=test/fpb/accuracy"], tmp_path / "run")
    summary = train(cfg)
    run = tmp_path / "run"
    seen = json.loads(record.read_text())
    assert seen["note"] == "hello" and seen["limit_val_batches"] == 1 and seen["num_sanity_val_steps"] == 1
    assert {"EarlyStopping", "LearningRateMonitor", "RecordTrainer"} <= set(seen["callbacks"])
    assert summary["objective"] == summary["test/fpb/accuracy"]

    # TensorBoard: an event file with the hparams plugin's data (the config) and the metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/grad_norm", "lr-AdamW", "test/fpb/accuracy"} <= scalars
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    start = hparams["_hparams_/session_start_info"].decode("latin-1")
    assert "adapter/method" in start and "trainer/lr" in start
    tb_yaml = yaml.safe_load((run / "tensorboard" / "hparams.yaml").read_text())
    assert tb_yaml["adapter"]["r"] == 8 and tb_yaml["trainer"]["extra"]["limit_val_batches"] == 1
    assert yaml.safe_load((run / "csv" / "hparams.yaml").read_text())["task"]["name"] == "fpb"

    # CSV: the test metrics are in the log too.
    with (run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    (test_row,) = [r for r in rows if r.get("test/fpb/accuracy")]
    assert float(test_row["test/fpb/accuracy"]) == pytest.approx(summary["test/fpb/accuracy"])
    assert any(r.get("train/grad_norm") for r in rows) and any(r.get("lr-AdamW") for r in rows)

    # The adapter: portable base name, where the local copy was, a model card; loads with peft.
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "finlora-tests/tiny-llama"
    base_json = json.loads((adapter / "base_model.json").read_text())
    assert base_json["hub_id"] == "finlora-tests/tiny-llama"
    assert base_json["local_copy"] == str(Path(tiny_model_dir).resolve())
    card = (adapter / "README.md").read_text()
    assert "base_model: finlora-tests/tiny-llama" in card and "library_name: peft" in card
    assert "train/fpb_train.jsonl" in card and "r=8" in card and "merge_and_unload" in card
    # the test metrics are on the card of the weights the test stage scored: the best checkpoint's (issue 36)
    assert summary["tested"] == str(run / "adapter_best") and "| test/fpb/accuracy |" not in card
    best_card = (run / "adapter_best" / "README.md").read_text()
    assert f"| test/fpb/accuracy | {summary['test/fpb/accuracy']:.4f} |" in best_card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    check_saved_adapter(str(adapter), base_identity(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir))))


def test_embedded_model_adapters_name_the_hub_id():
    assert portable_name(ModelConfig()) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name(ModelConfig(name_or_path="meta-llama/Llama-3.1-8B-Instruct")) == \
        "meta-llama/Llama-3.1-8B-Instruct"


def test_wandb_run_has_group_tags_lr_grad_norm_and_the_adapter_artifact(tiny_model_dir, tmp_path):
    """A single run of `train.py` (the entry sets its W&B group and tags), with trainer.extra and a callback
    from the command line, no `+` needed."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}",
                           f"model.name_or_path={tiny_model_dir}", *TINY, "adapter=lora", "trainer.max_steps=2",
                           "trainer.val_every_n_steps=2", "eval.enabled=false", "logger=wandb", "logger.tags=[mine]",
                           "trainer.extra.limit_val_batches=1", "callbacks=device_stats"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = tmp_path / "adapter"
    # A local folder without model.hub_id keeps its path, and AutoPeftModelForCausalLM finds the base there.
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(tiny_model_dir).resolve())
    assert AutoPeftModelForCausalLM.from_pretrained(str(adapter)).peft_config["default"].r == 8

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    recs = records(run_file)
    run = next(r.run for r in recs if r.HasField("run"))
    assert run.run_id == (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert run.run_group == "fpb" and set(run.tags) == {"mine", "adapter:lora", "quant:none", "task:fpb"}
    history = {item.key or "/".join(item.nested_key) for r in recs if r.HasField("history") for item in r.history.item}
    assert {"train/loss", "train/grad_norm", "lr-AdamW", "val/loss"} <= history
    assert any(k.startswith("DeviceStatsMonitor") for k in history)  # the callback chosen on the command line
    artifacts = [r.artifact for r in recs if r.HasField("artifact") and r.artifact.type == "model"]
    assert [a.name.split("-")[:2] for a in artifacts] == [["adapter", "lora"], ["adapter", "best"]]  # last, best
    paths = {e.path for e in artifacts[0].manifest.contents}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "base_model.json"} <= paths


def test_a_restarted_run_resumes_its_wandb_run(tmp_path):
    ids = []
    for _ in range(2):
        loggers = build_loggers(LoggerConfig(wandb=True, mode="offline"), tmp_path, "r", {"a": 1})
        loggers[1].log_metrics({"x": 1.0}, step=0)
        finish(loggers)
    # W&B's service may still be writing a run's file when wandb.finish returns (a resumed run's, 1 time in 6 here);
    # teardown waits for it, as the exit of a `python train.py` process does
    wandb.teardown()
    for run_file in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")):
        run = next(r.run for r in records(run_file) if r.HasField("run"))
        ids.append(run.run_id)
    assert len(ids) == 2 and ids[0] == ids[1] == (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert wandb.run is None


def _multirun(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # a real multirun of two jobs; job_suffix's bound is checked in the fast suite above
def test_a_sweep_of_20_overrides_runs_in_a_short_folder(tiny_model_dir, tmp_path):
    overrides = [f"model.name_or_path={tiny_model_dir}", *TINY, "adapter=lora", "adapter.r=2,4", "adapter.alpha=4",
                 "adapter.dropout=0.0", "trainer.max_steps=1", "trainer.lr=0.001", "trainer.warmup_steps=0",
                 "trainer.scheduler=constant", "eval.enabled=false", "logger=csv", "seed=3", "data.seed=5"]
    assert len(overrides) == 20
    proc = _multirun(tmp_path / "s", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(d for d in (tmp_path / "s").iterdir() if (d / "job.json").is_file())
    assert [d.name.split(",")[0] for d in jobs] == ["0_r=2", "1_r=4"]
    assert all(len(d.name) <= SUFFIX_CHARS + 6 for d in jobs)
    records_ = [json.loads((d / "job.json").read_text()) for d in jobs]
    assert all(r["status"] == "ok" and len(r["overrides"]) == 20 for r in records_)


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_optuna_study_of_three_trials_optimizes_the_objective(tiny_model_dir, tmp_path):
    sweep = tmp_path / "study"
    proc = _multirun(sweep, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=1",
                     f"model.name_or_path={tiny_model_dir}", *TINY, "adapter=dora", "adapter.r=choice(2,4)",
                     "adapter.alpha=interval(2,16)", "trainer.lr=tag(log,interval(1e-4,1e-2))",
                     "trainer.max_steps=2", "trainer.val_every_n_steps=2", "eval.enabled=false", "logger=csv",
                     "checkpoint.keep_best=0", "sweep.objective=val/loss", "sweep.direction=maximize")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if (d / "job.json").is_file())
    assert len(jobs) == 3 and all(json.loads((d / "job.json").read_text())["status"] == "ok" for d in jobs)
    values = [json.loads((d / "metrics.json").read_text())["objective"] for d in jobs]
    assert all(v == json.loads((d / "metrics.json").read_text())["final_val_loss"] for v, d in zip(values, jobs,
                                                                                                   strict=True))
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(values))  # sweep.direction=maximize reached Optuna
    assert {"adapter.r", "adapter.alpha", "trainer.lr"} == set(result["best_params"])
    assert all(d.name.split("_", 1)[1].startswith(("r=", "alpha=", "lr=")) for d in jobs)


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_a_trial_without_its_objective_fails_and_says_why(tiny_model_dir, tmp_path):
    """max_steps ends the run inside its first epoch and no validation runs: val/loss is never logged."""
    sweep = tmp_path / "study"
    proc = _multirun(sweep, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", f"model.name_or_path={tiny_model_dir}",
                     *TINY, "adapter=lora", "adapter.r=choice(2,4)", "trainer.max_steps=1", "eval.enabled=false",
                     "logger=csv", "checkpoint.keep_best=0")
    assert proc.returncode != 0
    (job,) = [d for d in sweep.iterdir() if (d / "job.json").is_file()]
    record = json.loads((job / "job.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("MissingObjective: sweep.objective=val/loss")
    assert "trainer.val_every_n_steps" in record["error"]
    assert (job / "adapter" / "adapter_config.json").is_file()  # nothing the job produced is lost


def test_optuna_composes_with_the_ray_launcher(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/sweeper=optuna", "hydra/launcher=ray", "hydra.sweeper.n_jobs=2"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.n_jobs == 2
    assert cfg.hydra.launcher._target_.endswith("RayLauncher") and cfg.hydra.launcher.ray.remote.max_calls == 1


@pytest.mark.slow
def test_optuna_trials_run_through_ray_one_gpu_each(tiny_model_dir, tmp_path):
    """Two trials at once (hydra.sweeper.n_jobs=2) on a local Ray instance that declares two GPUs."""
    sweep = tmp_path / "ray_study"
    proc = _multirun(sweep, "hydra/sweeper=optuna", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_gpus=2",
                     "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", f"model.name_or_path={tiny_model_dir}",
                     *TINY, "adapter=lora", "adapter.r=choice(2,4)", "trainer.max_steps=2",
                     "trainer.val_every_n_steps=2", "eval.enabled=false", "logger=csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((d / "job.json").read_text()) for d in sweep.iterdir() if (d / "job.json").is_file()]
    assert sorted(j["cuda_visible_devices"] for j in jobs) == ["0", "1"] and all(j["status"] == "ok" for j in jobs)
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] > 0
