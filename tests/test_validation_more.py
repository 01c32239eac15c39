"""Issue 34, rows 6, 8, 9, 10 and 14: values that got through to a traceback after the model loaded, a hang, a
folder outside `outputs/`, a token on disk, or a silent surprise. Each refusal is shown to come before
anything is written (run from an empty folder, which stays empty) and, where a model is named, before it
loads (a model folder without weights: had loading begun, it would fail otherwise)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, ROOT, compose_cfg

from finlora.config import validate
from finlora.data import read_jsonl
from finlora.errors import ConfigError, DataError
from finlora.train import train

TOKEN = "hf_" + "Planted1" * 5
TINY = ["quant=none", "adapter=lora", "task=fpb", "trainer=cpu", "trainer.max_steps=2", "trainer.batch_size=4",
        "data.val_size=8", "data.max_length=64", "logger=csv", "eval.enabled=false"]


def _train(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _written(folder: Path) -> list[Path]:
    """Every file, and every run folder, under `folder` (a run refused once Hydra had started leaves its
    empty `outputs/runs/` parent; the run's own folder goes)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.parent.name == "runs")


@pytest.mark.parametrize("sweep", [[], ["-m", "adapter.r=4,8"]])
def test_token_in_a_hydra_override_is_refused_and_never_written(weightless, sweep, tmp_path):
    """Row 6: `+hydra.job.env_set.HF_TOKEN=hf_…` was written twice into `.hydra/hydra.yaml`."""
    work = tmp_path / "work"
    work.mkdir()
    proc = _train(*sweep, *TINY, f"model.name_or_path={weightless}", f"+hydra.job.env_set.HF_TOKEN={TOKEN}", cwd=work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hydra.job.env_set.HF_TOKEN: looks like a token" in proc.stderr
    assert _written(work) == []


@pytest.mark.parametrize("name", ["a/../../escaped", "r" * 300])
def test_run_name_that_is_not_one_folder_name_is_refused_before_anything_is_written(weightless, name, tmp_path):
    """Row 8: `a/../../escaped` wrote outside `outputs/runs/`; 300 characters ended in an ENAMETOOLONG traceback."""
    proc = _train(*TINY, f"model.name_or_path={weightless}", f"run_name={name}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run_name: must be 1 to 128 of the characters A-Z a-z 0-9 . _ - + = , : @" in proc.stderr
    assert _written(tmp_path) == []


@pytest.mark.parametrize(("override", "message"), [
    ("adapter.r=100000", "adapter.r: 100000 is more than every adapted layer's smaller side (at most 64, q_proj)"),
    ("data.max_length=10000000", "data.max_length: 10000000 is more than the model's context, 512 tokens"),
])
def test_sizes_the_model_cannot_take_are_refused_before_it_loads(weightless, override, message, tmp_path):
    """Row 9: r=100000 ran out of memory after the model loaded; max_length=10000000 asked for 722 GB."""
    proc = _train(*TINY, f"model.name_or_path={weightless}", override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert _written(tmp_path) == []


@pytest.mark.slow  # 10-12 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_a_repeat_that_makes_too_many_rows_is_refused_saying_what_fits(weightless, tmp_path):
    """Row 9: `repeat: 100000` hung in data preparation (362,800,000 rows made and shuffled)."""
    proc = _train(*TINY, f"model.name_or_path={weightless}", "task.train.0.repeat=100000", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("task.train[0].repeat: train/fpb_train.jsonl's 3,628 rows × 100000 make 362,800,000 training rows, more "
            "than the 10,000,000 a run prepares; repeat ≤ 2756 fits") in proc.stderr
    assert _written(tmp_path) == []


BAD_VALUES = {"seed=-1": "seed: must be in [0, 4294967295]",
              "trainer.weight_decay=-5": "trainer.weight_decay: must be >= 0 and finite",
              "trainer.num_workers=-1": "trainer.num_workers: must be >= 0",
              "trainer.devices=0": "trainer.devices: must be auto, -1 (every GPU), a count > 0",
              "trainer.strategy=bogus": "trainer.strategy: unknown strategy 'bogus'",
              "adapter.alpha=inf": "adapter.alpha: must be > 0 and finite"}
if sys.platform != "darwin":
    BAD_VALUES["trainer.accelerator=mps"] = f"trainer.accelerator: mps is Apple's GPU (macOS); this is {sys.platform}"


@pytest.mark.parametrize("override", BAD_VALUES)
def test_bad_value_is_refused_naming_its_key(override, tmp_path):
    """Row 10: each was a traceback (exit 1), most after the model loaded; alpha=inf was blamed on the lr."""
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([override], tmp_path))
    assert BAD_VALUES[override] in str(err.value)


def test_bad_values_together_exit_2_before_anything_is_written(tmp_path):
    proc = _train(*BAD_VALUES, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert all(message in proc.stderr for message in BAD_VALUES.values()), proc.stderr
    assert _written(tmp_path) == []


def test_lightning_strategies_and_device_lists_are_accepted(tmp_path):
    cfg = validate(compose_cfg(["trainer.strategy=ddp_spawn_find_unused_parameters_true", "trainer.devices=[0,1]",
                                "seed=0"], tmp_path))
    assert cfg.trainer.devices == [0, 1]


def test_duplicate_key_in_a_record_is_refused_by_line(tmp_path):
    """Row 14: `{"target": "positive", "target": "negative"}` kept the last value without a word."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"context": "a", "target": "positive"}\n{"context": "b", "target": "positive", '
                    '"target": "negative"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: duplicate key 'target' in one record$"):
        read_jsonl(path)


def test_silent_surprises_each_get_a_warning_line(tiny_model_dir, tmp_path, caplog):
    """Row 14: warmup longer than the run, validation never reached, rows repeated 150 times and a NaN target all
    trained without a word."""
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR / "test", data / "test")
    (data / "train").mkdir()
    rows = [json.dumps({"context": f"Instruction: x{i}\nAnswer: ", "target": "positive"}) for i in range(20)]
    train_file = data / "train" / "fpb_train.jsonl"
    train_file.write_text("\n".join([*rows, '{"context": "n\\nAnswer: ", "target": NaN}']) + "\n")
    with caplog.at_level(logging.WARNING):
        train(compose_cfg([f"model.name_or_path={tiny_model_dir}", *TINY, f"paths.data_dir={data}",
                           "task.train.0.repeat=150", "trainer.warmup_steps=5", "trainer.val_every_n_steps=10"],
                          tmp_path / "run"))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for line in ["trainer.warmup_steps: 5 is more than the run's 2 optimizer steps; the learning rate never reaches "
                 "trainer.lr",
                 "trainer.val_every_n_steps: 10 is more than the run's 2 batches; no validation runs",
                 "task fpb: 13 training rows occur more than 100 times each (150 at most,",
                 f"{train_file}: 1 target is NaN or infinite (line 21)"]:
        assert any(s.startswith(line) for s in said), (line, said)
