"""What a training run does, decided once from its validated config before anything loads: how its step runs (the
config's `auto` settings `trainer.capture`, `trainer.compile`, `data.batching` resolved for the device and the run),
where it writes, and which stages run after training (`RunPlan`). `finlora.train` follows the plan.

On a CUDA GPU a step is recorded as CUDA graphs on static batches (`finlora.capture`) wherever it can be; the
decoder layers are also compiled by Inductor (`trainer.compile_regions`) when the run is long enough for the compile
to pay for itself. On the CPU the step runs eager on packed batches. An explicit value is kept as given. What
cannot be recorded says so in one line and runs eager; the run's summary names the path and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finlora.config import AdapterMethod, Batching, Compile, Config

log = logging.getLogger(__name__)

# Steps from which compiling the decoder layers pays for itself on top of recording: its cost (a first job of the
# embedded shapes, cold cache) divided by what it saves a step; the figures are in docs/benchmarks.md.
REGIONS_MIN_STEPS = 3000


@dataclass(frozen=True)
class StepPlan:
    path: str  # eager | capture | capture+regions | compiled (an explicit trainer.compile without capture)
    reason: str


def _unrecordable(cfg: Config, device_type: str) -> str | None:
    """Why this run's step cannot be recorded as CUDA graphs, or None."""
    t = cfg.trainer
    if device_type != "cuda":
        return f"on {device_type} the step runs eager (CUDA graphs need a CUDA GPU)"
    if cfg.quant.bits == 8 and not cfg.quant.weight_only_int8("cuda"):
        return ("quant.int8_compute=llm_int8: bitsandbytes' LLM.int8 matmul waits for the GPU twice a layer, which no "
                "CUDA graph can hold (quant.int8_compute=weight_only records)")
    if t.grad_accum > 1:
        return f"trainer.grad_accum={t.grad_accum}: a recorded backward cannot accumulate gradients"
    if t.strategy == "fsdp":
        return "trainer.strategy=fsdp gathers weights into fresh memory each step"
    if t.compile is Compile.cudagraphs:
        return "trainer.compile=cudagraphs records its own CUDA graphs"
    if cfg.data.batching not in (Batching.auto, Batching.static):
        return f"data.batching={cfg.data.batching.value}: recorded steps replay the fixed shapes of static batches"
    return None


def plan_step(cfg: Config, device_type: str, train_rows: int) -> StepPlan:
    """Resolve `cfg`'s auto step settings in place for a run on `device_type` (cuda, cpu; `devices.device_type`)
    over `train_rows` examples."""
    t = cfg.trainer
    why_not = _unrecordable(cfg, device_type)
    llm_int8 = cfg.quant.bits == 8 and not cfg.quant.weight_only_int8(device_type)
    if llm_int8 and (t.capture or t.compile not in (Compile.eager, Compile.auto)):
        asked = "trainer.capture=true" if t.capture else f"trainer.compile={t.compile.value}"
        log.warning("%s: bitsandbytes' LLM.int8 matmul waits for the GPU twice a layer (slower compiled than eager, "
                    "and no CUDA graph can hold it; quant.int8_compute=weight_only records); running eager", asked)
        t.capture, t.compile = False, Compile.eager
    steps = t.optimizer_steps(train_rows)
    if t.capture is None:
        t.capture = why_not is None
        if why_not and device_type == "cuda":
            log.warning("the step is not recorded: %s", why_not)
    chosen = t.compile is Compile.auto  # the compilation is this plan's to choose, not the config's
    if chosen:
        regions = t.capture and steps >= REGIONS_MIN_STEPS
        t.compile, t.compile_regions = (Compile.inductor, True) if regions else (Compile.eager, t.compile_regions)
    if cfg.data.batching is Batching.auto:
        static = t.capture or t.compile is Compile.cudagraphs
        cfg.data.batching = Batching.static if static else Batching.packed
    if t.capture:
        if t.compile is Compile.inductor:
            path = "capture+regions" if t.compile_regions else "capture+inductor"
            reason = (f"{steps} steps >= {REGIONS_MIN_STEPS}: compiling the decoder layers pays for itself" if chosen
                      else "trainer.compile=inductor" + (" trainer.compile_regions=true" if t.compile_regions else ""))
        else:
            path = "capture"
            reason = (f"recorded as CUDA graphs; {steps} steps < {REGIONS_MIN_STEPS}, too few for compiling to pay"
                      if steps < REGIONS_MIN_STEPS else "recorded as CUDA graphs")
    elif t.compile is not Compile.eager:
        path, reason = "compiled", f"trainer.compile={t.compile.value}"
    else:
        path, reason = "eager", why_not or "trainer.capture=false"
    log.info("training step: %s (%s)", path, reason)
    return StepPlan(path, reason)


@dataclass(frozen=True)
class RunPlan:
    """The decisions `train` follows, each taken here once."""

    step: StepPlan
    run_dir: Path
    ckpt_dir: Path
    adapter_dir: Path  # the last weights: `adapter/`, or `model/` for full fine-tuning (`adapter=none`)
    full_finetune: bool  # the whole model is trained and saved, not an adapter
    compiled: bool  # the step compiles: Inductor's kernels are cached under `paths.compile_cache` for later runs
    tests: bool  # the test sets are scored after training (`Config.tests_after_training`)
    untested_why: str | None  # why a run with test sets and eval.enabled scores none after training, if it does not
    exports_best: bool  # the best checkpoint is written as an adapter (not under FSDP: the model is sharded)


def plan_run(cfg: Config, device_type: str, train_rows: int) -> RunPlan:
    """Plan a run on `device_type` over `train_rows` training examples an epoch: the warnings its schedule earns,
    its step (`plan_step`, which resolves `cfg`'s auto settings in place), its folders and its later stages."""
    for warning in cfg.trainer.schedule_warnings(train_rows):
        log.warning(warning)
    step = plan_step(cfg, device_type, train_rows)
    run_dir = Path(cfg.output_dir)
    full_finetune = cfg.adapter.method is AdapterMethod.none
    fsdp = cfg.trainer.strategy == "fsdp"
    untested = ("under FSDP (the model is sharded over the GPUs, generation runs on one)"
                if cfg.eval.enabled and cfg.task.test and not cfg.tests_after_training else None)
    return RunPlan(step, run_dir, run_dir / "checkpoints", run_dir / ("model" if full_finetune else "adapter"),
                   full_finetune, cfg.trainer.compile is not Compile.eager, cfg.tests_after_training, untested,
                   exports_best=not fsdp)
