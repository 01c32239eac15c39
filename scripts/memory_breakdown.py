"""What was live at a run's peak of GPU memory, grouped by where it was allocated: the map for cutting a peak.

Runs `python train.py OVERRIDES` in this process with CUDA's allocation history on (torch.cuda.memory's recorder,
Python stacks only), then replays the history: the peak of allocated bytes, and the blocks live at that moment,
grouped by the innermost frames outside torch and Lightning (the model's layer, peft, bitsandbytes, finlora).
Blocks allocated before the recorded window (the weights, once the window is full) count as one line.

    python scripts/memory_breakdown.py --out breakdown.txt -- task=fpb task.train.0.file=rows.jsonl ... \
        trainer.gradient_checkpointing=true

`scripts/bench_defaults.py --only memory` gives the peaks themselves, each in a fresh process; this says what
makes one of them up. Needs CUDA.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Frames of these files are skipped: torch's and Lightning's packages (matched as installed packages, since a
# machine may keep its environment under a folder named torch, as /opt/torch/.venv), and the standard library's glue.
OUTSIDE = re.compile(r"[/\\](site|dist)-packages[/\\](torch|lightning)[/\\]|^<frozen|[/\\](contextlib|functools)\.py$")
GIB, MIB = 2**30, 2**20


def run_train(overrides: list[str]) -> None:
    """train.py as __main__ (Hydra finds conf/ beside it), its exit taken as the end of the run."""
    sys.argv = [str(ROOT / "train.py"), *overrides]
    spec = importlib.util.spec_from_file_location("__main__", ROOT / "train.py")
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except SystemExit as done:
        print(f"train.py exited with {done.code}")


def site(event: dict[str, Any], frames: int = 3) -> str:
    """The innermost frame, then the first `frames` frames outside torch and Lightning."""
    stack = event.get("frames") or []
    ours = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in stack
            if not OUTSIDE.search(f["filename"])][:frames]
    return f"[{stack[0]['name'] if stack else '?'}] " + (" < ".join(ours) or "(no frame outside torch)")


def replay(trace: list[dict], start: int) -> tuple[int, int, dict[int, dict]]:
    """The peak of allocated bytes over the trace, its event's index and the blocks live then."""
    total, peak, at = start, start, -1
    for i, event in enumerate(trace):
        total += _change(event)
        if total > peak:
            peak, at = total, i
    live: dict[int, dict] = {}
    for event in trace[:at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    return peak, at, live


def _change(event: dict) -> int:
    return {"alloc": event["size"], "free_requested": -event["size"]}.get(event["action"], 0)


def report(trace: list[dict], allocated_now: int, peak_stat: int, groups: int = 40) -> list[str]:
    start = allocated_now - sum(_change(e) for e in trace)  # what was allocated before the window
    peak, at, live = replay(trace, start)
    in_window = sum(e["size"] for e in live.values())
    lines = [f"replayed peak {peak / GIB:.3f} GiB (torch.cuda.max_memory_allocated {peak_stat / GIB:.3f}); "
             f"allocated before the recorded window {start / GIB:.3f} GiB; live at the peak from within it "
             f"{in_window / GIB:.3f} GiB in {len(live)} blocks; the peak's event {at} of {len(trace)}: "
             f"{site(trace[at], 6) if at >= 0 else '-'}", ""]
    grouped: dict[str, list] = collections.defaultdict(lambda: [0, collections.Counter()])
    for event in live.values():
        group = grouped[site(event)]
        group[0] += event["size"]
        group[1][event["size"]] += 1
    for where, (size, sizes) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:groups]:
        common = ", ".join(f"{n} x {s / MIB:.1f} MiB" for s, n in sizes.most_common(3))
        lines.append(f"{size / MIB:9.1f} MiB  {sum(sizes.values()):5d} blocks ({common})  {where}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the breakdown is written")
    parser.add_argument("--entries", type=int, default=4_000_000, help="allocation events the recorder keeps")
    parser.add_argument("overrides", nargs="*", help="train.py's overrides (after --)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_breakdown: needs CUDA (it reads the CUDA caching allocator's history)")
    torch.cuda.memory._record_memory_history(max_entries=args.entries, stacks="python")
    run_train(args.overrides)
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    lines = report(trace, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
