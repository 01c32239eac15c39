"""Checkpoint files that a kill never corrupts, and which one a rerun continues from.

Lightning restores the adapter, optimizer, LR schedule and loop counters on its own. What it lacks:
writes that are atomic and loads that never run pickled code (`AtomicCheckpointIO`), which checkpoint a
rerun continues from (`resume_path`), and a CSV log that keeps its rows across a resume
(`keep_earlier_rows`). The place inside the epoch's data order is `data.ResumableLoader`'s; random
numbers that depend on the position in training, not on history, are `callbacks.StepSeed`'s.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from finlora.config import TaskConfig, flat
from finlora.errors import ConfigError
from finlora.outputs import atomic_file

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, fsynced and renamed into place (a kill mid-save leaves the
    previous file whole), and read with `weights_only=True` (a planted checkpoint cannot run code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_file(Path(path)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None,
                        ) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def resume_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """The checkpoint to continue from, checked to be readable before the model loads: `ckpt_path` as given;
    for `last`, or nothing given in a run folder that already has checkpoints (a rerun), its last.ckpt or
    else its newest checkpoint, skipping (and naming) damaged ones. Writes are atomic, so a damaged file
    came from elsewhere (a copy cut short, a full disk outside finlora); temporary files of a killed save are
    removed."""
    if ckpt_path not in (None, "last"):
        if problem := damage(Path(ckpt_path)):
            raise ConfigError(f"ckpt_path: {ckpt_path} cannot be read ({problem}); pass another checkpoint, or "
                              "leave ckpt_path out to start over")
        return ckpt_path
    for stale in ckpt_dir.glob(".*.tmp"):
        stale.unlink()
    found = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name == LAST, p.stat().st_mtime), reverse=True)
    damaged = []
    for path in found:
        if problem := damage(path):
            damaged.append(f"{path} ({problem})")
            continue
        if damaged:
            log.warning("skipping damaged checkpoints: %s", "; ".join(damaged))
        log.warning("resuming from %s", path)
        return str(path)
    if damaged:
        raise ConfigError(f"every checkpoint of this run folder is damaged: {'; '.join(damaged)}. Move them away "
                          "to start the run over, or pass ckpt_path=<a checkpoint file> to continue from another")
    if ckpt_path == "last":
        raise ConfigError(f"ckpt_path=last: no checkpoint in {ckpt_dir} (run in the folder of the run to resume: "
                          "hydra.run.dir=<its folder>)")
    return None


RECORD = "finlora"  # a checkpoint's key for the settings and training files it was trained on, and its resumes

# Keys a rerun may change without changing what is trained: where files go, how runs are logged, scored and
# saved, how fast the step runs.
FREE_SECTIONS = ("logger", "paths", "eval", "checkpoint", "sweep")
FREE = ("ckpt_path", "output_dir", "run_name", "resume_changes", "trainer.num_workers", "trainer.log_every_n_steps",
        "trainer.compile", "trainer.compile_regions", "trainer.capture", "adapter.impl", "model.trust_remote_code",
        "model.hub_id")
# What a checkpoint's trained parameters mean: resuming one under other values of these would load them into
# other shapes, or silently into other roles (LoRA weights into a DoRA run); no resume_changes allows them.
SHAPING = ("model.", "quant.", "adapter.method", "adapter.r", "adapter.target_modules")


def fingerprints(task: TaskConfig, data_dir: str) -> dict[str, str]:
    """The size and sha256 (its first 16 hex digits) of each training file, or of a saved datasets folder's files
    together, by its name in the task (`origin`); a hub data set by its revision (its files are the hub's)."""
    prints = {}
    for src in task.train:
        if src.source is not None and not src.source.local:
            prints[src.origin] = f"hub data set, revision {src.source.revision or 'latest'}"
            continue
        path = Path(data_dir) / src.file if src.file is not None else Path(src.source.path).expanduser()
        files, digest = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path], hashlib.sha256()
        for file in files:
            with file.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        size = sum(f.stat().st_size for f in files)
        prints[src.origin] = f"{size} bytes, sha256 {digest.hexdigest()[:16]}"
    return prints


def run_record(config: dict, data: dict[str, str], resumes: list[dict]) -> dict:
    """What a checkpoint carries under `RECORD`: this run's settings (flat), training files and resumes."""
    return {"config": flat(config), "data": data, "resumes": resumes}


def resumes(ckpt_path: str, record: dict, allowed: list[str]) -> list[dict]:
    """The checkpoint's resumes so far, plus this one if it changes settings or training files (`record`, as
    `run_record` makes it), each change named in `allowed` (`resume_changes`): `{step, changes: {key: [then,
    now]}}`. Any other change is refused before the model loads, naming every key and file that differs.
    A checkpoint from before records were kept is compared with its run folder's config.yaml, if any."""
    checkpoint = torch.load(ckpt_path, mmap=True, weights_only=True, map_location="cpu")
    step, saved = checkpoint["global_step"], checkpoint.get(RECORD)
    if saved is None:
        config_file = Path(ckpt_path).resolve().parent.parent / "config.yaml"
        config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else {}
        saved = {"config": flat(config) if config else record["config"], "data": {}, "resumes": []}
    then, now = saved["config"], record["config"]
    changes = {k: [then.get(k), now.get(k)] for k in sorted(then.keys() | now.keys())
               if then.get(k) != now.get(k) and k not in FREE and k.split(".")[0] not in FREE_SECTIONS}
    changes |= {name: [saved["data"][name], p] for name, p in record["data"].items()
                if saved["data"].get(name, p) != p}
    said = [f"{k}: changed since the checkpoint ({a} → {b})" if k in record["data"] else f"{k}: {a!r} → {b!r}"
            for k, (a, b) in changes.items()]
    shaping = [k for k in changes if k.startswith(SHAPING)]
    if shaping or set(changes) - set(allowed):
        how = (f"{', '.join(shaping)} change what its tensors are, so it cannot continue under them" if shaping
               else f"to continue it under these changes, recorded in metrics.json, add "
                    f"resume_changes=[{','.join(changes)}]")
        raise ConfigError(f"ckpt_path: {ckpt_path} (step {step}) was trained under other settings than this rerun, "
                          f"which would continue it:\n  " + "\n  ".join(said) + "\nTo start a new run, leave "
                          f"hydra.run.dir out (or name a new folder); {how}")
    if not changes:
        return saved["resumes"]
    log.warning("continuing at step %d under changed settings: %s", step, "; ".join(said))
    return [*saved["resumes"], {"step": step, "changes": changes}]


def last_good(ckpt_dir: Path) -> Path | None:
    """The checkpoint a rerun should continue from after a non-finite step: the newest (last.ckpt first) that
    is whole and whose trained tensors are all finite."""
    for path in sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name == LAST, p.stat().st_mtime), reverse=True):
        if damage(path) is None and all(torch.isfinite(t).all() for t in torch.load(
                path, mmap=True, weights_only=True, map_location="cpu")["state_dict"].values()):
            return path
    return None


def damage(path: Path) -> str | None:
    """Why a checkpoint file cannot be resumed from, or None; reads its index, not its tensors."""
    try:
        checkpoint = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # it holds more than tensors (code, maybe): a file to stop on, not one to skip
        raise ConfigError(f"{path} holds pickled Python objects, not only tensors (not a finlora checkpoint: written "
                          "by another tool, or planted); finlora never loads such files, as loading them could run "
                          "code. Move it away, or pass ckpt_path=<a checkpoint finlora wrote>") from None
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    missing = [k for k in ("state_dict", "global_step", "optimizer_states") if k not in checkpoint]
    return f"not a finlora checkpoint (no {', '.join(missing)})" if missing else None


def keep_earlier_rows(loggers: list[Logger], ckpt_path: str) -> None:
    """Lightning's CSV logger deletes metrics.csv when it starts; on resume, the rows logged before the
    checkpoint's step go back in first, so the file holds one curve and the resumed steps continue it."""
    step = torch.load(ckpt_path, mmap=True, weights_only=True, map_location="cpu")["global_step"]
    for lg in loggers:
        path = Path(lg.log_dir) / "metrics.csv" if isinstance(lg, CSVLogger) else None
        if path is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) < step]
            lg.experiment.metrics[:0] = rows
