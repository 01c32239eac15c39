"""`python train.py` with the host's steps profiled on every rank: where a run's host time goes, DDP's included.

bench_train_speed's `HostProfile` (cProfile over the optimizer steps from `FINLORA_PROFILE_FROM`, default 100,
for `FINLORA_PROFILE_STEPS`, default 50) joins the run's callbacks and writes `FINLORA_PROFILE_DIR/rank<N>.txt`.
Lightning starts each further rank by running this script again, so every rank profiles itself.

    FINLORA_PROFILE_DIR=/tmp/prof python scripts/train_profiled.py trainer=ddp trainer.devices=4 ...
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from bench_train_speed import with_host_profile

import finlora.train

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    finlora.train.run_callbacks = with_host_profile(
        lambda: Path(os.environ["FINLORA_PROFILE_DIR"]) / f"rank{os.environ.get('LOCAL_RANK', '0')}.txt",
        int(os.environ.get("FINLORA_PROFILE_FROM", 100)), int(os.environ.get("FINLORA_PROFILE_STEPS", 50)))
    # train.py run as __main__ (Hydra finds conf/ beside it), with sys.argv[0] left as this script's path, which
    # Lightning runs again for the other ranks (runpy would point it at train.py)
    spec = importlib.util.spec_from_file_location("__main__", ROOT / "train.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
