"""One process at a time in a run folder: `RunLock` holds an exclusive `flock` on a file in the folder
(`.lock` for a run or a sweep job, `.sweep.lock` for a sweep's own folder), whose content names the holder
(pid, host, start) for the message that refuses a second process.

`flock` rather than a pid file checked with `os.kill(pid, 0)`: the kernel drops the lock when the process
ends, however it ends (SIGKILL or a crash included), so a killed run never leaves its folder locked; a pid
reused by another program is never taken for the run; and no guess is made about a pid on another host (on
NFS, Linux maps `flock` onto the server's locks). A lock file left by a killed run is held by nobody and
counts for nothing: the next run takes it over.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from finlora.errors import FolderInUse

LOCK_FILE = ".lock"  # a run's folder, or a sweep job's
SWEEP_LOCK_FILE = ".sweep.lock"  # a sweep's folder, held by the sweep's own process while it runs
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's, in its order


class RunLock:
    """An exclusive lock on `<folder>/<name>`, held by this process until `release` or its end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, folder: Path, name: str = LOCK_FILE) -> RunLock:
        """Lock `folder` (made if missing) for this process; `FolderInUse` names the live process that holds it."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = _read(fd)
                os.close(fd)
                raise FolderInUse(f"{folder} is in use by {describe(who)}: one process at a time writes into a "
                                  "folder. Wait for it to end (or stop it), or start in a new folder (leave "
                                  "hydra.run.dir or hydra.sweep.dir unset, or give another)") from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # not the file of a holder that removed it while we waited for it
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file, then drop the lock (in this order, so nobody locks a file about to go), and the
        folder if nothing else is in it (a run refused after the lock was taken)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


def hold(folder: Path, name: str = LOCK_FILE) -> None:
    """`RunLock.take` for the rest of this process (released at its exit). A process that Lightning started
    for another rank of the same run (it re-runs the command in the same folder) takes none."""
    if _rank() > 0:
        return
    atexit.register(RunLock.take(folder, name).release)


def holder(folder: Path, name: str = LOCK_FILE) -> dict[str, Any] | None:
    """The live process holding `folder`'s lock (its pid, host and start; {} if it has not said yet), or None
    when none does."""
    try:
        fd = os.open(folder / name, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    else:
        return None
    finally:
        os.close(fd)  # drops the probe's shared lock at once


def describe(who: dict[str, Any] | None) -> str:
    """`pid 123 on host gpu7, started 2024-05-01 12:00:00`, as far as the holder said."""
    if not who:
        return "another process (starting)"
    started = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(who["started"])) if "started" in who else ""
    return f"pid {who.get('pid')} on host {who.get('host')}{started}"


def _rank() -> int:
    """This process's rank as Lightning reads it (the first of RANK_VARIABLES set), 0 when none is."""
    for variable in RANK_VARIABLES:
        if os.environ.get(variable):
            return int(os.environ[variable])
    return 0


def _read(fd: int) -> dict[str, Any]:
    """What the holder wrote into its lock file, {} if it has not yet or it cannot be read."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
