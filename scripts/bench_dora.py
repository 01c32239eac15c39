"""DoRA vs LoRA on one GPU: peft's LoRA, peft's DoRA and finlora's DoRA, side by side.

Saves a random-init Llama with Llama-3.1-8B layer shapes (hidden 4096, intermediate 14336, 32 heads /
8 KV heads) and 4 decoder layers (no download; vocabulary 32000 by default, smaller than Llama-3.1's
128256, so the LM head weighs less in the step), loads it through finlora's build step as a run does
(bf16, 8-bit LLM.int8 or 4-bit NF4 with double quantization and bf16 compute; peft's k-bit preparation),
with r=8 adapters on all seven projections, and times forward + backward + AdamW under bf16 autocast.
Before timing it checks on the GPU that finlora's DoRA computes what peft's does (loss, logits and
gradients of A, B and the magnitude).

    PYTHONPATH=src python scripts/bench_dora.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
import transformers
from torch import Tensor, nn

import finlora.dora as dora
from finlora.build import build, placement
from finlora.config import AdapterConfig, AdapterMethod, Config, DoraImpl, ModelConfig, QuantConfig, TrainerConfig
from finlora.dora import kernels
from finlora.models import SHAPES, load_tokenizer, resolve_source, save_random_llama
from finlora.outputs import replace_section

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = {
    "lora": "peft LoRA",
    "peft-dora": "peft DoRA",
    "finlora": "finlora DoRA (Triton bwd)",
    "finlora-torch": "finlora DoRA (PyTorch only)",
}
SECTION = "## DoRA vs LoRA"


@dataclass
class Setting:
    name: str
    bits: str  # "bf16", "8bit", "4bit"
    r: int = 8
    batch: int = 4
    seq: int = 1024
    accum: int = 1


@dataclass
class Result:
    setting: str
    bits: str
    impl: str
    step_ms: float
    spread_ms: float
    cpu_ms: float  # until the step's Python returns, before waiting for the GPU
    tokens_per_s: float
    peak_gib: float


def build_model(bits: str, impl: str, r: int, args: argparse.Namespace) -> nn.Module:
    """The random-init Llama saved in `args.model_dir`, loaded through finlora's build step as a run would load
    it: quantized as `bits` says, with an r-rank `impl` adapter on all seven projections."""
    quant = QuantConfig(bits={"bf16": None, "8bit": 8, "4bit": 4}[bits])
    adapter = AdapterConfig(method=AdapterMethod.lora if impl == "lora" else AdapterMethod.dora,
                            impl=DoraImpl.peft if impl == "peft-dora" else DoraImpl.finlora, r=r, alpha=2 * r,
                            dropout=0.0, target_modules=TARGETS)
    cuda = args.device == "cuda"
    cfg = Config(model=ModelConfig(name_or_path=str(args.model_dir)), quant=quant, adapter=adapter,
                 trainer=TrainerConfig(accelerator="gpu" if cuda else "cpu", precision="bf16-mixed" if cuda else None))
    model = build(cfg, placement(cfg)).model.train()
    if impl == "finlora-torch":
        dora.use_fast_dora(model, use_triton=False)
    return model


def save_model(args: argparse.Namespace) -> None:
    """Llama-3.1-8B layer shapes (tiny ones with --small), `args.layers` decoder layers, into `args.model_dir`."""
    shape = ({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
             if args.small else SHAPES["llama-3.1-8b"])
    tokenizer = load_tokenizer(resolve_source(ModelConfig(), args.cache_dir), ModelConfig())
    save_random_llama(args.model_dir, shape | {"vocab_size": args.vocab}, args.layers, tokenizer,
                      torch.device(args.device))


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero B and perturbed magnitudes, so that every DoRA term shows in the check."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen).to(p.device))


def batch(setting: Setting, vocab: int, device: str, seed: int = 0) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (setting.batch, setting.seq), generator=gen).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_backward(model: nn.Module, ids: Tensor, scale: float = 1.0) -> Tensor:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    (out.loss * scale).backward()
    return out


def grads_by_kind(model: nn.Module) -> dict[str, Tensor]:
    kinds: dict[str, list[Tensor]] = {"lora_A": [], "lora_B": [], "lora_magnitude_vector": []}
    for name, p in model.named_parameters():
        for kind in kinds:
            if kind in name and p.grad is not None:
                kinds[kind].append(p.grad.float().flatten())
    return {k: torch.cat(v) for k, v in kinds.items() if v}


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(bits: str, args: argparse.Namespace) -> list[dict]:
    """finlora's DoRA (Triton and PyTorch backward) against peft's DoRA on one batch, same parameters."""
    model = build_model(bits, "peft-dora", 8, args)
    randomize_adapters(model)
    ids = batch(Setting("check", bits, batch=2, seq=512), args.vocab, args.device, seed=7)

    def run() -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        model.zero_grad(set_to_none=True)
        out = forward_backward(model, ids)
        return out.loss.detach().float(), out.logits.detach().float(), grads_by_kind(model)

    results = {"peft-dora": run()}
    if bits == "bf16":  # a float32 reference: the same model and adapters, no autocast
        adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
        model.float()
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results["fp32 peft-dora"] = (out.loss.detach(), out.logits.detach(), grads_by_kind(model))
        model.to(torch.bfloat16)
        for name, p in model.named_parameters():
            if name in adapters:
                p.data = adapters[name]
        results["peft-dora"] = run()
    for impl in ("finlora", "finlora-torch"):
        dora.use_fast_dora(model, use_triton=impl == "finlora")
        results[impl] = run()
    rows = []
    refs = ["peft-dora"] + (["fp32 peft-dora"] if bits == "bf16" else [])
    for ref in refs:
        for impl in ("peft-dora", "finlora", "finlora-torch"):
            if impl == ref:
                continue
            loss, logits, grads = results[impl]
            r_loss, r_logits, r_grads = results[ref]
            row = {"bits": bits, "impl": impl, "ref": ref}
            row.update(loss=rel(loss, r_loss), logits=rel(logits, r_logits))
            row.update({k: rel(grads[k], r_grads[k]) for k in r_grads})
            rows.append(row)
    return rows


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_config(setting: Setting, impl: str, args: argparse.Namespace) -> Result:
    model = build_model(setting.bits, impl, setting.r, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    micro = [batch(setting, args.vocab, args.device, seed=i) for i in range(setting.accum)]

    def step() -> None:
        for ids in micro:
            forward_backward(model, ids, 1.0 / setting.accum)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        cpu.append(time.perf_counter() - t0)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    q = statistics.quantiles(times, n=4)
    med = statistics.median(times)
    tokens = setting.batch * setting.seq * setting.accum
    spread, cpu_ms = 1e3 * (q[2] - q[0]), 1e3 * statistics.median(cpu)
    return Result(setting.name, setting.bits, impl, 1e3 * med, spread, cpu_ms, tokens / med, peak)


def profile(bits: str, impl: str, args: argparse.Namespace, top: int = 25) -> str:
    """Top GPU kernels and CPU operations of one step, and any host-device synchronization."""
    setting = Setting("profile", bits)
    model = build_model(bits, impl, 8, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = batch(setting, args.vocab, args.device)
    for _ in range(2):
        forward_backward(model, ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(args.device)
    gpu = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        forward_backward(model, ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
    events = prof.key_averages()
    words = ("Synchronize", "Memcpy", "item", "_local_scalar_dense")
    syncs = [
        f"{e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms" for e in events if any(w in e.key for w in words)
    ]
    out = [f"### {bits} {impl}", "syncs and copies: " + ("; ".join(syncs) or "none")]
    for sort in ("self_device_time_total", "self_cpu_time_total") if gpu else ("self_cpu_time_total",):
        out.append(events.table(sort_by=sort, row_limit=top, max_name_column_width=70))
    return "\n".join(out) + "\n"


def kernel_check(args: argparse.Namespace) -> list[str]:
    """The Triton kernels against the PyTorch path (errors against float64), and their times."""
    return [kernel_line(n_rows, n_cols) for n_rows, n_cols in [(4096, 14336), (4096, 1024), (333, 4097)]]


def kernel_line(n_rows: int, n_cols: int, r: int = 8, scaling: float = 2.0) -> str:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    res, g = randn(n_rows, n_cols), randn(n_rows, n_cols)
    ax, b_eff, b_s = randn(n_rows, r), randn(n_cols, r), randn(n_cols, r)
    s = torch.rand(n_cols, device="cuda") + 0.5
    m = torch.rand(n_cols, device="cuda") + 0.5
    out = {}
    for use in (True, False):
        y = kernels.dora_out(res, ax, s, b_eff, None, use)
        gz, _, b_and_m = kernels.dora_grads(g, y, ax, s, m, b_s, None, scaling, use)
        grad_b = scaling * (g.double() * s).T @ ax.double()
        refs = (ax.double() @ b_eff.double().T + s * res.double(), g.double() * s,
                torch.cat([grad_b.flatten(), (g.double() * y.double()).sum(0) / m]))
        assert all(torch.isfinite(t).all() for t in (y, gz, b_and_m))
        fwd = timed(lambda u=use: kernels.dora_out(res, ax, s, b_eff, None, u))
        bwd = timed(lambda yy=y, u=use: kernels.dora_grads(g, yy, ax, s, m, b_s, None, scaling, u))
        errs = (rel(y, refs[0]), rel(gz, refs[1]), rel(b_and_m, refs[2]))
        out["triton" if use else "torch"] = f"fwd {fwd:.3f} ms bwd {bwd:.3f} ms, errors " + " ".join(
            f"{e:.1e}" for e in errs
        )
    return f"{n_rows}x{n_cols}: Triton {out['triton']} | PyTorch {out['torch']}"


def timed(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def settings(args: argparse.Namespace) -> list[tuple[Setting, list[str]]]:
    fin = ["finlora", "finlora-torch"] if args.device == "cuda" else ["finlora-torch"]
    main_impls = ["lora", "peft-dora", *fin]
    extra_impls = ["lora", "peft-dora", fin[0]]
    scale = {"batch": 2, "seq": 64} if args.small else {}
    out = [(Setting("main", b, **scale), main_impls) for b in args.bits]
    if not args.quick:
        seq = {"batch": 2, "seq": 256} if args.small else {"seq": 4096}
        out += [
            (Setting("r=64", "bf16", r=64, **scale), extra_impls),
            (Setting("r=64", "4bit", r=64, **scale), extra_impls),
            (Setting("seq 4096", "bf16", **seq), extra_impls),
            (Setting("grad accum 4", "bf16", accum=4, **scale), extra_impls),
            (Setting("grad accum 4", "4bit", accum=4, **scale), extra_impls),
        ]
    return [(s, i) for s, i in out if s.bits in args.bits]


def markdown(results: list[Result], checks: list[dict], kernels: list[str], args: argparse.Namespace) -> str:
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bnb.__version__}, triton {kernels.triton.__version__ if kernels.triton else 'absent'}"
    )
    shape = "tiny shapes (smoke test)" if args.small else "Llama-3.1-8B layer shapes"
    lines = [
        SECTION,
        "",
        f"Measured with `scripts/bench_dora.py` on {dev} ({versions}).",
        f"Model: random-init Llama, {shape}, {args.layers} decoder layers, vocabulary {args.vocab}; adapters "
        "on q/k/v/o/gate/up/down, lora_alpha = 2r, dropout 0; AdamW; bf16 autocast; bf16 base, 8-bit "
        "(LLM.int8, threshold 6) or 4-bit (NF4, double quantization, bf16 compute). Step = forward + "
        f"backward (+ accumulation) + optimizer step; median of {args.steps} steps after {args.warmup} "
        "warm-up steps (spread = interquartile range; CPU ms = until the step's Python returns, before "
        "waiting for the GPU: close to the step time means the step is bound by the CPU); "
        "peak = `torch.cuda.max_memory_allocated` over the "
        "timed steps. Ratios are against peft LoRA in the same setting.",
        "",
        "| setting | base | implementation | step ms | spread ms | CPU ms | tokens/s | peak GiB | "
        "time ×LoRA | memory ×LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r.setting, r.bits): r for r in results if r.impl == "lora"}
    for r in results:
        lo = base.get((r.setting, r.bits))
        tr = f"{r.step_ms / lo.step_ms:.3f}" if lo else "–"
        mr = f"{r.peak_gib / lo.peak_gib:.3f}" if lo else "–"
        setting = next(s for s, _ in settings(args) if s.name == r.setting and s.bits == r.bits)
        desc = f"{r.setting} (r={setting.r}, {setting.batch}×{setting.seq}×{setting.accum})"
        lines.append(
            f"| {desc} | {r.bits} | {IMPLS[r.impl]} | {r.step_ms:.1f} | {r.spread_ms:.1f} | {r.cpu_ms:.1f} | "
            f"{r.tokens_per_s:,.0f} | {r.peak_gib:.2f} | {tr} | {mr} |"
        )
    lines += [
        "",
        "Correctness on the same device, before timing (same model and adapters, random non-zero B, "
        "batch 2×512, bf16 autocast; relative error ‖a − ref‖ / ‖ref‖ of the loss, the logits and the "
        "gradients of all A, B and magnitudes; the float32 reference runs the bf16-base model cast to "
        "float32, no autocast):",
        "",
        "| base | implementation | reference | loss | logits | grad A | grad B | grad m |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c['bits']} | {IMPLS[c['impl']]} | {c['ref']} | {c['loss']:.1e} | {c['logits']:.1e} | "
            f"{c.get('lora_A', float('nan')):.1e} | {c.get('lora_B', float('nan')):.1e} | "
            f"{c.get('lora_magnitude_vector', float('nan')):.1e} |"
        )
    if kernels:
        lines += [
            "",
            "Kernels, bf16, r=8, Triton against the PyTorch path: forward y = ax·b_effᵀ + scale·result in one "
            "pass, backward g·scale, B's gradient and Σ g·y / m in one pass (ax's gradient, a GEMM, in both); "
            "errors against float64 of y, g·scale and (B's, m's gradients):",
            "",
        ]
        lines += [f"- {k}" for k in kernels]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--json", type=Path, help="raw results as JSON")
    p.add_argument("--profile", type=Path, help="write the top kernels of one bf16 step per implementation")
    p.add_argument("--bits", nargs="+", default=["bf16", "8bit", "4bit"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--quick", action="store_true", help="main rows only")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=os.environ.get("FINLORA_CACHE_DIR", "~/.cache/finlora"))
    args = p.parse_args()

    work = tempfile.TemporaryDirectory()
    args.model_dir = Path(work.name)
    save_model(args)
    kernel_lines = kernel_check(args) if args.device == "cuda" and kernels.triton is not None else []
    for line in kernel_lines:
        print(line, flush=True)
    checks = []
    for bits in args.bits:
        checks += check(bits, args)
        free()
    for c in checks:
        print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in c.items()}, flush=True)
    if args.profile:
        impls = ["lora", "finlora"] if args.device == "cuda" else ["lora", "finlora-torch"]
        tables = []
        for bits in ("bf16", "4bit"):
            for impl in impls:
                tables.append(profile(bits, impl, args))
                free()
        args.profile.write_text("".join(tables))
    results = []
    for setting, impls in settings(args):
        for impl in impls:
            r = time_config(setting, impl, args)
            free()
            results.append(r)
            print(
                f"{r.setting:>13} {r.bits:>5} {r.impl:>14} {r.step_ms:8.1f} ms ±{r.spread_ms:5.1f} "
                f"cpu {r.cpu_ms:6.1f} {r.tokens_per_s:10,.0f} tok/s {r.peak_gib:6.2f} GiB",
                flush=True,
            )
    section = markdown(results, checks, kernel_lines, args)
    print(section)
    replace_section(args.out, section)
    if args.json:
        raw = {"results": [asdict(r) for r in results], "checks": checks}
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
