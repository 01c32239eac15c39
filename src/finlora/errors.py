"""Every error finlora raises on purpose, each with the exit status the entry point turns it into.

They stay exceptions through the library (tests and scripts catch them by type); only the entry point
(`finlora.run.entry`) prints their message, without a traceback, and exits with `exit_code`.
"""

from __future__ import annotations


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
