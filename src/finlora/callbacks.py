"""Every Lightning callback of a training run, and `run_callbacks`, which puts them together.

Resuming exactly (`ReloadData`, `StepSeed`), saving and stopping on a signal (`SaveAndStop`), refusing
non-finite steps and clipping gradients (`NonFiniteGuard`), task scores and sample answers at validation
(`TaskScore`), which checkpoints are kept (`checkpoint_callbacks`), throughput, host-boundness and progress
(`ThroughputLogger`, `StepProfile`, `StepProgressBar`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from transformers import PreTrainedTokenizerBase

from finlora.batching import STATS_KEY, BatchStats
from finlora.checkpoints import LAST, RECORD, last_good
from finlora.config import CheckpointConfig, Compile, Config, EvalSettings, FourBitEval, NonFinitePolicy
from finlora.errors import Interrupted, NonFiniteLoss
from finlora.evaluate import generate, pick_rows
from finlora.loggers import LastStepLogs, ends_fit, log_predictions, logs_now
from finlora.metric_names import GRAD_NORM, PADDING_FRACTION, TOKENS_PER_S, VAL_SAMPLES, VAL_SKIPPED, val_score
from finlora.metrics import extract_answer, score
from finlora.outputs import write_jsonl
from finlora.prompts import build_prompt
from finlora.update import RecordedAdamW, measure_gradients

log = logging.getLogger(__name__)
SAMPLES_DIR = "samples"  # in the run folder: a few generated answers at each validation (`TaskScore.show`)


@dataclass
class RunCallbacks:
    """The callbacks of a run, in order; `train` reads the stopper, throughput, profile and the best checkpoint
    (`best`: None when none is kept) back after `fit`."""

    stopper: SaveAndStop
    throughput: ThroughputLogger
    profile: StepProfile
    best: ModelCheckpoint | None
    all: list[Callback]


def run_callbacks(cfg: Config, ckpt_dir: Path, val_rows: list[dict], tokenizer: PreTrainedTokenizerBase,
                  precision: str, record: dict) -> RunCallbacks:
    """In the order their hooks run: the profile first (its window must close before anything else reads
    the GPU at a step's end), the guard before the stopper (it reads its verdicts back before a save),
    `LastStepLogs` last (the others read `log_every_n_steps` as set)."""
    stopper = SaveAndStop(ckpt_dir / LAST, cfg.checkpoint.every_n_steps)
    # the batches of each shape that compile or record: cudagraphs records at its second call, capture at its first
    warm_up = max({Compile.eager: 0, Compile.inductor: 1, Compile.cudagraphs: 2}[cfg.trainer.compile],
                  int(cfg.trainer.capture))
    throughput = ThroughputLogger(warm_up)
    profile = StepProfile(throughput)
    during = cfg.eval.during_training
    scoring = ([TaskScore(cfg, val_rows, tokenizer, precision)]
               if (during.size or during.samples) and val_rows and cfg.task.test and cfg.trainer.strategy != "fsdp"
               else [])
    guard = NonFiniteGuard(cfg.trainer.on_nonfinite_loss, ckpt_dir / LAST, cfg.checkpoint.every_n_steps,
                           cfg.trainer.grad_clip)
    kept = checkpoint_callbacks(cfg.checkpoint, ckpt_dir, bool(val_rows))
    best = next((c for c in kept if c.monitor == cfg.checkpoint.monitor), None)
    return RunCallbacks(stopper, throughput, profile, best, [
        profile, ReloadData(), RunRecord(record), StepSeed(cfg.seed), guard, stopper, *scoring, *kept, throughput,
        StepProgressBar(), LastStepLogs()])


class TaskScore(Callback):
    """At every validation, greedy answers on a fixed sample of the held-out rows (`eval.during_training.size`,
    stratified by label), scored as the task's first test set is scored (its kind and labels), and logged
    as `val/<task>/<metric>`: what `checkpoint.monitor` can keep the best adapter by, and a sweep can
    optimize. The loss says how likely the right answer is; this says how often it is the one generated.

    The first `eval.during_training.samples` of those rows (in file order; with no scored sample, the first
    held-out rows, generated for this alone) are shown as text: prompt (evaluation's, `prompts.build_prompt`),
    target and answer, as a W&B table `val/samples` and in `samples/val_step<N>.jsonl` in the run folder."""

    def __init__(self, cfg: Config, val_rows: list[dict], tokenizer: PreTrainedTokenizerBase, precision: str) -> None:
        self.test_set, self.task = cfg.task.test[0], cfg.task.name
        during = cfg.eval.during_training
        sample = EvalSettings(limit=during.size, seed=cfg.seed)
        self.indices = (pick_rows(val_rows, self.test_set, sample) if during.size
                        else list(range(min(during.samples, len(val_rows)))))
        self.rows = [val_rows[i] for i in self.indices]
        self.scores, self.samples = bool(during.size), during.samples
        self.samples_dir = Path(cfg.output_dir) / SAMPLES_DIR
        self.tokenizer, self.precision, self.settings = tokenizer, precision, cfg.eval
        # A dense copy of a 4-bit base would be made, and its decode step compiled anew, at every validation (a
        # cost not measured against the kernels' time on such a sample): `auto` keeps bitsandbytes' kernels here.
        auto = cfg.eval.four_bit is FourBitEval.auto
        self.four_bit = FourBitEval.kernel if auto else cfg.eval.four_bit

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        answers = generate(pl_module.model, self.tokenizer, self.rows, self.test_set.max_new_tokens,
                           self.settings.batch_size, self.precision, f"val {self.task}",
                           static_cache=self.settings.static_cache, decode_compile=self.settings.decode_compile,
                           int8_cpu=self.settings.int8_cpu, four_bit=self.four_bit,
                           share_prefix=self.settings.share_prefix, prompt=self.settings.prompt)
        if self.scores:
            metrics = score(self.test_set.kind, answers, [str(r["target"]) for r in self.rows], self.test_set.labels)
            for name, value in metrics.items():
                if name not in VAL_SKIPPED:
                    pl_module.log(val_score(self.task, name), value, batch_size=len(self.rows))
        if self.samples and trainer.is_global_zero:
            self.show(trainer, answers[:self.samples])

    def show(self, trainer: L.Trainer, answers: list[str]) -> None:
        """The first rows' prompts, targets and answers, as a W&B table and a JSONL file named by the step."""
        labels = self.test_set.labels or None
        rows = [{"step": trainer.global_step, "index": i,
                 "prompt": build_prompt(r, self.settings.prompt, self.tokenizer), "target": str(r["target"]),
                 "generated": g, "predicted": extract_answer(self.test_set.kind, g, labels)}
                for i, r, g in zip(self.indices, self.rows, answers, strict=False)]
        write_jsonl(self.samples_dir / f"val_step{trainer.global_step:06d}.jsonl", rows)
        log_predictions(trainer.loggers, VAL_SAMPLES, rows)


class ReloadData(Callback):
    """On resume, makes the fit loop set its training data up again after the checkpoint is restored.

    Lightning hands a training loader its saved position only while setting the data up after the restore;
    `trainer.estimated_stepping_batches`, which the LR schedule needs in `configure_optimizers`, sets it up
    before the restore, and Lightning then keeps that loader and drops the position. `on_fit_start` runs
    after `configure_optimizers` and before the loops are restored.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            trainer.fit_loop._combined_loader = None


class RunRecord(Callback):
    """Puts the run's record (`checkpoints.run_record`: settings, training files, resumes) into every
    checkpoint, what a resume is compared with. On resume, the optimizer keeps this run's learning rates and
    weight decay and the schedule its curve, over the checkpoint's that Lightning restores: where a resume
    changed them (`resume_changes`), the change is what trains, as the record says."""

    def __init__(self, record: dict) -> None:
        self.record = record
        self.fresh: list[list[tuple[float, float]]] = []

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RECORD] = self.record

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # configured, not restored
        self.fresh = [[(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # restored
        if not trainer.ckpt_path:
            return
        for optimizer, fresh in zip(trainer.optimizers, self.fresh, strict=True):
            for group, (lr, decay) in zip(optimizer.param_groups, fresh, strict=True):
                group["initial_lr"], group["weight_decay"] = lr, decay
        for config in trainer.lr_scheduler_configs:  # LambdaLR, as `get_scheduler` makes them: lr = base × f(step)
            s = config.scheduler
            s.base_lrs = [g["initial_lr"] for g in s.optimizer.param_groups]
            s._last_lr = [base * f(s.last_epoch) for base, f in zip(s.base_lrs, s.lr_lambdas, strict=True)]
            for group, lr in zip(s.optimizer.param_groups, s._last_lr, strict=True):
                group["lr"] = lr


class StepSeed(Callback):
    """Reseed torch before every training batch from (seed, rank, batch index).

    Dropout's random numbers then depend on where the run is, not on what ran before, so a resumed run
    draws the same masks as an uninterrupted one. Saving the generator's state in the checkpoint would not
    be enough: validation and new loader iterators draw from it between the save and the next batch, and
    they run differently in a run that was resumed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # the generators this rank draws from, not `torch.manual_seed`: that seeds every device kind torch knows,
        # queueing a traceback for each one not started (about 1.3 ms of host time a step, measured on an H200)
        seed = hash((self.seed, trainer.global_rank, trainer.fit_loop.total_batch_idx)) % 2**63
        torch.default_generator.manual_seed(seed)
        if pl_module.device.type == "cuda":
            torch.cuda.default_generators[pl_module.device.index].manual_seed(seed)


class SaveAndStop(Callback):
    """Writes last.ckpt every `every_n_steps` optimizer steps and after the final one, and on SIGTERM
    (preemption) or Ctrl-C finishes the optimizer step under way, writes last.ckpt and stops.

    Saves happen only where an optimizer step has just ended, never inside a gradient-accumulation window
    whose gradients a checkpoint would not hold. The handlers are installed at train start, over
    Lightning's own SIGTERM handler (which would raise mid-validation without saving); Lightning puts the
    handlers from before `fit` back at teardown. A second Ctrl-C aborts at once.
    """

    def __init__(self, last: Path, every_n_steps: int) -> None:
        self.last = last
        self.every_n_steps = every_n_steps
        self.signum: int | None = None
        self.vote = StopVote()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            print(f"finlora: Ctrl-C again: aborted at once; {self.last} holds the last saved step", file=sys.stderr,
                  flush=True)
            os._exit(128 + signal.SIGINT)  # no cleanup: every file finlora writes is renamed into place whole
        self.signum = signum
        log.warning("%s: saving a checkpoint after this optimizer step, then stopping (Ctrl-C again aborts)",
                    signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        stop = self.vote(trainer, self.signum)
        if stop and self.signum is None:  # another rank was signalled: this one stops with it
            self.signum = stop
        final = ends_fit(trainer, trainer.global_step)
        if stop or final or trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.last, weights_only=False)  # optimizer and loops too
        if stop:  # out of the loop now: `should_stop` would still run validation and Lightning's end-of-fit messages
            raise self.interrupted(trainer.global_step)

    def interrupted(self, step: int) -> Interrupted | None:
        """The fault to end the run with if a signal stopped it (raised at the next optimizer-step boundary,
        or by `train` after `fit` when the signal came during the last validation)."""
        if self.signum is None:
            return None
        name = signal.Signals(self.signum).name
        return Interrupted(f"stopped by {name} after step {step}; {self.last} holds it: rerun in the same folder "
                           "(hydra.run.dir=<run folder>) or pass ckpt_path=last to continue", self.signum)


class StopVote:
    """The signal any rank got (the largest number, if several), known to every rank at the same optimizer
    step, without making the host wait for the GPU. (Lightning's `reduce_boolean_decision` copies a new tensor
    from host memory and meets the other ranks at a barrier: the host waited for the GPU at every step, 5-6 ms
    of a 13 ms captured step on 4 H200s.) Each step's votes are reduced over the ranks on their device and
    copied to pinned host memory, queued behind the step's work; the result is read one step later, when the
    GPU has long finished it (if it has not, the read waits for it, so every rank still decides at the same
    step). One process decides on its own signal at once."""

    def __init__(self) -> None:
        self.votes: torch.Tensor | None = None  # this step's signal number (0: none), the ranks' largest in place
        self.seen: torch.Tensor | None = None  # the result, on the host
        self.done: torch.cuda.Event | None = None  # when `seen` holds it (CUDA; the CPU copies at once)
        self.posted = False

    def __call__(self, trainer: L.Trainer, signum: int | None) -> int | None:
        if trainer.world_size == 1:
            return signum
        earlier = self._read() if self.posted else None
        if self.votes is None:
            device = trainer.strategy.root_device
            self.votes = torch.zeros(1, dtype=torch.int32, device=device)
            self.seen = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
            self.done = torch.cuda.Event() if device.type == "cuda" else None
        self.votes.fill_(signum or 0)
        torch.distributed.all_reduce(self.votes, op=torch.distributed.ReduceOp.MAX)
        self.seen.copy_(self.votes, non_blocking=True)
        if self.done is not None:
            self.done.record()
        self.posted = True
        return earlier

    def _read(self) -> int | None:
        if self.done is not None:
            self.done.synchronize()
        return int(self.seen[0]) or None


class NonFiniteGuard(Callback):
    """Keeps an optimizer step whose loss or gradients are not finite from the weights. The check runs before
    each optimizer step, after the loss and gradients are averaged over a whole accumulation window and over
    DDP ranks, so every rank decides alike.

    With fused AdamW (CUDA) the check never makes the host wait for the GPU: its verdict goes to the
    optimizer as the `found_inf` flag on which the fused kernel leaves weights, moments and step count as
    they were (what GradScaler uses it for), and it is read back only on logging steps, before checkpoints
    and at the end. `stop` then raises `NonFiniteLoss` naming the first such step; `skip` warns how many
    were skipped. Otherwise (the CPU) the verdict is read at each step, and `skip` drops the gradients.
    It logs the gradient norm as `train/grad_norm` and clips the gradients by it to at most `clip`
    (`trainer.grad_clip`; 0: not clipped), as `clip_grad_norm_` would, without computing the norm a second
    time (Lightning's own clipping, `gradient_clip_val`, refuses fused optimizers). Callbacks after it see the
    clipped gradients. `update.RecordedAdamW` (`trainer.capture`) measures and clips inside its own update,
    replayed from a CUDA graph: the guard then reads its verdict after the step.
    """

    def __init__(self, policy: NonFinitePolicy, last: Path, every_n_steps: int, clip: float = 0.0) -> None:
        self.policy = policy
        self.clip = clip
        self.last = last
        self.every_n_steps = every_n_steps
        self.loss: torch.Tensor | None = None
        self.skipped = 0
        self.pending: dict[str, torch.Tensor] | None = None  # on the device: count, first step, its loss and norm

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, RecordedAdamW):  # it measures and clips inside its update: read after the step
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss = self.loss if self.loss is not None else torch.zeros((), device=pl_module.device)
        norm, bad = measure_gradients(params, loss, self.clip)
        if logs_now(trainer):
            pl_module.log(GRAD_NORM, norm, on_step=True, batch_size=1)
        step = trainer.global_step + 1
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.float()
            self._record(bad, step, loss, norm)
            return
        if not bool(bad):
            return
        what = f"loss {loss.item()}" if not torch.isfinite(loss) else f"gradient norm {norm.item()}"
        if self.policy is NonFinitePolicy.skip:
            self.skipped += 1
            log.warning("step %d: %s; skipped this optimizer step (%d so far)", step, what, self.skipped)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        raise self._fault(step, what)

    def _record(self, bad: torch.Tensor, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        if self.pending is None:
            self.pending = {"count": torch.zeros((), dtype=torch.long, device=bad.device),
                            "step": torch.zeros((), dtype=torch.long, device=bad.device),
                            "loss": torch.zeros((), device=bad.device), "norm": torch.zeros((), device=bad.device)}
        first = bad & (self.pending["count"] == 0)
        for key, value in (("step", step), ("loss", loss.float()), ("norm", norm.float())):
            self.pending[key] = torch.where(first, value, self.pending[key])
        self.pending["count"] += bad

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        for optimizer in trainer.optimizers:  # one that measured its own update, just now
            if isinstance(optimizer, RecordedAdamW) and optimizer.measured is not None:
                loss, norm, bad = optimizer.measured
                if logs_now(trainer):  # a copy: the next replay overwrites the update's outputs before Lightning reads
                    pl_module.log(GRAD_NORM, norm.clone(), on_step=True, batch_size=1)
                self._record(bad, step, loss, norm)
        if step % trainer.log_every_n_steps == 0 or step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.check()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def check(self) -> None:
        """Read the fused path's verdicts back (one wait for the GPU): raise or warn about new ones."""
        if self.pending is None or (count := int(self.pending["count"])) == self.skipped:
            return
        step, loss, norm = int(self.pending["step"]), float(self.pending["loss"]), float(self.pending["norm"])
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        if self.policy is NonFinitePolicy.skip:
            log.warning("%d optimizer steps skipped so far (the first at step %d: %s)", count, step, what)
            self.skipped = count
            return
        raise self._fault(step, what)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """No checkpoint from weights that are not finite: an update can overflow (a huge trainer.lr) at a step
        whose loss and gradients were finite. One wait for the GPU per save, which copies to the host anyway."""
        params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        finite = torch.stack([torch.isfinite(p).all() for _, p in params]).tolist()
        if not all(finite):
            bad = [n for (n, _), ok in zip(params, finite, strict=True) if not ok]
            raise NonFiniteLoss(f"after step {trainer.global_step} the trainable weights are not finite ({len(bad)} "
                                f"of {len(params)} tensors, e.g. {bad[0]}): the update overflowed, and no checkpoint "
                                f"was written from them. {self._then()}")

    def _fault(self, step: int, what: str) -> NonFiniteLoss:
        return NonFiniteLoss(f"step {step}: {what}; stopped before it reached the weights. {self._then()}; or set "
                             "trainer.on_nonfinite_loss=skip to drop such steps")

    def _then(self) -> str:
        """Where to continue from: the newest checkpoint with finite weights, if any."""
        good = last_good(self.last.parent) if self.last.parent.is_dir() else None
        if good is None:
            return ("No checkpoint was saved yet, so nothing to resume: lower trainer.lr or raise "
                    "trainer.warmup_steps and start the run again")
        resume = "ckpt_path=last" if good == self.last else f"ckpt_path={good}"
        return (f"Last good checkpoint: {good}. Lower trainer.lr or raise trainer.warmup_steps, then resume with "
                f"{resume} resume_changes=[trainer.lr] (or trainer.warmup_steps)")


def checkpoint_callbacks(cfg: CheckpointConfig, ckpt_dir: Path, has_val: bool) -> list[Callback]:
    """Step checkpoints kept `keep_last` deep and the `keep_best` best by `monitor`; last.ckpt itself is
    written by `SaveAndStop`, at the optimizer-step boundaries where a resume is exact."""
    callbacks: list[Callback] = []
    if cfg.keep_last:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", monitor="step", mode="max",
                                         save_top_k=cfg.keep_last, every_n_train_steps=cfg.every_n_steps,
                                         auto_insert_metric_name=False))
    if cfg.keep_best and has_val:
        name = f"best-step{{step:06d}}-{cfg.monitor.rsplit('/', 1)[-1]}{{{cfg.monitor}:.4f}}"  # -loss0.1234
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename=name,
                                         monitor=cfg.monitor, mode=cfg.mode, save_top_k=cfg.keep_best,
                                         auto_insert_metric_name=False))
    return callbacks


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
        if (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % trainer.log_every_n_steps == 0:
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
