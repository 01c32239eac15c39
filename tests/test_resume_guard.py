"""Issue 34, rows 1, 2 and 5: a resumed run's record never lies. A rerun in a run folder under other settings
or on edited training files is refused before the model loads, or continued only when asked and then
recorded; no checkpoint is written from weights that are not finite, and "last good" names a finite one."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg

from finlora.errors import NonFiniteLoss
from finlora.train import train

TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4",
        "data.val_size=8", "data.max_length=64", "logger=csv", "eval.enabled=false", "checkpoint.keep_best=0"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def trained(tiny_model_dir, tmp_path) -> tuple[list[str], Path]:
    """A finished 2-step run on its own copies of the tiny model and of a small fpb data folder: the common
    overrides and the run folder."""
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_model_dir, model)
    rows = [json.dumps({"context": f"Instruction: sentiment?\nInput: news {i}\nAnswer: ",
                        "target": ("negative", "neutral", "positive")[i % 3]}) for i in range(40)]
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    (data / "train" / "fpb_train.jsonl").write_text("".join(r + "\n" for r in rows))
    test_row = {"context": "Instruction: sentiment?\nInput: held-out news\nAnswer: ", "target": "neutral"}
    (data / "test" / "fpb_test.jsonl").write_text(json.dumps(test_row) + "\n")  # not a training row (row 7)
    common = [*TINY, f"model.name_or_path={model}", f"paths.data_dir={data}"]
    train(compose_cfg(common, tmp_path / "run"))
    return common, tmp_path / "run"


def _weightless(common: list[str]) -> None:
    """Remove the model's weights: a run that began loading it would now fail otherwise than by refusal."""
    for f in Path(common[-2].split("=", 1)[1]).glob("*.safetensors"):
        f.unlink()


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_rerun_under_changed_settings_is_refused_naming_every_key(trained):
    """Row 1: it resumed with exit 0 under the old schedule's lr, while config.yaml said the new task and lr."""
    common, run = trained
    config = (run / "config.yaml").read_text()
    _weightless(common)
    proc = _cli(*common, "trainer.lr=0.0002", "seed=7", "data.max_length=48", "trainer.batch_size=2",
                "task.name=fpb2", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    for line in ("  data.max_length: 64 → 48", "  seed: 42 → 7", "  task.name: 'fpb' → 'fpb2'",
                 "  trainer.batch_size: 4 → 2", "  trainer.lr: 0.0001 → 0.0002"):
        assert line in proc.stderr
    assert "To start a new run, leave hydra.run.dir out" in proc.stderr
    assert "resume_changes=[data.max_length,seed,task.name,trainer.batch_size,trainer.lr]" in proc.stderr
    assert (run / "config.yaml").read_text() == config  # the record stays the run's
    assert "trainer.lr: 0.0001 → 0.0002" in (run / "train.log").read_text()


def test_edited_training_file_is_refused_naming_it(trained):
    """Row 2: a resume read the edited file's rows silently."""
    common, run = trained
    data_file = Path(common[-1].split("=", 1)[1]) / "train" / "fpb_train.jsonl"
    with data_file.open("a") as f:
        f.write(json.dumps({"context": "Instruction: sentiment?\nInput: new\nAnswer: ", "target": "positive"}) + "\n")
    _weightless(common)
    proc = _cli(*common, f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "  train/fpb_train.jsonl: changed since the checkpoint (" in proc.stderr
    assert "resume_changes=[train/fpb_train.jsonl]" in proc.stderr


def test_changes_continue_when_asked_and_are_recorded(trained, caplog):
    """Row 1's explicit way on: the changed keys take effect (the restored optimizer's lr included) and the
    record says old → new, at which step."""
    common, run = trained
    data_file = Path(common[-1].split("=", 1)[1]) / "train" / "fpb_train.jsonl"
    data_file.write_text(data_file.read_text().replace("news 1\\n", "news one\\n"))
    caplog.set_level(logging.WARNING, "finlora")
    summary = train(compose_cfg([*common, "trainer.max_steps=4", "trainer.lr=0.0002", "trainer.scheduler=constant",
                                 "resume_changes=[trainer.lr,trainer.max_steps,trainer.scheduler,"
                                 "train/fpb_train.jsonl]"], run))
    assert summary["steps"] == 4
    resume = summary["resumes"][-1]
    assert resume["step"] == 2
    assert resume["changes"]["trainer.lr"] == [0.0001, 0.0002]
    assert resume["changes"]["trainer.max_steps"] == [2, 4]
    assert list(resume["changes"]) == ["trainer.lr", "trainer.max_steps", "trainer.scheduler", "train/fpb_train.jsonl"]
    assert json.loads((run / "metrics.json").read_text())["resumes"] == summary["resumes"]
    assert "continuing at step 2 under changed settings: trainer.lr: 0.0001 → 0.0002" in caplog.text
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [0.0002]  # the new lr, not the old
    assert ckpt["finlora"]["resumes"] == summary["resumes"]


def test_weights_made_non_finite_are_never_checkpointed(tiny_model_dir, tmp_path):
    """Row 5: an update that overflowed (trainer.lr=inf; its loss and gradients were finite) was saved as
    last.ckpt with every trained tensor non-finite, then named as the last good checkpoint."""
    with pytest.raises(NonFiniteLoss) as err:
        train(compose_cfg([*TINY, f"model.name_or_path={tiny_model_dir}", "trainer.lr=inf",
                           "checkpoint.every_n_steps=1"], tmp_path))
    assert "after step 1 the trainable weights are not finite (12 of 12 tensors" in str(err.value)
    assert "No checkpoint was saved yet" in str(err.value)
    assert not list((tmp_path / "checkpoints").glob("*"))


def test_last_good_checkpoint_named_after_an_overflow_is_finite(trained):
    """Row 5, resumed: the checkpoint named is the one from before the overflow, left as it was."""
    common, run = trained
    good = run / "checkpoints" / "last.ckpt"
    before = good.read_bytes()
    with pytest.raises(NonFiniteLoss) as err:
        train(compose_cfg([*common, "trainer.max_steps=4", "trainer.lr=inf", "checkpoint.every_n_steps=1",
                           "resume_changes=[trainer.lr,trainer.max_steps]"], run))
    assert "after step 3 the trainable weights are not finite" in str(err.value)
    assert f"Last good checkpoint: {good}. " in str(err.value)
    assert good.read_bytes() == before


def test_last_good_skips_a_non_finite_checkpoint(trained):
    """Row 5: "last good" names a checkpoint whose weights are finite (one written elsewhere may not be)."""
    from finlora.checkpoints import last_good

    _, run = trained
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "last.ckpt", ckpts / "step-000002.ckpt")
    poisoned = torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")
    poisoned["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in poisoned["state_dict"].items()}
    torch.save(poisoned, ckpts / "last.ckpt")
    assert last_good(ckpts) == ckpts / "step-000002.ckpt"
