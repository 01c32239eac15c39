"""Every error finlora raises on purpose, each with the exit status the entry point turns it into.

They stay exceptions through the library (tests and scripts catch them by type); only the entry point
(`finlora.run.entry`) prints their message, without a traceback, and exits with `exit_code`.
"""

from __future__ import annotations

import errno
import signal


class FinloraError(Exception):
    """An expected failure whose message says what was wrong and what to do."""

    exit_code = 1


class ConfigError(FinloraError, ValueError):
    """A config value is wrong; the message names every offending key."""

    exit_code = 2

    @classmethod
    def listing(cls, problems: list[str]) -> ConfigError:
        """One error for every problem found, each `key: what is wrong` on its own line."""
        return cls("invalid config:\n  " + "\n  ".join(problems))


class DataError(FinloraError, ValueError):
    """A data file is missing or malformed; the message names the file and line."""

    exit_code = 2


class FolderInUse(FinloraError):
    """Another live process writes into the run folder; the message names it (pid, host)."""

    exit_code = 2


class RunFault(FinloraError, RuntimeError):
    """Training stopped for a reason the message explains (a non-finite loss, GPU memory)."""

    exit_code = 3


class NonFiniteLoss(RunFault):
    pass


class OutOfMemory(RunFault):
    pass


class MissingObjective(RunFault):
    """A sweep job ended without the metric its sweeper optimizes (`sweep.objective`)."""


class Interrupted(RunFault):
    """Stopped by a signal after saving; the status is what a shell reports for a process ended by it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only"}


class CannotWrite(RunFault):
    """A file could not be written (a full disk, a read-only folder); what was written before stays whole."""

    @classmethod
    def of(cls, err: OSError, path: object = None, needed: int | None = None) -> CannotWrite | None:
        """The fault for an `OSError` that says the disk is full or read-only (None for any other): the path,
        at least how many bytes were needed where known, and what was kept."""
        if err.errno not in NO_ROOM:
            return None
        size = f" ({needed:,} bytes written when it failed)" if needed else ""
        return cls(f"cannot write {path or err.filename}: {NO_ROOM[err.errno]}{size}; every file written before is "
                   "kept whole (each is written under a temporary name and renamed into place once complete): free "
                   "space, or write elsewhere (hydra.run.dir=…, paths.cache_dir=…), and rerun")


def as_fault(err: BaseException) -> FinloraError | None:
    """The finlora error that explains `err` in one line: itself; Ctrl-C outside training (whose own handler
    saves and stops) as `Interrupted`; a full disk or read-only folder as `CannotWrite`. None for any other."""
    if isinstance(err, FinloraError):
        return err
    if isinstance(err, KeyboardInterrupt):
        return Interrupted("stopped by SIGINT (Ctrl-C) outside training: nothing was being saved, and every file "
                           "written before is whole", signal.SIGINT)
    if isinstance(err, OSError):
        return CannotWrite.of(err)
    return None
