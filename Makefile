# The few commands a newcomer needs. Each one sets up .venv first (a no-op when nothing changed); test-latest
# and lock install into venvs of their own.
.PHONY: setup quickstart test test-latest test-slow lint lock

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

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check src tests scripts train.py

# Regenerate constraints.txt (the lock) from the newest releases allowed; review its diff, then make test.
lock:
	bash scripts/lock.sh
