"""Training throughput as a run goes: each batch's padding fraction and the useful tokens per second,
to every logger and into the end-of-run summary; and a progress bar that does not stall the GPU."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from finlora.batching import STATS_KEY, BatchStats


class ThroughputLogger(L.Callback):
    """Logs `train/padding_fraction` of each batch and `train/tokens_per_s`, the useful (non-padding)
    tokens per second over the last `log_every_n_steps` batches.

    Rates are host time between the ends of training batches: they include data loading and add no GPU
    synchronization. The host can run ahead of the GPU by about one step, which a window of several
    steps averages out. Validation time and the first batch (start-up) are left out.
    """

    def __init__(self) -> None:
        self.tokens = self.slots = self.timed_tokens = 0
        self.seconds = 0.0
        self._last: float | None = None
        self._window: deque[tuple[int, float]] = deque()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window = deque(maxlen=trainer.log_every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats: BatchStats | None = batch.get(STATS_KEY) if isinstance(batch, dict) else None
        if stats is None:
            return
        now = time.perf_counter()
        self.tokens += stats.tokens
        self.slots += stats.slots
        pl_module.log("train/padding_fraction", 1 - stats.tokens / stats.slots, on_step=True, batch_size=1)
        if self._last is not None:
            self.seconds += now - self._last
            self.timed_tokens += stats.tokens
            self._window.append((stats.tokens, now - self._last))
            rate = sum(t for t, _ in self._window) / sum(s for _, s in self._window)
            pl_module.log("train/tokens_per_s", rate, on_step=True, batch_size=1)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def summary(self) -> dict[str, float | None]:
        """The run's padding fraction and useful tokens/s, for metrics.json and the summary table."""
        return {"padding_fraction": 1 - self.tokens / self.slots if self.slots else None,
                "tokens_per_s": self.timed_tokens / self.seconds if self.seconds else None}


def progress_bar(refresh_every: int) -> TQDMProgressBar:
    """A bar that reads its metrics every `refresh_every` batches: reading the loss copies it from the GPU,
    which waits for the step; Lightning's default (rich) bar does that after every batch."""
    return TQDMProgressBar(refresh_rate=refresh_every)
