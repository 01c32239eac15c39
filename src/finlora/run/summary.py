"""A training run's summary: `RunSummary`, what `metrics.json` in the run's folder holds, and its table at the end
of the run. `metrics.json` stays a flat JSON object (the model card, W&B's run summary, the sweep report and
`train()`'s return value read its keys); the summary is typed here and flattened once, by `to_dict`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.table import Table

from finlora import metric_names as names

EMPTY = (None, 0, [], {})  # what a resumed attempt that trained nothing reports for what it did not measure


@dataclass
class RunSummary:
    """One field a key of `metrics.json`, in its order; the dict fields (`SPREAD`) hold groups of keys that other
    parts of finlora report (the best checkpoint, throughput, compilation, the step profile, test scores), spread
    into the flat object where the field stands."""

    run_name: str
    adapter_dir: str  # the last weights (`model/` for full fine-tuning)
    steps: int  # optimizer steps, resumed ones included
    best: dict[str, Any]  # `train.export_best`: best_adapter_dir, best_step, best_monitor, best_value; {} if none
    final_train_loss: float | None
    final_val_loss: float | None
    trainable_params: int
    total_params: int
    train_examples: int
    distinct_train_examples: int
    truncated_train_examples: int
    val_examples: int
    wall_time_s: float
    batching: str
    throughput: dict[str, Any]  # `callbacks.ThroughputLogger.summary`
    step_path: str  # `plan.StepPlan`
    step_path_reason: str
    compile: str
    compiled: dict[str, Any]  # `fast_step.StepRunner.report`
    profile: dict[str, Any]  # `callbacks.StepProfile.summary`
    train_prompt: str
    eval_prompt: str  # the raw context unless eval.prompt
    device: str
    precision: str
    gpu_peak_gib: float | None  # None off CUDA
    objective: float | None  # what a sweeper gets: `objective_metric`'s value (a test score once tested)
    objective_metric: str
    resumes: list[dict[str, Any]]  # each resume that changed settings or training files: step, old → new
    carried: dict[str, Any] = field(default_factory=dict)  # keys only an earlier attempt measured (`carry_training`)
    tests: dict[str, float] = field(default_factory=dict)  # the test stage's scores (`metric_names.test_score`)
    tested: str | None = None  # the adapter the test stage scored; absent until it ran

    SPREAD: ClassVar[tuple[str, ...]] = ("best", "throughput", "compiled", "profile", "carried", "tests")

    def to_dict(self) -> dict[str, Any]:
        """The flat object written to `metrics.json`."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key in self.SPREAD:
                out |= value
            elif key != "tested" or value is not None:
                out[key] = value
        return out

    def add_tests(self, scores: dict[str, float], metric: str, wall_time_s: float, tested: str) -> None:
        """The test stage's scores; the objective becomes `metric`'s test score where the test stage logged it."""
        self.tests = scores
        self.objective = scores.get(metric, self.objective)
        self.wall_time_s = wall_time_s
        self.tested = tested

    def carry_training(self, earlier_file: Path) -> None:
        """A run resumed after its last optimizer step (one cut while its test sets were scored) trains nothing, so
        its losses, throughput and step profile would be empty: they are taken from the attempt that trained, whose
        metrics.json was written before its test stage. What this attempt measured is kept; test metrics are not
        carried (this attempt scores anew). `training_from_earlier_attempt` says so."""
        if not earlier_file.is_file():
            return
        earlier = json.loads(earlier_file.read_text())
        if earlier.get("steps") != self.steps:
            return
        now = self.to_dict()
        kept = {k: v for k, v in earlier.items() if not k.startswith(names.TEST_PREFIX) and now.get(k) in EMPTY
                and v is not None}  # a False or a 0 it measured is carried: `host_bound`, `host_syncs_per_step`
        plain = {f.name for f in fields(self)} - {*self.SPREAD, "tested"}  # `tested` is absent until set
        for key, value in kept.items():
            if key in plain:
                setattr(self, key, value)
            else:  # spread after the groups it came from, so it takes their key's place in `to_dict`
                self.carried[key] = value
        self.carried["training_from_earlier_attempt"] = True


def print_summary(summary: dict, breakdown: list) -> None:
    """The adapter's trainable parameters per adapted matrix, then the run's table."""
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
