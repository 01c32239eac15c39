"""Training speed through finlora's own `train()` (issue 12): eager and compiled steps side by side, in one run.

Every row is one `train()` run composed from conf/ as `python train.py ...` composes it, on a random-init
model saved with the real SmolLM2 tokenizer (speed depends on shapes, not weights); every figure is read
from the run's own summary: useful tokens/s after warm-up (the first batches of each shape, where
compiling and CUDA-graph recording happen, are left out and reported as compile seconds), the step's
time and its host part, and how often the host waited for the GPU outside logging steps.

Sections (`--only` picks some):
  embedded  SmolLM2-135M shapes, task=sentiment, batch 8 and 32: today's eager packed step against
            inductor and cudagraphs on static batches, LoRA and DoRA (r=8 on q/k/v, finlora's default).
  numerics  50 steps from the same init, eager against `--numerics-mode` (cudagraphs; both static, so the same
            batches in the same layout): the largest relative difference of the per-step losses; the adapter
            loads in peft.
  capture   the step recorded as CUDA graphs (`trainer.capture`) against eager and the other `--modes`,
            `--batches`, `--adapters`; with `--jobs`, then one `python train.py` job of each adapter and mode in a
            fresh process (what a sweep's later job pays to record, and to compile from the cache).
  batch32   the same at batch 32: eager LoRA, cudagraphs LoRA and DoRA.
  cache     `python train.py` in a fresh process with the compile cache the compiled numerics run filled:
            a later job of the same shapes (run after numerics).
  regions   the embedded shapes, cudagraphs, batch 8, LoRA and DoRA (`--adapters`): the first job of a sweep
            (`python train.py` in a fresh process with an empty compile cache) compiling the whole model
            against compiling the decoder layers, one compilation for all (`trainer.compile_regions`), then a
            later job of each with the cache the first one filled.
  profile   the embedded shapes (`--profile-llama`: the llama section's at 4-bit), the first of `--modes`, batch 8,
            LoRA and DoRA: where the host's time goes in 50 steady steps (cProfile from step 100 to 150 of the run;
            the top functions by own and by cumulative time), then the GPU's kernels over 20 steps, to
            `--profile-dir`/train_profile_<adapter>.txt.
  llama     Llama-3.1-8B shapes, 4 layers, vocabulary 128,256, 4-bit and 8-bit (`--bits`), 8 sentiment examples a
            step: LoRA against DoRA, eager packed against `--modes` on static batches.
  memory    Llama-3.1-8B shapes, 4-bit NF4, r=8 on q/k/v, 1 x 2048 tokens with gradient checkpointing: peak
            memory at 32 layers if `--llama-layers 32`, else at 2 and 4 layers extrapolated.

    python scripts/bench_train_speed.py --data .gpu/data --tokenizer .gpu/tokenizer     # GPU
    python scripts/bench_train_speed.py --smoke --only embedded                           # CPU, tiny

Writes docs/train_speed.json (every run's summary) and the section "## Training speed" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import peft
import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from finlora.config import ModelConfig
from finlora.models import SHAPES, load_tokenizer, save_random_llama
from finlora.outputs import replace_section, write_json
from finlora.train import train

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training speed"
SMOLLM2 = SHAPES["smollm2-135m"]
LLAMA_8B = SHAPES["llama-3.1-8b"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 49152}


def overrides(model: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """A short training run that measures only steps: no evaluation, small validation, CSV log."""
    return [f"model.name_or_path={model}", f"paths.data_dir={args.data}", f"paths.compile_cache={args.cache}",
            f"output_dir={out}", "logger=csv", "eval.enabled=false", "eval.during_training.size=0",
            "data.val_size=16", "checkpoint.every_n_steps=100000", "checkpoint.keep_best=0",
            "trainer=cpu" if args.smoke else "trainer=gpu", *extra]


def run(name: str, model: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=args.work))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides(model, out, args, *extra), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # run_name reads the chosen groups from it, as under train.py
    with open_dict(cfg):
        del cfg["hydra"]
    torch.compiler.reset()  # each run compiles afresh, as in its own process (Dynamo's recompile limit is per process)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    started = time.perf_counter()
    try:
        summary = train(cfg)
    except Exception as err:  # one failing mode must not lose the others' figures
        summary = {"name": name, "overrides": list(extra), "error": f"{type(err).__name__}: {err}"[:400]}
    else:
        summary |= {"name": name, "overrides": list(extra), "run_s": round(time.perf_counter() - started, 1),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
                    else None, "losses": losses(out)}
    keep(summary, args)
    print(f"[{name}] {summary.get('error') or ''}{summary.get('tokens_per_s') or 0:,.0f} tok/s, step "
          f"{summary.get('step_ms')} ms (host {summary.get('step_host_ms')}), syncs/step "
          f"{summary.get('host_syncs_per_step')} {summary.get('sync_sites')}, compile {summary.get('compile_s')} s, "
          f"breaks {summary.get('graph_breaks')}, captured {summary.get('cudagraphs_captured')}", flush=True)
    return summary


def keep(row: dict, args: argparse.Namespace) -> None:
    """Every finished run on disk at once: a later crash or timeout keeps it."""
    done = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"rows": []}
    write_json(Path(args.json), {"device": args.device, "rows": [*done["rows"], row]})


def losses(out: Path) -> list[float]:
    """The run's logged training losses (a short run may have logged none)."""
    path = out / "csv" / "metrics.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


MODES = {"eager": ["trainer.capture=false", "trainer.compile=eager", "data.batching=packed"],
         "inductor": ["trainer.capture=false", "trainer.compile=inductor", "data.batching=static"],
         "cudagraphs": ["trainer.capture=false", "trainer.compile=cudagraphs", "data.batching=static"],
         "capture": ["trainer.capture=true", "data.batching=static"],
         "capture+inductor": ["trainer.capture=true", "trainer.compile=inductor", "data.batching=static"],
         "capture+regions": ["trainer.capture=true", "trainer.compile=inductor", "trainer.compile_regions=true",
                             "data.batching=static"]}


def sentiment(adapter: str, batch: int, steps: int, mode: str, quant: str = "none") -> list[str]:
    """The overrides of a `task=sentiment` run: adapter, quantization, batch size, steps and mode (`MODES`)."""
    return ["task=sentiment", f"adapter={adapter}", f"quant={quant}", f"trainer.batch_size={batch}",
            f"trainer.max_steps={steps}", *MODES[mode]]


def embedded_runs(model: Path, args: argparse.Namespace, plan: list[tuple[int, str, str]]) -> list[dict]:
    """An `embedded b<batch> <adapter> <mode>` row for each (batch, adapter, mode) of `plan`, in its order."""
    return [run(f"embedded b{batch} {adapter} {mode}", model, args,
                *sentiment(adapter, batch, run_steps(args, mode), mode)) for batch, adapter, mode in plan]


def run_steps(args: argparse.Namespace, mode: str) -> int:
    """The run's optimizer steps: `--eager-steps` for an eager baseline where given (each eager step takes 0.1-0.3 s
    on the embedded model, where a captured one takes 10-20 ms), else `--steps`."""
    return args.eager_steps if mode == "eager" and args.eager_steps else args.steps


def embedded(model: Path, args: argparse.Namespace) -> list[dict]:
    return embedded_runs(model, args, [(8, "lora", "eager"), (8, "lora", "cudagraphs"), (8, "dora", "eager"),
                                       (8, "dora", "cudagraphs"), (8, "dora", "inductor")])


NUMERICS = ["task=sentiment", "adapter=dora", "quant=none", "trainer.batch_size=8", "trainer.max_steps=50",
            "trainer.log_every_n_steps=1", "adapter.dropout=0"]


def numerics(model: Path, args: argparse.Namespace) -> list[dict]:
    """50 steps eager and compiled or recorded from the same init; a compiled run starts from an empty cache."""
    # the same batches, in the same layout
    static = {"eager": ["trainer.capture=false", "trainer.compile=eager", "data.batching=static"]}
    rows = [run(f"numerics {mode}", model, args, *NUMERICS, *static.get(mode, MODES[mode]))
            for mode in ("eager", args.numerics_mode)]
    if all("losses" in r for r in rows):
        a, b = rows[0]["losses"], rows[1]["losses"]
        rows[1]["max_rel_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
        rows[1]["peft_loads"] = peft_loads(model, Path(rows[1]["adapter_dir"]))
        keep(rows[1], args)
    return rows


def peft_loads(model: Path, adapter_dir: Path) -> bool:
    """The compiled run's adapter in plain transformers + peft: loads and gives finite logits."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        return bool(torch.isfinite(tuned(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all())


def cache(model: Path, args: argparse.Namespace) -> list[dict]:
    """A later job of the same shapes: `python train.py` in a fresh process with the compile cache that the
    compiled numerics run filled (run `numerics` first); its compile seconds against that run's."""
    return [job("cache warm", model, args, args.cache, *NUMERICS, *MODES["cudagraphs"])]


def job(name: str, model: Path, args: argparse.Namespace, compile_cache: str, *extra: str) -> dict[str, Any]:
    """`python train.py` in a fresh process, as a sweep's job runs, compiling into `compile_cache`: its summary."""
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=args.work))
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides(model, out, args), *extra,
           f"paths.compile_cache={compile_cache}"]
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    metrics = out / "metrics.json"
    if done.returncode or not metrics.is_file():
        row = {"name": name, "overrides": list(extra), "error": done.stderr[-600:]}
    else:
        row = json.loads(metrics.read_text()) | {"name": name, "overrides": list(extra),
                                                 "process_s": round(time.perf_counter() - started)}
        print(f"[{name}] compile {row['compile_s']} s, process {row['process_s']} s, breaks "
              f"{row.get('graph_breaks')}, {row['tokens_per_s']:,.0f} tok/s", flush=True)
    keep(row, args)
    return row


def regions(model: Path, args: argparse.Namespace) -> list[dict]:
    """First and later job of each compiled form, each form with a compile cache of its own (empty at first)."""
    rows = []
    for adapter in args.adapters:
        for form, regions_on in (("whole model", "false"), ("regions", "true")):
            compile_cache = tempfile.mkdtemp(prefix="compile-", dir=args.work)
            extra = [*sentiment(adapter, 8, args.steps, "cudagraphs"), f"trainer.compile_regions={regions_on}"]
            rows += [job(f"{when} job b8 {adapter} cudagraphs, {form}", model, args, compile_cache, *extra)
                     for when in ("first", "later")]
    return rows


class HostProfile(L.Callback):
    """cProfile over the steps from `start` to `start + steps`: the host's share of steady steps, by function.
    On a GPU, then torch.profiler's device side over the next `device_steps` steps: the GPU's busy time a step
    (its kernels' time, those replayed from CUDA graphs included) against the step's wall time, which tells a
    step bound by the host from one bound by the GPU, and the kernels that take it."""

    def __init__(self, path: Path, start: int = 100, steps: int = 50, device_steps: int = 20) -> None:
        import cProfile

        self.path, self.start, self.steps, self.profiler = path, start, steps, cProfile.Profile()
        self.device_steps = device_steps if torch.cuda.is_available() else 0
        self.device: Any = None
        self.wall = 0.0
        self.text = ""

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.start:
            self.profiler.enable()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        step = trainer.global_step
        if step == self.start + self.steps:
            self.profiler.disable()
            import io
            import pstats

            text = io.StringIO()
            for key, n in (("tottime", 40), ("cumulative", 40)):
                pstats.Stats(self.profiler, stream=text).sort_stats(key).print_stats(n)
            self.text = f"# cProfile of steps {self.start}-{self.start + self.steps}\n{text.getvalue()}"
            self._write()
            if self.device_steps:
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize()
                self.device = profile(activities=[ProfilerActivity.CUDA])
                self.device.__enter__()
                self.wall = time.perf_counter()
        elif self.device is not None and step == self.start + self.steps + self.device_steps:
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - self.wall) * 1e3 / self.device_steps
            self.device.__exit__(None, None, None)
            events = self.device.key_averages()
            busy_ms = sum(e.self_device_time_total for e in events) / 1e3 / self.device_steps
            idle = self._idle()
            self.device = None
            line = (f"GPU busy {busy_ms:.2f} ms a step (its kernels' time) against {wall_ms:.2f} ms of wall time a "
                    f"step, steps {self.start + self.steps}-{step} (under the device profiler)")
            print(f"[{self.path.name}] {line}\n[{self.path.name}] {idle}", flush=True)
            self.text += (f"\n# {line}\n# {idle}\n\n"
                          f"{events.table(sort_by='self_cuda_time_total', row_limit=30, max_name_column_width=70)}\n"
                          f"\n# every kernel: µs a step, calls a step, name\n{self._per_step(events)}")
            self._write()

    def _idle(self) -> str:
        """The GPU's idle time a step, by the length of each pause between its kernels, which tells short pauses inside
        recorded graphs (the next kernel not yet there) apart from long ones between them (the host)."""
        spans = sorted((e.time_range.start, e.time_range.end) for e in self.device.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
        bins = {5: [0.0, 0], 20: [0.0, 0], 100: [0.0, 0], float("inf"): [0.0, 0]}  # up to µs: [idle µs, pauses]
        end = spans[0][1] if spans else 0.0
        for start, stop in spans[1:]:
            if start > end:
                pause = start - end
                slot = bins[next(limit for limit in bins if pause <= limit)]
                slot[0] += pause
                slot[1] += 1
            end = max(end, stop)
        n = self.device_steps
        return "GPU idle a step, µs (pauses), by pause: " + ", ".join(
            f"{'longer' if limit == float('inf') else f'≤{limit:g} µs'} {idle / n:.0f} ({count / n:.1f})"
            for limit, (idle, count) in bins.items())

    def _per_step(self, events: Any) -> str:
        rows = sorted(((e.self_device_time_total / self.device_steps, e.count / self.device_steps, e.key)
                       for e in events if e.self_device_time_total > 0), reverse=True)
        return "".join(f"{us:9.1f} {calls:6.1f}  {name[:150]}\n" for us, calls, name in rows)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text)


def with_host_profile(path_of: Callable[[], Path], start: int = 100, steps: int = 50) -> Callable[..., Any]:
    """`finlora.train.run_callbacks` as it is now, with a `HostProfile` writing to `path_of()` among the callbacks
    it builds (`path_of` is asked when a run starts: a DDP rank knows its rank by then)."""
    import finlora.train

    built = finlora.train.run_callbacks

    def with_profile(*a: Any, **k: Any) -> Any:
        callbacks = built(*a, **k)
        callbacks.all.append(HostProfile(path_of(), start, steps))
        return callbacks

    return with_profile


def profile(model: Path, args: argparse.Namespace, tokenizer: Any) -> list[dict]:
    """Each adapter's run with `HostProfile` among its callbacks (added to what `train` builds); with
    `--profile-llama`, on Llama-3.1-8B shapes (4 layers) at 4-bit instead of the embedded shapes."""
    import finlora.train

    shapes, quant = ("", "none") if not args.profile_llama else ("llama4bit_", "4bit")
    if args.profile_llama:
        model = save_random_llama(Path(args.work) / "llama4", LLAMA_8B, 4, tokenizer, _init_device())
    built = finlora.train.run_callbacks
    rows = []
    for adapter in args.adapters:
        name = f"train_profile_{shapes}{adapter}{'' if args.modes[0] == 'cudagraphs' else '_' + args.modes[0]}.txt"
        finlora.train.run_callbacks = with_host_profile(lambda name=name: Path(args.profile_dir) / name)
        try:
            rows.append(run(f"profile {shapes}b8 {adapter} {args.modes[0]}", model, args,
                            *sentiment(adapter, 8, 200, args.modes[0], quant)))
        finally:
            finlora.train.run_callbacks = built
    return rows


def capture(model: Path, args: argparse.Namespace) -> list[dict]:
    """In-process runs (compiled modes fill the run's compile cache), then with `--jobs` a fresh job of each:
    for a compiled mode, a later job of the same shapes with that cache."""
    rows = embedded_runs(model, args, [(batch, adapter, mode) for batch in args.batches for adapter in args.adapters
                                       for mode in ("eager", *args.modes)])
    return rows + [job(f"later job b8 {adapter} {mode}", model, args, args.cache,
                       *sentiment(adapter, 8, args.steps, mode)) for adapter in args.adapters for mode in args.modes
                   if args.jobs]


def batch32(model: Path, args: argparse.Namespace) -> list[dict]:
    return embedded_runs(model, args, [(32, "lora", "eager"), (32, "lora", "cudagraphs"), (32, "dora", "cudagraphs")])


def llama(tokenizer: Any, args: argparse.Namespace) -> list[dict]:
    model = save_random_llama(Path(args.work) / "llama4", LLAMA_8B, 4, tokenizer, _init_device())
    rows = []
    for bits in args.bits:
        for adapter in args.adapters:
            for mode in ("eager", *args.modes):
                rows.append(run(f"llama-8b x4 {bits}bit {adapter} {mode}", model, args,
                                *sentiment(adapter, 8, run_steps(args, mode), mode, f"{bits}bit")))
    return rows


def memory(tokenizer: Any, args: argparse.Namespace) -> list[dict]:
    """QLoRA with gradient checkpointing on about 2,000 tokens (20 sentiment examples packed into a row of up
    to 2,048: the goal's 1 × 2,048; at 2 and 4 layers 32 examples, about 3,200 tokens in two rows) and on 8
    packed sentiment examples."""
    rows = []
    for layers in ([args.llama_layers] if args.llama_layers else [2, 4]):
        model = save_random_llama(Path(args.work) / f"llama{layers}", LLAMA_8B, layers, tokenizer, _init_device())
        for batch, length in ((20 if args.llama_layers else 32, 2048), (8, 256)):
            rows.append(run(f"memory {layers} layers {batch} packed into rows of {length}", model, args,
                            "task=sentiment",
                            "adapter=lora", "quant=4bit", "trainer.gradient_checkpointing=true",
                            f"trainer.batch_size={batch}", f"data.max_length={length}", "data.batching=packed",
                            f"trainer.max_steps={max(args.steps // 2, 6)}") | {"layers": layers})
    return rows


def markdown(rows: list[dict], device: str) -> list[str]:
    lines = [SECTION, "", f"`scripts/bench_train_speed.py` on {device}. Every row is one run of finlora's `train()` "
             "(composed from conf/ like `python train.py`), read from its own summary; tokens/s leave out "
             "the first batches of each shape (compile), step/host ms are medians of the logging steps.", "",
             "| run | useful tokens/s | × eager | step ms | host ms | host syncs/step | compile s | shapes | "
             "graph breaks | captured | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:160]} | | | | | | | | | |")
            continue
        base = next((x for x in rows if "error" not in x and x["name"] == _eager_name(r["name"])
                     and "eager" in x["name"] and x.get("lease") == r.get("lease")), None)  # the same lease's
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base and r.get("tokens_per_s") else ""
        lines.append(f"| {r['name']} | {_num(r.get('tokens_per_s'), ',.0f')} | {ratio} | {_num(r.get('step_ms'))} | "
                     f"{_num(r.get('step_host_ms'))} | {_num(r.get('host_syncs_per_step'))} | "
                     f"{_num(r.get('compile_s'))} | {r.get('batch_shapes', '')} | {r.get('graph_breaks', '')} | "
                     f"{r.get('cudagraphs_captured', '')} | {_num(r.get('peak_gib'))} |")
    forms = ("whole model", "regions", "regions nested in the whole-model graph (before)")
    for adapter in ("lora", "dora"):
        for lease in sorted({r.get("lease") for r in rows if r["name"].startswith(f"first job b8 {adapter}")}):
            times = [f"{form} {_job_times(rows, adapter, form, lease)}" for form in forms
                     if any(r["name"] == f"first job b8 {adapter} cudagraphs, {form}" and r.get("lease") == lease
                            for r in rows)]
            lines += ["", f"Compile time of the embedded shapes, {adapter}, cudagraphs, lease {lease}, first job / "
                      "later job with its cache (compiling; whole process): " + "; ".join(times) + "."]
    for r in rows:
        if "max_rel_loss_diff" in r:
            mode = r["name"].removeprefix("numerics ")
            lines += ["", f"Numerics: 50 steps from the same init, eager vs {mode} (static batches, DoRA, bf16): "
                      f"largest relative difference of the per-step losses {r['max_rel_loss_diff']:.2e}; "
                      f"the adapter loads in plain peft: {r['peft_loads']}."]
    return lines


def _job_times(rows: list[dict], adapter: str, form: str, lease: Any) -> str:
    """'first / later' compile seconds (process seconds) of one lease's `regions` section jobs of one form."""
    times = []
    for when in ("first", "later"):
        r = next((r for r in rows if r["name"] == f"{when} job b8 {adapter} cudagraphs, {form}"
                  and r.get("lease") == lease), {"error": "none"})
        times.append("failed" if "error" in r else f"{_num(r.get('compile_s'), '.0f')} s ({r['process_s']} s)")
    return " / ".join(times)


def _eager_name(name: str) -> str:
    """The eager run a row is compared with: the same batch size, LoRA's when there is no eager DoRA row."""
    for mode in ("capture+inductor", "capture+regions", "capture", "inductor", "cudagraphs"):
        name = name.replace(mode, "eager")
    return name


def _num(x: Any, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("FINLORA_DATA_DIR", str(ROOT.parent / "shared/data/finlora")))
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--only", nargs="*",
                        default=["embedded", "batch32", "numerics", "cache", "regions", "llama", "memory"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eager-steps", type=int, default=0,
                        help="capture, llama: the eager runs' steps (default: --steps)")
    parser.add_argument("--adapters", nargs="*", default=["lora", "dora"],
                        help="capture, regions, profile, llama: the adapters")
    parser.add_argument("--modes", nargs="*", default=["cudagraphs"], choices=list(MODES)[1:],
                        help="capture, llama: the modes beside eager; profile: the first")
    parser.add_argument("--batches", nargs="*", type=int, default=[8, 32], help="capture: the batch sizes")
    parser.add_argument("--jobs", action="store_true", help="capture: a fresh `python train.py` job of each mode")
    parser.add_argument("--numerics-mode", default="cudagraphs", choices=list(MODES)[1:])
    parser.add_argument("--bits", nargs="*", type=int, default=[4, 8], help="llama: the quantizations")
    parser.add_argument("--profile-dir", default=str(ROOT / "docs"), help="profile: where its tables go")
    parser.add_argument("--profile-llama", action="store_true", help="profile: Llama-3.1-8B shapes at 4-bit")
    parser.add_argument("--llama-layers", type=int, default=0, help="memory: measure this many layers only")
    parser.add_argument("--append", action="store_true", help="add to --json's rows instead of starting anew")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite --md's section from --json's rows")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager only: checks the script")
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="bench-train-speed-"))
    parser.add_argument("--json", default=str(ROOT / "docs/train_speed.json"))
    parser.add_argument("--md", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args()
    if args.rewrite:
        return write_markdown(args)
    args.cache = str(Path(args.work) / "compile_cache")
    if args.smoke:
        MODES.update({mode: MODES["eager"] for mode in MODES})
        args.steps, args.eager_steps = min(args.steps, 4), min(args.eager_steps, 4)
    source = args.tokenizer or str(_embedded_tokenizer())
    tokenizer = load_tokenizer(source, ModelConfig(name_or_path=source))
    device = describe_device()
    model = save_random_llama(Path(args.work) / "smollm2", TINY if args.smoke else SMOLLM2,
                              2 if args.smoke else 30, tokenizer, torch.device("cpu"))
    sections = {"embedded": lambda: embedded(model, args), "batch32": lambda: batch32(model, args),
                "numerics": lambda: numerics(model, args), "capture": lambda: capture(model, args),
                "cache": lambda: cache(model, args), "regions": lambda: regions(model, args),
                "profile": lambda: profile(model, args, tokenizer),
                "llama": lambda: llama(tokenizer, args),
                "memory": lambda: memory(tokenizer, args)}
    args.device = device
    if not args.append:
        Path(args.json).unlink(missing_ok=True)
    for name in args.only:
        sections[name]()
    write_markdown(args)


def write_markdown(args: argparse.Namespace, render: Callable[[list[dict], str], list[str]] = markdown) -> None:
    """The section `render` makes of every row in --json (with --append, the earlier runs' rows too), into --md."""
    done = json.loads(Path(args.json).read_text())
    text = "\n".join(render(done["rows"], done["device"]))
    replace_section(Path(args.md), text)
    print(text)


def describe_device() -> str:
    """The device and the versions of the libraries that shape a step's speed."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"{device}; torch {torch.__version__}, lightning {L.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def _init_device() -> torch.device:
    """Where random Llama-8B-shaped weights are drawn: the GPU draws billions of them in seconds."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embedded_tokenizer() -> Path:
    from finlora.models import resolve_source

    return Path(resolve_source(ModelConfig(), str(Path.home() / ".cache/finlora")))


if __name__ == "__main__":
    main()
