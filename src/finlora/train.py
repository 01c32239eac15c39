"""`train(cfg)`: config → data → base model + adapter → Lightning fit → adapter (the last weights, and the best
checkpoint's as `adapter_best/`), metrics and summary, and the test stage; one function a stage, in that order.

Everything that can be checked cheaply (config values, device and precision, data files and their
encoded lengths, the checkpoint to resume, the adapter's target modules) is checked before the model is
loaded. What the run does is decided once, on the validated config, by `finlora.plan.plan_run`; the stages follow
that plan. The summary is a `finlora.run.summary.RunSummary`, written as metrics.json.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from finlora.adapters import BASE_FILE, count_parameters, trainable_breakdown
from finlora.build import build_model, build_tokenizer, check_base, placement
from finlora.callbacks import RunCallbacks, run_callbacks
from finlora.card import set_base_name, write_card
from finlora.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    fingerprints,
    keep_earlier_rows,
    load_trained,
    resume_path,
    resumes,
    run_record,
)
from finlora.config import AdapterMethod, Config, validate
from finlora.data import TaskData, TaskDataModule, load_task
from finlora.devices import Placement, device_type
from finlora.errors import Interrupted, NonFiniteLoss, OutOfMemory
from finlora.evaluate import evaluate_sets, print_metrics
from finlora.extensions import build_callbacks, trainer_kwargs
from finlora.loggers import build_loggers, finish, log_adapter, log_summary
from finlora.metric_names import TEST_PREFIX, TRAIN_LOSS, VAL_LOSS
from finlora.models import base_identity, resolve_source
from finlora.module import FinetuneModule
from finlora.outputs import atomic_dir, write_json
from finlora.plan import RunPlan, plan_run
from finlora.run.summary import RunSummary, print_summary
from finlora.strategies import full_state, lightning_strategy

log = logging.getLogger(__name__)


def train(dict_cfg: DictConfig) -> dict:
    """Fine-tune as the config says; return the run's summary metrics (what a sweeper optimizes). The stages, in
    order: validate, plan and check before loading (`prepare`); base model and adapter (`build`); trainer and fit
    (`fit`); the adapters written (`save_outputs`); the summary (`summarize`); the test stage (`test_stage`); the
    summary logged and printed (`publish`)."""
    started = time.time()
    run = prepare(validate(dict_cfg))
    model, breakdown = build(run)
    loggers = build_loggers(run.cfg.logger, run.plan.run_dir, run.cfg.run_name, run.config)
    try:
        if run.ckpt_path:
            keep_earlier_rows(loggers, run.ckpt_path)
        trainer, module, callbacks = fit(run, model, loggers)
        base, best = save_outputs(run, model, trainer, callbacks)
        summary = summarize(run, trainer, module, callbacks, best, started)
        if not trainer.is_global_zero:
            return summary.to_dict()
        write_json(run.plan.run_dir / "metrics.json", summary.to_dict())  # on disk before the (long) test stage
        write_cards(run.plan.adapter_dir, run.cfg, base, summary.to_dict())
        test_metrics = test_stage(run, model, loggers, summary, base, started)
        publish(run, loggers, summary.to_dict(), base, breakdown, test_metrics)
        return summary.to_dict()
    finally:
        finish(loggers)


@dataclass
class Run:
    """A validated, planned run, checked before the model loads: what every later stage reads."""

    cfg: Config
    plan: RunPlan
    where: Placement
    task_data: TaskData
    ckpt_path: str | None  # the checkpoint this run resumes from, if any
    config: dict  # the resolved config as saved and logged (`params` added once the model is built)
    record: dict  # what each checkpoint carries, and a resume is checked against (`checkpoints.run_record`)
    tokenizer: PreTrainedTokenizerBase
    datamodule: TaskDataModule


def prepare(cfg: Config) -> Run:
    """Everything cheap, before the model loads: the data read and encoded, the run planned (`plan.plan_run`),
    device and precision, the base's shapes against the adapter, a resume's changes; the run folder and its
    config.yaml written; the seed set."""
    task_data = load_task(cfg.task, cfg.data, cfg.paths.data_dir)
    plan = plan_run(cfg, device_type(cfg.trainer.accelerator), len(task_data.train))
    where = placement(cfg)
    check_base(cfg, where)
    ckpt_path = resume_path(cfg.ckpt_path, plan.ckpt_dir)
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    record = run_record(config, fingerprints(cfg.task, cfg.paths.data_dir), [])
    if ckpt_path:  # refused if settings or training files changed, unless resume_changes allows each
        record["resumes"] = resumes(ckpt_path, record, cfg.resume_changes)
    tokenizer = build_tokenizer(cfg)
    datamodule = TaskDataModule(task_data, tokenizer, cfg.data, cfg.trainer.batch_size, cfg.seed,
                                cfg.trainer.num_workers, pin_memory=where.device.type == "cuda")
    if rank_zero_only.rank == 0:  # a DDP rank > 0 re-runs this command, in the same folder
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), plan.run_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True)
    if plan.compiled:  # compiled kernels kept for later runs and a sweep's other jobs
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.paths.compile_cache).resolve()))
    return Run(cfg, plan, where, task_data, ckpt_path, config, record, tokenizer, datamodule)


def build(run: Run) -> tuple[torch.nn.Module, list]:
    """The base model with its adapter, and its trainable parameters per adapted matrix (also added to the logged
    config as `params`)."""
    model = build_model(run.cfg, run.where)
    trainable, total = count_parameters(model)
    breakdown = trainable_breakdown(model)
    run.config["params"] = {"trainable": trainable, "total": total,
                            "per_matrix": [asdict(g) | {"total": g.total} for g in breakdown]}
    return model, breakdown


def fit(run: Run, model: torch.nn.Module, loggers: list) -> tuple[L.Trainer, FinetuneModule, RunCallbacks]:
    """The Lightning trainer, fitted; a stop by signal or a non-finite weight ends the run here."""
    cfg, t = run.cfg, run.cfg.trainer
    callbacks = run_callbacks(cfg, run.plan.ckpt_dir, run.task_data.val, run.tokenizer, run.where.precision,
                              run.record)
    extra = build_callbacks(cfg.callbacks)
    trainer = L.Trainer(
        accelerator=run.where.accelerator, devices=t.devices, strategy=lightning_strategy(t.strategy, model),
        precision=run.where.precision,
        max_steps=t.max_steps, max_epochs=t.max_epochs, accumulate_grad_batches=t.grad_accum,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1, log_every_n_steps=t.log_every_n_steps,
        logger=loggers, default_root_dir=run.plan.run_dir, plugins=[AtomicCheckpointIO()],
        callbacks=[*callbacks.all, *lr_monitor(extra), *extra],
        **trainer_kwargs(t.extra))
    module = FinetuneModule(model, t, cfg.adapter.magnitude_lr_scale)
    try:
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    except torch.OutOfMemoryError as err:
        raise oom_advice(cfg, "training") from err
    if fault := callbacks.stopper.interrupted(trainer.global_step):
        raise fault
    check_finite(model, trainer.global_step)
    return trainer, module, callbacks


def save_outputs(run: Run, model: torch.nn.Module, trainer: L.Trainer, callbacks: RunCallbacks) -> tuple[dict, dict]:
    """The last weights and the best checkpoint's, each with the base's identity beside it (what eval.py, predict.py
    and export.py load); returns that identity and the summary's entries for the best adapter."""
    plan = run.plan
    gathered = full_state(trainer)  # FSDP: every rank takes part in gathering the shards
    base = base_identity(resolve_source(run.cfg.model, run.cfg.paths.cache_dir), run.cfg.model) | {
        "quant": run.config["quant"]}
    best: dict = {}
    if trainer.is_global_zero:
        save_adapter(model, run.tokenizer, plan.adapter_dir, base, plan.full_finetune, plan.ckpt_dir / LAST, gathered)
        best = export_best(callbacks.best, model, run.tokenizer, plan.adapter_dir, base, plan.full_finetune,
                           plan.exports_best)
    return base, best


def summarize(run: Run, trainer: L.Trainer, module: FinetuneModule, callbacks: RunCallbacks, best: dict,
              started: float) -> RunSummary:
    """The run's summary after training; a run resumed after its last step takes its training's from the attempt
    that trained (`RunSummary.carry_training`)."""
    cfg, where, train_set = run.cfg, run.where, run.datamodule.train_set
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = RunSummary(
        run_name=cfg.run_name, adapter_dir=str(run.plan.adapter_dir), steps=trainer.global_step, best=best,
        final_train_loss=metrics.get(TRAIN_LOSS), final_val_loss=metrics.get(VAL_LOSS),
        trainable_params=run.config["params"]["trainable"], total_params=run.config["params"]["total"],
        train_examples=len(train_set), distinct_train_examples=train_set.num_distinct,
        truncated_train_examples=train_set.num_truncated, val_examples=len(run.datamodule.val_set),
        wall_time_s=round(time.time() - started, 1), batching=cfg.data.batching.value,
        throughput=callbacks.throughput.summary(), step_path=run.plan.step.path,
        step_path_reason=run.plan.step.reason, compile=cfg.trainer.compile.value,
        compiled=module.runner.report(), profile=callbacks.profile.summary(),
        train_prompt=cfg.task.prompt(cfg.task.train, cfg.data.train_prompt),
        eval_prompt=cfg.task.prompt(cfg.task.test, cfg.eval.prompt),
        device=str(where.device), precision=where.precision,
        gpu_peak_gib=round(torch.cuda.max_memory_allocated(where.device) / 2**30, 2)
        if where.device.type == "cuda" else None,
        objective=metrics.get(cfg.sweep.metric), objective_metric=cfg.sweep.metric, resumes=run.record["resumes"])
    if run.ckpt_path and TRAIN_LOSS not in metrics:  # resumed after its last step: this attempt trained nothing
        summary.carry_training(run.plan.run_dir / "metrics.json")
    return summary


def test_stage(run: Run, model: torch.nn.Module, loggers: list, summary: RunSummary, base: dict,
               started: float) -> dict:
    """The task's test sets scored, as the plan says; the summary, metrics.json and the cards updated with the
    scores. Returns the scores ({} without a test stage)."""
    adapter_dir, cfg = run.plan.adapter_dir, run.cfg
    if run.plan.untested_why:
        log.warning("no test stage %s: score the adapter with `python eval.py adapter_path=%s`",
                    run.plan.untested_why, adapter_dir)
    if not run.plan.tests:
        return {}
    try:
        with stop_on_signal(f"while scoring the test sets; training finished and {adapter_dir} is saved: score it "
                            f"with `python eval.py adapter_path={adapter_dir}`, or rerun in the same folder"):
            scores = evaluate_sets(model, run.tokenizer, run.task_data.test, cfg.eval, run.where.precision,
                                   cfg.quant.bits, run.plan.run_dir / "eval", loggers)
    except torch.OutOfMemoryError as err:
        raise oom_advice(cfg, "eval") from err
    summary.add_tests(scores, cfg.sweep.metric, round(time.time() - started, 1),
                      summary.to_dict().get("best_adapter_dir", str(adapter_dir)))
    write_json(run.plan.run_dir / "metrics.json", summary.to_dict())
    write_cards(adapter_dir, cfg, base, summary.to_dict())
    return scores


def publish(run: Run, loggers: list, summary: dict, base: dict, breakdown: list, test_metrics: dict) -> None:
    """The summary to the loggers (with the adapters as artifacts) and to the terminal."""
    cfg = run.cfg
    if summary["objective"] is None and cfg.sweep.objective:
        log.warning("sweep.objective=%s was not logged by this run (a search's job would fail)", cfg.sweep.objective)
    if not run.plan.full_finetune:  # W&B copies an artifact's files: an adapter, not a whole model
        log_adapter(loggers, run.plan.adapter_dir, f"adapter-{cfg.run_name}", base | {"summary": summary})
        if "best_adapter_dir" in summary:
            log_adapter(loggers, Path(summary["best_adapter_dir"]), f"adapter-best-{cfg.run_name}",
                        base | {"summary": summary})
    log_summary(loggers, summary)
    print_summary(summary, breakdown)
    if test_metrics:
        print_metrics(test_metrics)


def save_adapter(model: torch.nn.Module, tokenizer, folder: Path, base: dict, full_finetune: bool, source: Path,
                 state: dict | None = None, record: dict | None = None) -> None:
    """The model's trained weights in peft format (the whole model for full fine-tuning), its tokenizer and its base's
    identity (`BASE_FILE`), written atomically into `folder`; `record` (the best checkpoint's) as `BEST_FILE`.
    `source`: the checkpoint that holds the same weights, named if a signal stops the write."""
    with stop_on_signal(f"while writing {folder}; it was not written (its partial copy is removed), and "
                        f"{source} holds the trained steps: rerun in the same folder to write it"), \
            atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / BASE_FILE, base)
        if record is not None:
            write_json(tmp / BEST_FILE, record)
        if not full_finetune:
            set_base_name(tmp, base["hub_id"])


BEST_FILE = "best_checkpoint.json"  # in adapter_best/: the step and monitored value it was kept for


def export_best(kept: ModelCheckpoint | None, model: torch.nn.Module, tokenizer, adapter_dir: Path, base: dict,
                full_finetune: bool, exports: bool = True) -> dict:
    """The best checkpoint by `checkpoint.monitor` (Lightning's best-*.ckpt), written beside the last weights as
    `<adapter_dir>_best/`, and loaded into `model`, which the test stage then scores; the summary's entries for it
    (none when no checkpoint was kept: `checkpoint.keep_best=0`, or no validation ran). Under FSDP the model is
    sharded (`exports` false: `RunPlan.exports_best`), so the best checkpoint stays a checkpoint (said once)."""
    if kept is None or not kept.best_model_path or not Path(kept.best_model_path).is_file():
        return {}
    if not exports:
        log.warning("FSDP: the best checkpoint %s is not exported as an adapter (the model is sharded)",
                    kept.best_model_path)
        return {}
    folder = adapter_dir.with_name(f"{adapter_dir.name}_best")
    step = load_trained(model, kept.best_model_path)
    record = {"step": step, "monitor": kept.monitor, "mode": kept.mode, "value": float(kept.best_model_score),
              "checkpoint": kept.best_model_path}
    save_adapter(model, tokenizer, folder, base, full_finetune, Path(kept.best_model_path), record=record)
    log.info("best checkpoint (%s=%.4f at step %d) written as %s; the test stage scores it", kept.monitor,
             record["value"], step, folder)
    return {"best_adapter_dir": str(folder), "best_step": step, "best_monitor": kept.monitor,
            "best_value": record["value"]}


def write_cards(adapter_dir: Path, cfg: Config, base: dict, summary: dict) -> None:
    """The model cards of the last adapter and of the best one, if any: each with its own step, and the test
    metrics on the card of the one the test stage scored."""
    best = summary.get("best_adapter_dir")
    if best is None:
        write_card(adapter_dir, cfg, base, summary)
        return
    untested = {k: v for k, v in summary.items() if not k.startswith(TEST_PREFIX)}
    write_card(adapter_dir, cfg, base, untested | {"scored_elsewhere": best})
    write_card(Path(best), cfg, base, summary | {"steps": summary["best_step"], "best_card": True})


@contextmanager
def stop_on_signal(what: str) -> Iterator[None]:
    """SIGTERM or Ctrl-C end the block at once as `Interrupted` (exit status 128 + the signal, one line saying
    `what`), not as a process killed with no word in its log or job record. For work after training, whose
    results are already saved whole."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name} {what}", signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def lr_monitor(callbacks: list) -> list[LearningRateMonitor]:
    """The learning rate logged at every logging step, unless the `callbacks` group brings a LearningRateMonitor
    of its own (`callbacks=lr_monitor`): two would log it twice a step."""
    return [] if any(isinstance(c, LearningRateMonitor) for c in callbacks) else [
        LearningRateMonitor(logging_interval="step")]


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Refuse to write an adapter whose trainable weights are not all finite."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLoss(f"after step {step}, {len(bad)} trainable tensors are not finite (e.g. {bad[0]}); "
                            "the adapter was not written")


def oom_advice(cfg: Config, stage: str) -> OutOfMemory:
    """An `OutOfMemory` naming the overrides that lower memory from where this run stands."""
    t = cfg.trainer
    if stage == "eval":
        size = cfg.eval.batch_size
        tips = [f"eval.batch_size={max(size // 2, 1) if isinstance(size, int) else 1}"]
    else:
        tips = [f"trainer.batch_size={t.batch_size // 2} trainer.grad_accum={t.grad_accum * 2} (same effective batch)"
                if t.batch_size > 1 else f"data.max_length={cfg.data.max_length // 2}"]
        if not t.gradient_checkpointing:
            tips.append("trainer.gradient_checkpointing=true")
        if cfg.quant.bits != 4 and cfg.adapter.method is not AdapterMethod.none:
            tips.append("quant=4bit")
    return OutOfMemory(f"out of GPU memory during {stage}; try " + ", or ".join(tips)
                       + ("; then ckpt_path=last continues from the last checkpoint" if stage == "training" else ""))
