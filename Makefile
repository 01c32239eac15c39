# The few commands a newcomer needs. Each one sets up .venv first (a no-op when nothing changed).
.PHONY: setup quickstart test test-slow lint

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/python train.py experiment=quickstart

test: setup
	.venv/bin/python -m pytest -q

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check src tests scripts train.py
