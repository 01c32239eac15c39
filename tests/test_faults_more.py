"""Issue 34, rows 7, 11, 12 and 13 (and two of its "Also" items): labels a test set can never score, training
rows that are test rows, a model or checkpoint or adapter config that is not one, a full disk and a read-only
output folder, and a signal during the final adapter save or the model load. Checks that must come before the
model loads run against a model folder without weights (`weightless`): had loading begun, it would fail."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg
from safetensors.torch import save_file
from test_faults import finish, kill_at_rename, start
from test_hardening import TINY

from finlora.adapters import attach_adapter, load_adapter
from finlora.config import AdapterConfig, AdapterMethod, DoraImpl, ModelConfig, QuantConfig, validate
from finlora.data import load_task
from finlora.errors import ConfigError, DataError
from finlora.models import load_model
from finlora.outputs import atomic_dir
from finlora.train import train

ROW = '{{"context": "{0}\\nAnswer: ", "target": "{1}"}}\n'


def _data(root: Path, train_rows: list[tuple[str, str]], test_rows: list[tuple[str, str]]) -> Path:
    """A task folder in fpb's layout with these (context, target) rows."""
    for name, rows in (("train/fpb_train.jsonl", train_rows), ("test/fpb_test.jsonl", test_rows)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(ROW.format(*r) for r in rows))
    return root


def _cfg(model: Path, run_dir: Path, *extra: str):
    return compose_cfg([f"model.name_or_path={model}", *TINY, *extra], run_dir)


TRAIN = [(f"news {i}", ("positive", "negative", "neutral")[i % 3]) for i in range(40)]


# Row 7: labels and leakage, checked before the model loads.

def test_test_targets_outside_the_labels_are_refused_by_file_and_line(weightless, tmp_path):
    data = _data(tmp_path / "data", TRAIN, [("a", "positive"), ("b", "bullish"), ("c", "Neutral ")])
    with pytest.raises(DataError) as err:
        train(_cfg(weightless, tmp_path / "run", f"paths.data_dir={data}"))
    assert (f"1 targets of test set fpb are not among its labels ['negative', 'neutral', 'positive'] "
            f"(e.g. {data / 'test/fpb_test.jsonl'}:2: 'bullish')") in str(err.value)
    assert not (tmp_path / "run").exists()


def test_training_targets_outside_the_labels_are_counted_in_a_warning(tmp_path, caplog):
    rows = [*TRAIN, ("x1", "bullish"), ("x2", "bullish"), ("x3", "mixed")]
    data = _data(tmp_path / "data", rows, [("t", "positive")])
    cfg = validate(compose_cfg([*TINY, f"paths.data_dir={data}"], tmp_path / "run"))
    with caplog.at_level(logging.WARNING, "finlora.data"):
        load_task(cfg.task, cfg.data, cfg.paths.data_dir)
    assert (f"3 of 43 training rows have targets outside the test labels ['negative', 'neutral', 'positive'] "
            f"('bullish': 2, 'mixed': 1; e.g. {data / 'train/fpb_train.jsonl'}:41: 'bullish'") in caplog.text


def test_training_rows_that_are_test_rows_are_refused_unless_allowed(tmp_path, caplog):
    data = _data(tmp_path / "data", TRAIN, TRAIN[:5])  # the train file holds the whole test file
    cfg = validate(compose_cfg([*TINY, f"paths.data_dir={data}"], tmp_path / "run"))
    with pytest.raises(DataError) as err:
        load_task(cfg.task, cfg.data, cfg.paths.data_dir)
    assert (f"5 of 40 training rows are also test rows (e.g. {data / 'train/fpb_train.jsonl'}:1 = "
            f"{data / 'test/fpb_test.jsonl'}:1); remove them from the training file, or set "
            "data.allow_test_overlap=true") in str(err.value)
    cfg = validate(compose_cfg([*TINY, f"paths.data_dir={data}", "data.allow_test_overlap=true"], tmp_path / "run"))
    with caplog.at_level(logging.WARNING, "finlora.data"):
        load_task(cfg.task, cfg.data, cfg.paths.data_dir)
    assert "data.allow_test_overlap: 5 of 40 training rows are also test rows" in caplog.text


# Row 11: what is not a model, a checkpoint or an adapter config, each named in one line before loading.

def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=f"model.name_or_path: {tmp_path / 'notes'} is not a model folder "
                                          r"\(no config.json in it\)"):
        train(_cfg(tmp_path / "notes", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # 23 s here, in transformers' look-up of the hub id
def test_a_hub_id_missing_from_the_cache_while_offline_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path: nobody/no-such-model is not in the local Hugging "
                                          "Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"):
        train(_cfg(Path("nobody/no-such-model"), tmp_path / "run"))


class Foreign:
    """An object another tool pickled into its checkpoint."""


@pytest.mark.parametrize("kind", ["foreign", "payload"])
def test_a_checkpoint_pickled_by_another_tool_is_named_without_weights_only_advice(weightless, tmp_path,
                                                                                   kind):
    ckpt = tmp_path / "other.ckpt"
    obj = Foreign() if kind == "foreign" else {"state_dict": {}, "x": Payload(tmp_path / "pwned")}
    torch.save({"model": obj}, ckpt)
    with pytest.raises(ConfigError) as err:
        train(_cfg(weightless, tmp_path / "run", f"ckpt_path={ckpt}"))
    assert str(err.value).startswith(f"{ckpt} holds pickled Python objects, not only tensors")
    assert "weights_only" not in str(err.value) and not (tmp_path / "pwned").exists()


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("text", "problem"), [
    ('{"r": 8,', r"not JSON \(Expecting property name enclosed in double quotes: line 1 column 9"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"peft_type": "LORA", "r": 8}', "no target_modules"),
])
def test_eval_on_a_malformed_adapter_config_names_the_file(weightless, tmp_path, text, problem):
    adapter = tmp_path / "adapter"
    shutil.copytree(weightless, adapter)  # its tokenizer files, as a saved adapter has them
    (adapter / "config.json").unlink()
    (adapter / "adapter_config.json").write_text(text)
    from finlora.evaluate import evaluate

    cfg = compose_cfg([f"model.name_or_path={weightless}", "task=fpb", f"adapter_path={adapter}"], tmp_path / "eval",
                      config="eval")
    with pytest.raises(ConfigError, match=f"adapter_path: {adapter / 'adapter_config.json'}: {problem}"):
        evaluate(cfg)


# Row 12: a full disk and a read-only output folder, for real (tmpfs mounts in a user namespace).

def _unshare(script: str) -> subprocess.CompletedProcess:
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a tmpfs")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_full_disk_names_the_path_and_size_and_keeps_the_previous_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    write = ("import sys; from pathlib import Path; from finlora.outputs import write_json; "
             "write_json(Path(sys.argv[1]), {'x': 'y' * int(sys.argv[2])})")
    done = _unshare(f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} -c \"{write}\" {disk}/m.json 10 "
                    f"&& {sys.executable} -c \"{write}\" {disk}/m.json 200000; echo status $?; cat {disk}/m.json; "
                    f"ls -a {disk}")
    out = done.stdout + done.stderr
    assert f"finlora.errors.CannotWrite: cannot write {disk}/m.json: no space left on the device (" in out, out
    assert "bytes written when it failed); every file written before is kept whole" in out
    assert '"x": "yyyyyyyyyy"' in out and ".tmp" not in out  # the previous file whole, no temporary left


def test_a_read_only_output_folder_is_one_line_before_loading(weightless, tmp_path):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    cmd = " ".join([sys.executable, "train.py", f"model.name_or_path={weightless}", *TINY,
                    f"hydra.run.dir={out_dir}/run"])
    done = _unshare(f"mount -t tmpfs tmpfs {out_dir} && mount -o remount,ro {out_dir} && {cmd}")
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"finlora: cannot write {out_dir}/run: the file system is read-only; every file written before is kept whole "
        "(each is written under a temporary name and renamed into place once complete): free space, or write "
        "elsewhere (hydra.run.dir=…, paths.cache_dir=…), and rerun"]


# Row 13: a signal during the final adapter save or during the model load.

@pytest.mark.slow  # a real train.py process (about 15-30 s on 2 cores)
def test_sigterm_during_the_final_adapter_save_is_one_line_and_leaves_no_partial_folder(tiny_model_dir, tmp_path):
    env = kill_at_rename(tmp_path, "/adapter", 1, signal.SIGTERM)  # the adapter written, not yet renamed into place
    code, out = finish(start(tiny_model_dir, tmp_path / "run", "trainer.max_steps=2", env=env))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert f"finlora: stopped by SIGTERM while writing {tmp_path / 'run' / 'adapter'}; it was not written" in out
    assert "Traceback" not in out
    assert not list((tmp_path / "run").glob(".adapter*")) and not (tmp_path / "run" / "adapter").exists()
    assert "stopped by SIGTERM while writing" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow  # a real train.py process (about 15-30 s on 2 cores)
def test_ctrl_c_during_the_model_load_is_one_line(tiny_model_dir, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(  # Ctrl-C as the model's weights load (its generation config opens)
        "import os, signal, sys\n"
        "def hook(event, args):\n"
        "    if event == 'open' and str(args[0]).endswith('generation_config.json'):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.addaudithook(hook)\n")
    env = {"PYTHONPATH": f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code, out = finish(start(tiny_model_dir, tmp_path / "run", env=env))
    assert code == 130, out[-3000:]
    assert "finlora: stopped by SIGINT (Ctrl-C) outside training" in out and "Traceback" not in out


def test_a_killed_saves_partial_adapter_folder_is_swept_by_the_next_save(tmp_path):
    (tmp_path / ".adapter-k1ll3d").mkdir()
    (tmp_path / ".adapter-k1ll3d" / "adapter_model.safetensors").write_text("half")
    with atomic_dir(tmp_path / "adapter") as d:
        (d / "v").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# Also: the adapter's files alike (0644), and no DoRA line for a LoRA adapter.

def test_a_saved_folders_files_are_all_0644(tmp_path):
    with atomic_dir(tmp_path / "adapter") as d:
        save_file({"w": torch.zeros(2)}, d / "adapter_model.safetensors")  # safetensors writes 0600
        (d / "adapter_config.json").write_text("{}")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "adapter").iterdir()}
    assert modes == {"adapter_model.safetensors": "0o644", "adapter_config.json": "0o644"}


def test_a_lora_adapter_is_not_reported_as_dora_on_zero_layers(tiny_model_dir, tmp_path, caplog):
    def base():
        return load_model(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(),
                          torch.float32, torch.device("cpu"))

    attach_adapter(base(), AdapterConfig(method=AdapterMethod.lora, r=4), False).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, "finlora.adapters"):
        load_adapter(base(), str(tmp_path), DoraImpl.finlora, merge=False)
    assert "finlora DoRA on" not in caplog.text
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is False
