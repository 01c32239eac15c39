"""Report on a finished sweep from the files its jobs wrote: `python scripts/report.py outputs/sweeps/<sweep>`.

Writes report.md (a table of every job, whether the jobs differ only in the swept keys, the rerun commands
of failed jobs) and PNG plots into the sweep folder; `--rerun-failed` reruns the failed jobs first.
All logic lives in `finlora.report`.
"""

import sys

from finlora.report import main

if __name__ == "__main__":
    sys.exit(main())
