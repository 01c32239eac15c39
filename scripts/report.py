"""Report on a finished sweep from the files its jobs wrote: `python scripts/report.py outputs/sweeps/<sweep>`.

Writes report.md (a table of every job, whether the jobs differ only in the swept keys, the rerun commands
of failed jobs) and PNG plots into the sweep folder (`finlora.run.report`). `--rerun-failed` first reruns
each job that did not finish (failed, killed, or never started because the sweep was stopped), one after
another, each in its own folder (where its last checkpoint resumes it), and exits 1 if one still failed or
is still under way: a job whose process still runs (it holds its folder's lock), and one that a live sweep has
yet to start, are left to it and named. A path that is not a sweep's folder exits 2 with one line.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from finlora.errors import DataError
from finlora.run.lock import describe
from finlora.run.report import load_sweep, print_table, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--rerun-failed", action="store_true",
                        help="run each job that did not finish again, one after another, in its own folder")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_dir)
    except DataError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    if not sweep.jobs:
        print(f"report: no job folders (with .hydra/overrides.yaml) in {shlex.quote(str(args.sweep_dir))}",
              file=sys.stderr)
        return 2
    if args.rerun_failed:
        for job in sweep.live:
            print(f"report: {job.dir.name} is not rerun: " + (f"still running ({describe(job.holder)})"
                  if job.status == "running" else "its sweep is still running and has yet to start it"),
                  file=sys.stderr)
        # Each rerun is a sweep of one job that ends with this sweep's table; statuses are read back after.
        for job in sweep.failed:
            subprocess.run(job.rerun_command(sweep.script))
        sweep = load_sweep(args.sweep_dir)
    path = write_report(sweep)
    print_table(sweep)
    print(f"wrote {path}")
    return 0 if not args.rerun_failed or not (sweep.failed or sweep.live) else 1


if __name__ == "__main__":
    sys.exit(main())
