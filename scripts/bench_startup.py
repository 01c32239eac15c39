"""Cold start of the command line on this machine, side by side with `python -c "import torch"`.

Each command runs `--repeats` times as a fresh process (median wall time): `train.py --help`,
`train.py --cfg job`, a config refused by value (`adapter.r=0`) and by an unknown option (`adapter=foo`).
None of them should load torch; a ratio below 1 means the command answers before torch alone would have
loaded.

    .venv/bin/python scripts/bench_startup.py --out docs/benchmarks.md

Writes (or replaces) the section "## Start-up" of `--out`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from finlora.outputs import replace_section

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "train.py --help": [sys.executable, "train.py", "--help"],
    "train.py --cfg job": [sys.executable, "train.py", "--cfg", "job"],
    "train.py adapter.r=0 (refused, exit 2)": [sys.executable, "train.py", "adapter.r=0"],
    "train.py adapter=foo (refused, exit 2)": [sys.executable, "train.py", "adapter=foo"],
}


def median_wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    median_wall(COMMANDS["train.py --help"], 1)  # bytecode compiled once, as on any machine after the first run
    results = {name: median_wall(cmd, args.repeats) for name, cmd in COMMANDS.items()}
    torch_s = results["python -c 'import torch'"]
    cpu = platform.processor() or platform.machine()
    lines = ["## Start-up", "",
             f"`python scripts/bench_startup.py`: median of {args.repeats} fresh processes each, on this project's "
             f"dev machine ({cpu}, {len(os.sched_getaffinity(0))} cores); Python "
             f"{platform.python_version()}, torch {version('torch')}, hydra-core {version('hydra-core')}.", "",
             "| command | seconds | × `import torch` |", "|---|---|---|"]
    lines += [f"| `{name}` | {s:.2f} | {s / torch_s:.2f} |" for name, s in results.items()]
    section = "\n".join(lines) + "\n"
    print(section)
    replace_section(args.out, section)


if __name__ == "__main__":
    main()
