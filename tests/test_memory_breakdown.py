"""scripts/memory_breakdown.py's replay of an allocation history, on a history written by hand (the recorder
itself needs CUDA)."""

from __future__ import annotations

import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("memory_breakdown", ROOT / "scripts" / "memory_breakdown.py")
memory_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_breakdown)

MIB = 2**20


ENV = "/opt/torch/.venv/lib/python3.12/site-packages"  # the GPU image keeps its environment under a folder named torch


def frames(name: str) -> list[dict]:
    return [{"filename": f"{ENV}/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": f"{ENV}/transformers/models/llama/modeling_llama.py", "line": 7, "name": name}]


def event(action: str, addr: int, mib: int, name: str = "forward") -> dict:
    return {"action": action, "addr": addr, "size": mib * MIB, "frames": frames(name)}


HISTORY = [event("alloc", 1, 100, "mlp"), event("alloc", 2, 50, "attention"), event("alloc", 3, 30, "mlp"),
           event("free_requested", 2, 50), event("free_completed", 2, 50), event("alloc", 4, 10, "mlp"),
           event("free_requested", 1, 100), event("free_requested", 3, 30)]


def test_replay_finds_the_peak_and_what_was_live_then() -> None:
    peak, at, live = memory_breakdown.replay(HISTORY, start=1000 * MIB)
    assert peak == 1180 * MIB and at == 2  # 100 + 50 + 30 above the 1000 allocated before
    assert sorted(live) == [1, 2, 3]  # the completed free of block 2 comes later and counts once


def test_report_takes_what_was_allocated_before_the_window_from_the_end_state() -> None:
    # 10 MiB (block 4) is still allocated at the end, on top of 1000 allocated before the window
    lines = memory_breakdown.report(HISTORY, allocated_now=1010 * MIB, peak_stat=1180 * MIB)
    assert lines[0].startswith("replayed peak 1.152 GiB") and "before the recorded window 0.977 GiB" in lines[0]
    groups = lines[2:]
    assert groups[0].split()[0] == "130.0" and "modeling_llama.py:7:mlp" in groups[0]  # blocks 1 and 3
    assert groups[1].split()[0] == "50.0" and "attention" in groups[1]
    assert groups[0].split("]")[0].endswith("[linear")  # the innermost frame, inside torch
    assert "functional.py" not in groups[0]  # torch's frames are skipped, transformers' kept
