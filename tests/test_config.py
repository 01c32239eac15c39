"""Every config option composes and validates; every bad input fails early with a message naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, ROOT, compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from finlora.config import EvalConfig, validate
from finlora.errors import ConfigError

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in (ROOT / "conf").iterdir()
          if g.is_dir() and g.name not in ("paths", "hydra")}
# A task is its YAML file: one without training files is for evaluation only (issue 14, row 1: this was a list).
EVAL_ONLY_TASKS = {p.stem for p in (ROOT / "conf" / "task").glob("*.yaml") if not OmegaConf.load(p).get("train")}
# Templates for the user's own data (conf/task/custom.yaml, chat.yaml): the data's path is given on the command line.
PATH_GIVEN_TASKS = {p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")
                    if any("source" in s and OmegaConf.is_missing(s.source, "path")
                           for s in OmegaConf.load(p).get("train", []))}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"] + (["quant=none"] if option == "none" and group == "adapter" else [])
    if group == "task" and option in PATH_GIVEN_TASKS:
        (tmp_path / "rows.jsonl").write_text("")
        overrides.append(f"task.train.0.source.path={tmp_path / 'rows.jsonl'}")
    if group == "task" and option in EVAL_ONLY_TASKS:
        with pytest.raises(ConfigError, match="has no training files"):
            validate(compose_cfg(overrides, tmp_path))
    else:
        assert validate(compose_cfg(overrides, tmp_path)).output_dir == str(tmp_path)
    if group in ("model", "quant", "task", "logger"):
        cfg = validate(compose_cfg(overrides, tmp_path, config="eval"), EvalConfig)
        assert cfg.task.test and all(t.source or (DATA_DIR / t.file).is_file() for t in cfg.task.test)


def test_eval_only_tasks_are_known_from_their_files():
    assert {"nwgi", "finer", "fnxl", "xbrl_tags", "xbrl_value", "xbrl_formula"} == EVAL_ONLY_TASKS
    assert {"custom", "chat"} == PATH_GIVEN_TASKS


@pytest.mark.parametrize("value", ["0123456789abcdef0123456789abcdef01234567", "hf_" + "a1B2" * 9])
@pytest.mark.parametrize("key", ["logger.tags=[{}]", "logger.project={}", "run_name={}"])
def test_token_shaped_values_are_refused(key, value, tmp_path, monkeypatch):
    """Issue 14, row 9: a 40-hex W&B-style key in logger.tags was accepted and saved."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="looks like a token"):
        validate(compose_cfg([key.format(value)], tmp_path))


def test_a_commit_hash_is_a_revision_not_a_token(tmp_path):
    cfg = validate(compose_cfg(["model.revision=0123456789abcdef0123456789abcdef01234567"], tmp_path))
    assert cfg.model.revision == "0123456789abcdef0123456789abcdef01234567"


def test_no_known_harmless_library_message_on_the_command_line():
    """Issue 14, row 17: every command printed bitsandbytes' missing-`kernels` warning."""
    proc = _train("--help")
    assert proc.returncode == 0 and "gemm_4bit_forward" not in proc.stdout + proc.stderr


def test_every_test_file_is_a_task(tmp_path):
    """Each FinLoRA test file in the data folder is some task's test set."""
    files = {t.file for opt in set(GROUPS["task"]) - PATH_GIVEN_TASKS
             for t in validate(compose_cfg([f"task={opt}"], tmp_path, config="eval"), EvalConfig).task.test}
    assert {f"test/{p.name}" for p in (DATA_DIR / "test").glob("*.jsonl")} == files


def test_issue_example_composes(tmp_path):
    cfg = validate(compose_cfg(["adapter=dora", "adapter.r=8", "quant=8bit"], tmp_path))
    assert (cfg.adapter.method.value, cfg.adapter.r, cfg.quant.bits) == ("dora", 8, 8)
    assert cfg.adapter.scale == 2.0
    assert cfg.task.train[1].file.endswith("fiqa_train.jsonl") and cfg.task.train[1].repeat == 21


def test_finlora_recipe_preset(tmp_path):
    cfg = validate(compose_cfg(["experiment=sentiment_llama_3_1_8b_8bits_r8_dora"], tmp_path))
    t = cfg.trainer
    assert (t.lr, t.max_epochs, t.batch_size, t.grad_accum) == (1e-4, 4, 8, 2)
    assert (cfg.adapter.r, cfg.quant.bits, cfg.adapter.method.value) == (8, 8, "dora")
    assert cfg.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("override,message", [
    ("adapter.r=0", "adapter.r: must be a positive integer"),
    ("adapter.r=-4", "adapter.r: must be a positive integer"),
    ("adapter.alpha=0", "adapter.alpha: must be > 0"),
    ("adapter.alpha=-1", "adapter.alpha: must be > 0"),
    ("adapter.dropout=1.0", "adapter.dropout: must be in [0, 1)"),
    ("adapter.dropout=-0.1", "adapter.dropout: must be in [0, 1)"),
    ("quant.bits=3", "quant.bits: must be null, 4 or 8"),
    ("paths.data_dir=/no/such/folder", "paths.data_dir: data folder '/no/such/folder' does not exist"),
    ("model.name_or_path=/no/such/model", "model.name_or_path: local model folder '/no/such/model' does not exist"),
    ("model.name_or_path=embedded:gpt-9", "unknown embedded model"),
    ("trainer.lr=0", "trainer.lr: must be > 0"),
    ("trainer.precision=64", "trainer.precision"),
    ("logger.mode=sometimes", "logger.mode"),
    ("+adapter.rank=8", "adapter.rank"),
    ("ckpt_path=/no/such.ckpt", "ckpt_path"),
    ("adapter=none", "full fine-tuning (adapter=none) cannot train quantized weights"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.batch_size=big", "eval.batch_size: must be auto or an integer > 0, got 'big'"),
])
def test_bad_values_are_named(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([override], tmp_path))
    assert message in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("adapter.r=abc", "adapter.r"),
    ("adapter.method=foo", "adapter.method"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("data.batching=nope", "data.batching"),
    ("eval.int8_cpu=fp8", "eval.int8_cpu"),
    ("eval.four_bit=dequant", "eval.four_bit"),
    ("eval.share_prefix=maybe", "eval.share_prefix"),
])
def test_type_errors_are_named_while_composing(override, message, tmp_path):
    """The schema is registered with Hydra, so a wrong type fails while the config is composed."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override], tmp_path)
    assert message in str(err.value)


def test_all_value_problems_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["adapter.r=0", "adapter.dropout=2", "trainer.batch_size=0"], tmp_path))
    text = str(err.value)
    assert "adapter.r" in text and "adapter.dropout" in text and "trainer.batch_size" in text


def _train(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["quant=3bit"], "quant/3bit"),
    (["adapter=foo"], "adapter/foo"),
    (["adapter.r=0"], "adapter.r: must be a positive integer"),
    (["paths.data_dir=/no/such/folder"], "paths.data_dir"),
])
def test_cli_rejects_bad_input_before_loading(args, message, tmp_path):
    """The real command exits non-zero with the message, and no adapter or metrics are written."""
    run_dir = tmp_path / "run"
    proc = _train(*args, f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()


def test_cfg_job_refuses_a_wrong_type_naming_the_key():
    proc = _train("--cfg", "job", "adapter.r=abc")
    assert proc.returncode != 0 and "adapter.r" in proc.stderr and "r: abc" not in proc.stdout


def test_cfg_job_prints_resolved_config():
    proc = _train("--cfg", "job", "adapter=dora", "adapter.r=8", "quant=8bit")
    assert proc.returncode == 0, proc.stderr
    assert "use_dora" not in proc.stdout  # our config, not peft's
    assert "method: dora" in proc.stdout and "r: 8" in proc.stdout and "bits: 8" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["adapter=nonexistent"], "Available options in 'adapter':\n\tdora\n\tlora\n\tnone"),
    (["quant=3bit"], "Available options in 'quant':\n\t4bit\n\t8bit\n\tnone"),
    (["foo=1"], "Could not override 'foo'"),
    (["adapter.r=abc"], "adapter.r"),
])
def test_unknown_option_or_key_exits_2_naming_what_exists(args, message, tmp_path):
    """Issue 14, row 15: Hydra's own exit status was 1; the README promises 2 for bad input."""
    proc = _train(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()


TOKEN = "hf_" + "Planted1" * 5


@pytest.mark.parametrize("args", [[f"run_name={TOKEN}"], [f"logger.project={TOKEN}"], ["adapter.r=0"],
                                  ["paths.data_dir=/no/such/folder"]])
def test_refused_run_writes_nothing(args, tmp_path):
    """Issue 14, rows 8 and 16: a refused run left a folder holding `.hydra/` (with the token in it) and an
    empty log; now it is refused before Hydra makes the folder."""
    proc = _train(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_refused_sweep_with_a_token_writes_nothing(tmp_path):
    proc = _train("-m", "adapter.r=4,8", f"logger.tags=[{TOKEN}]", cwd=tmp_path)
    assert proc.returncode == 2 and "logger.tags: looks like a token" in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("*"))


def test_bad_data_leaves_no_run_folder(tmp_path):
    """Issue 14, row 16: a data error comes after Hydra made the run folder; the folder holds nothing of the
    run's own, so it goes."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    (data / "train" / "fpb_train.jsonl").write_text('{"context": "c", "target": "t"}\n'
                                                    '{"context": "c", "target": null}\n')
    (data / "test" / "fpb_test.jsonl").write_text('{"context": "c", "target": "positive"}\n')
    proc = _train("task=fpb", f"paths.data_dir={data}", cwd=tmp_path)
    assert proc.returncode == 2 and "fpb_train.jsonl:2: 'target'" in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not list((tmp_path / "outputs" / "runs").iterdir())


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["adapter.r=0"], ["adapter=foo"]])
def test_cold_start_paths_import_no_torch(args):
    """Issue 13, item 5: `--help`, `--cfg job` and a refused config loaded torch, transformers, peft and
    Lightning first (6 s on the dev CPU); they now answer from Hydra and the schema alone."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['train.py', *{args!r}]\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as exit:\n"
            "    print('exit', exit.code)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().endswith("no torch"), proc.stdout[-2000:] + proc.stderr[-2000:]
    if args == ["adapter.r=0"]:
        assert "exit 2" in proc.stdout and "adapter.r: must be a positive integer, got 0" in proc.stderr
