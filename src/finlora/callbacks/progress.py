"""How fast a fit goes and where it is: throughput (`ThroughputLogger`), whether the step is bound by the host and
how often it waits for the GPU (`StepProfile`), one progress bar over the run's steps (`StepProgressBar`)."""

from __future__ import annotations

import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

from finlora.batching import STATS_KEY, BatchStats
from finlora.compat.lightning import steps_taken
from finlora.loggers import logs_now
from finlora.metric_names import PADDING_FRACTION, TOKENS_PER_S


class ThroughputLogger(L.Callback):
    """Logs `train/padding_fraction` of the batch and `train/tokens_per_s`, the useful (non-padding) tokens
    per second over the last `log_every_n_steps` batches, at the batches whose logs are written (`logs_now`).

    Rates are host time between the ends of training batches: they include data loading and add no GPU
    synchronization. The host can run ahead of the GPU by about one step, which a window of several
    steps averages out. Validation time and the first batch (start-up) are left out, and so, for a
    compiled step, are the first `warm_up` batches of each batch shape: where compiling and recording CUDA
    graphs happen, whose time is reported apart (`compile_s`).
    """

    def __init__(self, warm_up: int = 0) -> None:
        self.tokens = self.slots = self.timed_tokens = 0
        self.seconds = self.compile_s = 0.0
        self.warm_up = warm_up
        self.shapes: dict[tuple, int] = {}
        self._last: float | None = None
        self._window: deque[tuple[int, float]] = deque()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window = deque(maxlen=trainer.log_every_n_steps)

    def warming_up(self, batch: Any) -> bool:
        """Whether this batch is among the first `warm_up` of its shape (before this logger has counted it)."""
        return isinstance(batch, dict) and self.shapes.get(tuple(batch["input_ids"].shape), 0) < self.warm_up

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._last is None and self.warming_up(batch):  # the first step compiles: time it from its start
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats: BatchStats | None = batch.get(STATS_KEY) if isinstance(batch, dict) else None
        if stats is None:
            return
        now = time.perf_counter()
        self.tokens += stats.tokens
        self.slots += stats.slots
        warming = self.warming_up(batch)
        shape = tuple(batch["input_ids"].shape)
        self.shapes[shape] = self.shapes.get(shape, 0) + 1
        logs = logs_now(trainer)
        if logs:
            pl_module.log(PADDING_FRACTION, 1 - stats.tokens / stats.slots, on_step=True, batch_size=1)
        if self._last is not None and warming:
            self.compile_s += now - self._last
        elif self._last is not None:
            self.seconds += now - self._last
            self.timed_tokens += stats.tokens
            self._window.append((stats.tokens, now - self._last))
            if logs:
                rate = sum(t for t, _ in self._window) / sum(s for _, s in self._window)
                pl_module.log(TOKENS_PER_S, rate, on_step=True, batch_size=1)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def summary(self) -> dict[str, Any]:
        """The run's padding fraction, useful tokens/s, batch shapes and compile time, for metrics.json."""
        return {"padding_fraction": 1 - self.tokens / self.slots if self.slots else None,
                "tokens_per_s": self.timed_tokens / self.seconds if self.seconds else None,
                "batch_shapes": len(self.shapes), "compile_s": round(self.compile_s, 1) if self.warm_up else None}


class StepProfile(L.Callback):
    """On a GPU, whether the training step is bound by the host, and how often it waits for the GPU.

    Every `log_every_n_steps`-th step (where logging waits for the GPU anyway) the GPU is waited for
    before the step, and the host's part of the step (until its Python returns) is timed against the
    whole step (until the GPU is done): when the host's part is most of it, the GPU sat waiting for
    launches. Every other step runs under `torch.cuda.set_sync_debug_mode("warn")`, which warns at each
    operation that makes the host wait for the GPU; those are counted (`host_syncs_per_step`) and where
    they came from kept (`sync_sites`), leaving out the steps where a new shape compiles (`warm`). Other
    warnings of those steps are passed on.
    """

    HOST_BOUND = 0.8  # the host's share of a step above which the step is bound by the host

    def __init__(self, warm: ThroughputLogger) -> None:
        self.warm = warm
        self.probes: list[tuple[float, float]] = []  # (host s, step s)
        self.syncs = self.counted_steps = 0
        self.sites: dict[str, int] = {}
        self._t0: float | None = None
        self._catcher: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if pl_module.device.type != "cuda":
            return
        if (steps_taken(trainer) + 1) % trainer.log_every_n_steps == 0:
            torch.cuda.synchronize()
            self._t0 = time.perf_counter()
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is not None:
            host = time.perf_counter() - self._t0
            torch.cuda.synchronize()
            self.probes.append((host, time.perf_counter() - self._t0))
            self._t0 = None
        elif self._catcher is not None:
            warming = self.warm.warming_up(batch)
            self.counted_steps += not warming
            self._close(count=not warming)

    def _close(self, count: bool = True) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._catcher.__exit__(None, None, None)
        self._catcher = None
        for w in self._records:
            if "synchroniz" in str(w.message):
                if not count:
                    continue
                self.syncs += 1
                site = f"{Path(w.filename).name}:{w.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._catcher is not None:
            self._close()

    def summary(self) -> dict[str, Any]:
        """Step and host ms (medians, leaving the first probe out: compilation), host-bound verdict, syncs."""
        probes = sorted(self.probes[1:] or self.probes, key=lambda p: p[1])
        if not probes:
            return {}
        host, step = probes[len(probes) // 2]
        top = sorted(self.sites.items(), key=lambda kv: -kv[1])[:3]
        return {"step_ms": round(1000 * step, 2), "step_host_ms": round(1000 * host, 2),
                "host_bound": host / step > self.HOST_BOUND,
                "host_syncs_per_step": round(self.syncs / self.counted_steps, 2) if self.counted_steps else None,
                "sync_sites": [f"{site} ×{n}" for site, n in top]}


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps (`trainer.max_steps`, or all its epochs' steps), not over an
    epoch's batches, so its time left is the run's; moved at every step (tqdm redraws at most ten times a
    second). The loss beside it is read only at the steps whose logs are written (`logs_now`): reading it
    copies it from the GPU, which waits for the step."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar = self.init_train_tqdm()
        bar.reset(total=convert_inf(trainer.estimated_stepping_batches))
        bar.initial = bar.n = trainer.global_step  # a resumed run: its rate and time left count this run's steps
        bar.unit = "step"

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if logs_now(trainer):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        if trainer.global_step > bar.n:
            bar.update(trainer.global_step - bar.n)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # one bar for the whole run: closed at its end

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the CSV logger's folder name, csv: nothing to read
        return metrics
