"""The GPU gate (scripts/gpu_gate.py) on the CPU: one eager cell through the real train.py and eval.py on the tiny
model and the JSON it leaves; a capture cell's refusal on a machine without a GPU; the `gpu` marker that selects
the GPU tests; how a run's summary says which path ran."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import DATA_DIR, ROOT, pytest_collection_modifyitems

spec = importlib.util.spec_from_file_location("gpu_gate", ROOT / "scripts" / "gpu_gate.py")
gpu_gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_gate)


@pytest.mark.slow  # 20-40 s on the 2-core CPU; keeps the fast suite near 10 minutes
def test_the_gate_on_the_cpu_runs_an_eager_cell_through_train_and_eval_and_records_it(tiny_model_dir, tmp_path):
    out = tmp_path / "gate.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_gate.py"), "--allow-cpu", "--skip-tests",
           "--only", "eager-lora-none", "--model", str(tiny_model_dir), "--data-dir", str(DATA_DIR),
           "--steps", "2", "--eval-limit", "4", "--work", str(tmp_path / "runs"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert report["commit"] == (head or "unknown") and isinstance(report["dirty"], bool) == bool(head)
    assert report["device"] == "CPU" and report["pytest"] is None and report["versions"]["torch"]
    assert report["summary"] == "1 of 1 cells ok"
    [eager] = report["cells"]
    assert eager["name"] == "eager-lora-none" and eager["status"] == "ok" and eager["exit_code"] == 0
    assert eager["summary"]["steps"] == 2 and eager["summary"]["tokens_per_s"] > 0
    assert eager["path_ran"] == "eager" and eager["path_as_asked"] is True
    assert eager["config"]["batching"] == "packed" and eager["config"]["adapter"] == "lora"
    assert eager["eval"]["status"] == "ok" and eager["eval"]["rows"] == 4 and eager["eval"]["accuracy"] is not None
    assert (tmp_path / "runs" / "eager-lora-none" / "adapter" / "adapter_config.json").is_file()
    # Again into the same --work (a gate cell rerun on a still-warm machine): the cell trains anew, not resuming the
    # finished run it finds there.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [again] = json.loads(out.read_text())["cells"]
    metrics = json.loads((tmp_path / "runs" / "eager-lora-none" / "metrics.json").read_text())
    assert again["status"] == "ok" and "training_from_earlier_attempt" not in metrics


def test_the_gate_refuses_a_machine_without_cuda_unless_told(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_gate.py"), "--skip-tests", "--work",
                           str(tmp_path), "--out", str(tmp_path / "gate.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "torch sees no CUDA GPU here" in proc.stderr
    assert not (tmp_path / "gate.json").exists()


def test_a_capture_or_regions_cell_refused_for_want_of_a_gpu_is_expected_on_the_cpu_only():
    error = "finlora: trainer.capture: runs on a CUDA GPU only, and this run is on cpu; use trainer.capture=false"
    capture, eager = {"path": "capture"}, {"path": "eager"}
    assert gpu_gate.failure(capture, error, cpu=True) == "refused (no GPU)"
    assert gpu_gate.failure({"path": "regions"}, error, cpu=True) == "refused (no GPU)"
    assert gpu_gate.failure(capture, error, cpu=False) == "failed"
    assert gpu_gate.failure(eager, error, cpu=True) == "failed"
    assert gpu_gate.failure(capture, "Traceback ... RuntimeError", cpu=True) == "failed"


def test_matrix_has_18_path_cells_and_a_default_cell_per_quantization():
    cells = gpu_gate.cells()
    assert len(cells) == 21 and len({c["name"] for c in cells}) == 21
    assert [c["name"] for c in cells if c["path"] == "default"] == ["default-none", "default-8bit", "default-4bit"]
    default_none = next(c for c in cells if c["name"] == "default-none")
    default = gpu_gate.train_overrides(default_none, ROOT / "x", gpu_gate.parse_args(["--extra", "a.b=1"]))
    assert not any(o.startswith(("adapter=", "trainer.capture", "trainer.compile", "data.batching")) for o in default)
    assert default[-1] == "a.b=1" and "quant=none" in default


@pytest.mark.parametrize("summary,ran", [
    ({"compile": "eager"}, "eager"),
    ({"compile": "eager", "capture": True, "cudagraphs_captured": True}, "capture"),
    ({"compile": "inductor", "compile_regions": True, "capture": True, "cudagraphs_captured": True},
     "capture+inductor regions"),
    ({"compile": "eager", "capture": True, "cudagraphs_captured": False, "capture_failure": "a host sync"},
     "capture (NOT recorded: a host sync)"),
    ({"compile": "cudagraphs", "compile_regions": False}, "cudagraphs"),
])
def test_path_ran_is_read_from_the_runs_summary(summary, ran):
    assert gpu_gate.path_ran(summary, {}) == ran


def test_the_path_a_cell_should_take_is_judged_only_where_the_cell_decides_it():
    cell = {c["name"]: c for c in gpu_gate.cells()}
    assert gpu_gate.expected_path(cell["eager-dora-4bit"]) == "eager"
    assert gpu_gate.expected_path(cell["capture-lora-none"]) == "capture"
    assert gpu_gate.expected_path(cell["regions-dora-4bit"]) == "capture+inductor regions"
    assert gpu_gate.expected_path(cell["capture-lora-8bit"]) is None
    assert gpu_gate.expected_path(cell["default-none"]) is None


def test_merge_keeps_earlier_cells_not_run_now_in_matrix_order():
    earlier = {"commit": "a" * 40, "date": "d", "cells": [{"name": "eager-lora-4bit", "status": "ok"},
                                                          {"name": "eager-lora-none", "status": "failed"}]}
    merged = gpu_gate.merged_cells([{"name": "eager-lora-none", "status": "ok"}], [earlier], {"eager-lora-none"})
    assert [(c["name"], c["status"]) for c in merged] == [("eager-lora-none", "ok"), ("eager-lora-4bit", "ok")]
    assert merged[1]["from"].startswith("aaaaaaaaaa")


def test_changed_files_compares_this_tree_with_the_bundles_listing_of_its_commit(tmp_path):
    listing = subprocess.run(["git", "ls-files", "-s", "train.py", "README.md"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    tampered = "100644 " + "0" * 40 + " 0\tpyproject.toml\n" + "100644 " + "1" * 40 + " 0\tno/such/file.py\n"
    (tmp_path / "tree.txt").write_text(listing + tampered)
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train.py", "README.md"], cwd=ROOT).returncode == 0
    changed = gpu_gate.changed_files(tmp_path / "tree.txt")
    assert changed[-2:] == ["pyproject.toml", "no/such/file.py"] and (changed == changed[-2:]) == clean


class _Item:
    def __init__(self, *marks):
        self.marks, self.added = list(marks), []

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)

    def add_marker(self, mark):
        self.added.append(mark.name)


def test_tests_skipped_without_cuda_get_the_gpu_marker():
    cuda = _Item(pytest.mark.skipif(True, reason="CUDA graphs need a CUDA GPU").mark)
    two = _Item(pytest.mark.skipif(True, reason="needs two GPUs").mark)
    text = _Item(pytest.mark.skipif("not torch.cuda.is_available()").mark)
    other = _Item(pytest.mark.skipif(True, reason="this CPU has no AVX512-BF16").mark, pytest.mark.slow.mark)
    pytest_collection_modifyitems(None, [cuda, two, text, other])
    assert cuda.added == two.added == text.added == ["gpu"] and other.added == []
