"""`train(cfg)`: config → data → base model + adapter → Lightning fit → adapter (the last weights, and the best
checkpoint's as `adapter_best/`), metrics and summary, and the test stage.

Everything that can be checked cheaply (config values, device and precision, data files and their
encoded lengths, the checkpoint to resume, the adapter's target modules) is checked before the model is
loaded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from finlora.adapters import BASE_FILE, count_parameters, trainable_breakdown
from finlora.build import build_model, build_tokenizer, check_base, placement
from finlora.callbacks import run_callbacks
from finlora.capture import CapturedLoss
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
from finlora.config import AdapterMethod, Compile, Config, TrainerConfig, validate
from finlora.data import TaskDataModule, load_task
from finlora.devices import device_type
from finlora.errors import Interrupted, NonFiniteLoss, OutOfMemory
from finlora.evaluate import evaluate_sets, print_metrics
from finlora.extensions import build_callbacks, trainer_kwargs
from finlora.loggers import build_loggers, finish, log_adapter, log_summary
from finlora.metric_names import TRAIN_LOSS, VAL_LOSS
from finlora.models import base_identity, resolve_source
from finlora.module import FinetuneModule
from finlora.outputs import atomic_dir, write_json
from finlora.plan import plan_step
from finlora.strategies import full_state, lightning_strategy

log = logging.getLogger(__name__)


def train(dict_cfg: DictConfig) -> dict:
    """Fine-tune as the config says; return the run's summary metrics (what a sweeper optimizes)."""
    started = time.time()
    cfg = validate(dict_cfg)
    task_data = load_task(cfg.task, cfg.data, cfg.paths.data_dir)
    for warning in cfg.trainer.schedule_warnings(len(task_data.train)):
        log.warning(warning)
    step_plan = plan_step(cfg, device_type(cfg.trainer.accelerator), len(task_data.train))
    where = placement(cfg)
    check_base(cfg, where)
    run_dir = Path(cfg.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = resume_path(cfg.ckpt_path, ckpt_dir)
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    record = run_record(config, fingerprints(cfg.task, cfg.paths.data_dir), [])
    if ckpt_path:  # refused if settings or training files changed, unless resume_changes allows each
        record["resumes"] = resumes(ckpt_path, record, cfg.resume_changes)
    tokenizer = build_tokenizer(cfg)
    datamodule = TaskDataModule(task_data, tokenizer, cfg.data, cfg.trainer.batch_size, cfg.seed,
                                cfg.trainer.num_workers, pin_memory=where.device.type == "cuda")
    if rank_zero_only.rank == 0:  # a DDP rank > 0 re-runs this command, in the same folder
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.compile is not Compile.eager:  # compiled kernels kept for later runs and a sweep's other jobs
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.paths.compile_cache).resolve()))

    model = build_model(cfg, where)
    trainable, total = count_parameters(model)
    breakdown = trainable_breakdown(model)

    config["params"] = {"trainable": trainable, "total": total,
                        "per_matrix": [asdict(g) | {"total": g.total} for g in breakdown]}
    loggers = build_loggers(cfg.logger, run_dir, cfg.run_name, config)
    if ckpt_path:
        keep_earlier_rows(loggers, ckpt_path)
    callbacks = run_callbacks(cfg, ckpt_dir, task_data.val, tokenizer, where.precision, record)
    extra = build_callbacks(cfg.callbacks)
    try:
        t = cfg.trainer
        trainer = L.Trainer(
            accelerator=where.accelerator, devices=t.devices, strategy=lightning_strategy(t.strategy, model),
            precision=where.precision,
            max_steps=t.max_steps, max_epochs=t.max_epochs, accumulate_grad_batches=t.grad_accum,
            val_check_interval=t.val_every_n_steps,
            check_val_every_n_epoch=None if t.val_every_n_steps else 1, log_every_n_steps=t.log_every_n_steps,
            logger=loggers, default_root_dir=run_dir, plugins=[AtomicCheckpointIO()],
            callbacks=[*callbacks.all, *lr_monitor(extra), *extra],
            **trainer_kwargs(t.extra))
        module = FinetuneModule(model, t, cfg.adapter.magnitude_lr_scale)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except torch.OutOfMemoryError as err:
            raise oom_advice(cfg, "training") from err
        if fault := callbacks.stopper.interrupted(trainer.global_step):
            raise fault
        check_finite(model, trainer.global_step)

        full_finetune = cfg.adapter.method is AdapterMethod.none
        adapter_dir = run_dir / ("model" if full_finetune else "adapter")
        gathered = full_state(trainer)  # FSDP: every rank takes part in gathering the shards
        # the base and its quantization, beside the adapter: eval.py, predict.py and export.py load it so
        base = base_identity(resolve_source(cfg.model, cfg.paths.cache_dir), cfg.model) | {"quant": config["quant"]}
        best: dict = {}
        if trainer.is_global_zero:
            save_adapter(model, tokenizer, adapter_dir, base, full_finetune, ckpt_dir / LAST, gathered)
            best = export_best(callbacks.best, model, tokenizer, adapter_dir, base, full_finetune, t.strategy)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        summary = {
            "run_name": cfg.run_name, "adapter_dir": str(adapter_dir), "steps": trainer.global_step, **best,
            "final_train_loss": metrics.get(TRAIN_LOSS), "final_val_loss": metrics.get(VAL_LOSS),
            "trainable_params": trainable, "total_params": total,
            "train_examples": len(datamodule.train_set), "distinct_train_examples": datamodule.train_set.num_distinct,
            "truncated_train_examples": datamodule.train_set.num_truncated,
            "val_examples": len(datamodule.val_set), "wall_time_s": round(time.time() - started, 1),
            "batching": cfg.data.batching.value, **callbacks.throughput.summary(),
            "step_path": step_plan.path, "step_path_reason": step_plan.reason,
            "compile": cfg.trainer.compile.value, **compile_report(cfg.trainer, module.train_loss),
            **callbacks.profile.summary(),
            "train_prompt": cfg.task.prompt(cfg.task.train, cfg.data.train_prompt),
            "eval_prompt": cfg.task.prompt(cfg.task.test, cfg.eval.prompt),  # the raw context unless eval.prompt
            "device": str(where.device), "precision": where.precision,
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated(where.device) / 2**30, 2)
            if where.device.type == "cuda" else None,
            "objective": metrics.get(cfg.sweep.metric), "objective_metric": cfg.sweep.metric,  # what a sweeper gets
            "resumes": record["resumes"],  # each resume that changed settings or training files: step, old → new
        }
        if ckpt_path and "train/loss" not in metrics:  # resumed after its last step: this attempt trained nothing
            summary = keep_earlier_training(summary, run_dir / "metrics.json")
        if trainer.is_global_zero:
            write_json(run_dir / "metrics.json", summary)  # on disk before the (long) test stage starts
            write_cards(adapter_dir, cfg, base, summary)
            test_metrics = {}
            if cfg.eval.enabled and task_data.test and t.strategy == "fsdp":
                log.warning("no test stage under FSDP (the model is sharded over the GPUs, generation runs on one): "
                            "score the adapter with `python eval.py adapter_path=%s`", adapter_dir)
            elif cfg.eval.enabled and task_data.test:
                try:
                    with stop_on_signal(f"while scoring the test sets; training finished and {adapter_dir} is "
                                        f"saved: score it with `python eval.py adapter_path={adapter_dir}`, or rerun "
                                        "in the same folder"):
                        test_metrics = evaluate_sets(model, tokenizer, task_data.test, cfg.eval, where.precision,
                                                     cfg.quant.bits, run_dir / "eval", loggers)
                except torch.OutOfMemoryError as err:
                    raise oom_advice(cfg, "eval") from err
                objective = test_metrics.get(cfg.sweep.metric, summary["objective"])
                summary.update(test_metrics, objective=objective, wall_time_s=round(time.time() - started, 1),
                               tested=summary.get("best_adapter_dir", str(adapter_dir)))
                write_json(run_dir / "metrics.json", summary)
                write_cards(adapter_dir, cfg, base, summary)
            if summary["objective"] is None and cfg.sweep.objective:
                log.warning("sweep.objective=%s was not logged by this run (a search's job would fail)",
                            cfg.sweep.objective)
            if not full_finetune:  # W&B copies an artifact's files: an adapter, not a whole model
                log_adapter(loggers, adapter_dir, f"adapter-{cfg.run_name}", base | {"summary": summary})
                if "best_adapter_dir" in summary:
                    log_adapter(loggers, Path(summary["best_adapter_dir"]), f"adapter-best-{cfg.run_name}",
                                base | {"summary": summary})
            log_summary(loggers, summary)
            print_summary(summary, breakdown)
            if test_metrics:
                print_metrics(test_metrics)
        return summary
    finally:
        finish(loggers)


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
                full_finetune: bool, strategy: str) -> dict:
    """The best checkpoint by `checkpoint.monitor` (Lightning's best-*.ckpt), written beside the last weights as
    `<adapter_dir>_best/`, and loaded into `model`, which the test stage then scores; the summary's entries for it
    (none when no checkpoint was kept: `checkpoint.keep_best=0`, or no validation ran). Under FSDP the model is
    sharded, so the best checkpoint stays a checkpoint (said once)."""
    if kept is None or not kept.best_model_path or not Path(kept.best_model_path).is_file():
        return {}
    if strategy == "fsdp":
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
    untested = {k: v for k, v in summary.items() if not k.startswith("test/")}
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


def keep_earlier_training(summary: dict, earlier_file: Path) -> dict:
    """A run resumed after its last optimizer step (one cut while its test sets were scored) trains nothing, so
    its losses, throughput and step profile would be empty: they are taken from the attempt that trained, whose
    metrics.json was written before its test stage. What this attempt measured is kept; test metrics are not
    carried (this attempt scores anew). `training_from_earlier_attempt` says so."""
    if not earlier_file.is_file():
        return summary
    earlier = json.loads(earlier_file.read_text())
    if earlier.get("steps") != summary["steps"]:
        return summary
    kept = {k: v for k, v in earlier.items() if not k.startswith("test/") and summary.get(k) in (None, 0, [], {})
            and v not in (None, 0, [], {})}
    return summary | kept | {"training_from_earlier_attempt": True}


def compile_report(t: TrainerConfig, loss: Callable) -> dict:
    """What torch.compile did with the step: by regions or not, graph breaks (each one a return to Python
    mid-step) and, for cudagraphs, whether every graph was captured (inductor skips capture it cannot do
    safely, e.g. CPU ops); for `trainer.capture`, whether the step was recorded (`loss`, the module's
    `CapturedLoss`) and, if not, why."""
    report: dict = {}
    if isinstance(loss, CapturedLoss):
        report = {"capture": True, "cudagraphs_captured": loss.failure is None and loss.shapes > 0,
                  "capture_failure": loss.failure}
    if t.compile is Compile.eager:
        return report
    from torch._dynamo.utils import counters

    report |= {"compile_regions": t.compile_regions, "graph_breaks": sum(counters["graph_break"].values())}
    if t.compile is Compile.cudagraphs:
        report["cudagraphs_captured"] = counters["inductor"]["cudagraph_skips"] == 0
    return report


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
        if cfg.quant.bits != 4 and cfg.adapter.method.value != "none":
            tips.append("quant=4bit")
    return OutOfMemory(f"out of GPU memory during {stage}; try " + ", or ".join(tips)
                       + ("; then ckpt_path=last continues from the last checkpoint" if stage == "training" else ""))


def print_summary(summary: dict, breakdown: list) -> None:
    console = Console()
    params = Table(title="trainable parameters per adapted matrix")
    for col in ("module", "matrices", "d_out × d_in", "LoRA r·(d_in+d_out)", "magnitude d_out", "total"):
        params.add_column(col, justify="right")
    for g in breakdown:
        params.add_row(g.module, str(g.matrices), f"{g.shape[0]} × {g.shape[1]}", f"{g.lora:,}", f"{g.magnitude:,}",
                       f"{g.total:,}")
    if breakdown:
        console.print(params)
    table = Table(title=f"run {summary['run_name']}", show_header=False)
    pct = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
    rows = [("trainable parameters", f"{summary['trainable_params']:,} of {summary['total_params']:,} ({pct:.3f}%)"),
            ("optimizer steps", str(summary["steps"])),
            ("final train loss", _fmt(summary["final_train_loss"])),
            ("final val loss", _fmt(summary["final_val_loss"])),
            ("train examples (truncated)", f"{summary['train_examples']:,} ({summary['truncated_train_examples']})"),
            ("wall time", f"{summary['wall_time_s']:.0f} s on {summary['device']} ({summary['precision']})"),
            ("useful tokens/s (padding)", f"{_fmt(summary['tokens_per_s'], ',.0f')} "
             f"({_fmt(summary['padding_fraction'], '.1%')} of the tokens, {summary['batching']} batches)"),
            ("training step", f"{summary['step_path']}: {summary['step_path_reason']}"),
            *_step_rows(summary),
            ("adapter (last weights)", summary["adapter_dir"]),
            *([("best adapter", f"{summary['best_adapter_dir']} (step {summary['best_step']}, {summary['best_monitor']}"
                f" {summary['best_value']:.4f})")] if "best_adapter_dir" in summary else []),
            *([("test stage scored", summary["tested"])] if "tested" in summary else [])]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _step_rows(summary: dict) -> list[tuple[str, str]]:
    """The step's compilation, its host/GPU split and what to do when the host sets the pace."""
    rows = []
    captured = {True: ", CUDA graphs captured", False: ", CUDA graphs NOT captured (eager parts remain)"}.get(
        summary.get("cudagraphs_captured"), "")
    if summary["compile"] != "eager":
        form = "by decoder-layer regions" if summary.get("compile_regions") else "whole model"
        rows.append(("compiled step", f"{summary['compile']} ({form}): {summary['compile_s']:.1f} s compiling "
                     f"{summary['batch_shapes']} batch shapes, {summary['graph_breaks']} graph breaks{captured}"))
    elif summary.get("capture"):
        rows.append(("recorded step", f"{summary['compile_s']:.1f} s recording {summary['batch_shapes']} batch "
                     f"shapes{captured}" + (f": {summary['capture_failure']}" if summary["capture_failure"] else "")))
    if "step_ms" in summary:
        share = summary["step_host_ms"] / summary["step_ms"]
        verdict = ("bound by the host: try trainer.capture=true data.batching=static, or a larger "
                   "trainer.batch_size" if summary["host_bound"] else "bound by the GPU")
        rows.append(("step time (host part)", f"{summary['step_ms']:.1f} ms ({share:.0%}): {verdict}"))
        rows.append(("host waits for the GPU", f"{summary['host_syncs_per_step']} times a step outside logging steps"
                     + (f" ({', '.join(summary['sync_sites'])})" if summary["sync_sites"] else "")))
    return rows


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)
