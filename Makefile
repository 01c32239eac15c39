# The few commands a newcomer needs. Each one sets up .venv first (a no-op when nothing changed); test-latest
# and lock install into venvs of their own.
.PHONY: setup quickstart test test-latest test-slow test-gpu gpu-bundle lint lock

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/python train.py experiment=quickstart

test: setup
	.venv/bin/python -m pytest -q

# The fast suite in .venv-latest, with the newest releases pyproject.toml allows (torch still the lock's unless
# TORCH_SPEC): first which packages differ from the lock, then a release that breaks finlora fails a named test.
test-latest:
	FINLORA_VENV=.venv-latest FINLORA_LOCK= bash scripts/setup.sh
	.venv-latest/bin/python scripts/lock_diff.py
	.venv-latest/bin/python -m pytest -q --ignore=tests/test_install.py

# On a GPU machine: the GPU tests and a train.py + eval.py smoke matrix, to docs/gpu_gate.json (scripts/gpu_gate.py).
test-gpu: setup
	.venv/bin/python scripts/gpu_gate.py --parallel 4

# .gpu/: what a bare GPU image lacks (wheels, the embedded model's config and tokenizer, data), to carry there.
gpu-bundle: setup
	bash scripts/gpu_bundle.sh

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check src tests scripts train.py

# Regenerate constraints.txt (the lock) from the newest releases allowed; review its diff, then make test.
lock:
	bash scripts/lock.sh
