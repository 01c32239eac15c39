"""Checks shared by the config sections: the problem collector, token leaks, run names, saved adapters, paths."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

EMBEDDED_PREFIX = "embedded:"


EMBEDDED_MODELS = ("smollm2-135m-instruct",)


SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


TOKEN_PATTERNS = (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
                  re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{40}(?![0-9A-Za-z])"))  # W&B API key


COMMIT_KEYS = ("model.revision",)  # a 40-hex value there is a commit hash, not a W&B key


# A run folder's name ends in run_name: one folder name, no separators or dots to climb out of outputs/runs/
RUN_NAME = re.compile(r"[A-Za-z0-9_+=,:@-][A-Za-z0-9._+=,:@-]{0,127}")


SEED_MAX = 2**32 - 1  # numpy's seeds, which Lightning's seed_everything sets too


def check(problems: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append(f"{key}: {message}")


def token_problems(node: Any, key: str = "") -> list[str]:
    """Config values that hold a token (one of SECRET_ENV's values, or shaped like one): tokens are read from
    the environment only, never from the config, which is saved to the run folder and logged to W&B."""
    if isinstance(node, dict):
        return [p for name, value in node.items() for p in token_problems(value, f"{key}.{name}".lstrip("."))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in token_problems(value, f"{key}[{i}]")]
    secrets = [os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 8]
    text = str(node)
    patterns = TOKEN_PATTERNS[:1] if key in COMMIT_KEYS else TOKEN_PATTERNS
    leaked = any(p.search(text) for p in patterns) or any(s in text for s in secrets)
    return [f"{key}: looks like a token; set it in the environment ({', '.join(SECRET_ENV)})"] if leaked else []


def flat(node: dict, key: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}; lists and empty sections are values."""
    out: dict[str, Any] = {}
    for name, value in node.items():
        full = f"{key}.{name}" if key else name
        out |= flat(value, full) if isinstance(value, dict) and value else {full: value}
    return out


def looks_like_path(name: str) -> bool:
    """A hub id is `org/name`; anything absolute, relative-dotted, home-based or present on disk is a path."""
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1


def run_name_problems(name: str) -> list[str]:
    problems: list[str] = []
    check(problems, bool(RUN_NAME.fullmatch(name)), "run_name",
           "must be 1 to 128 of the characters A-Z a-z 0-9 . _ - + = , : @ (one folder name, not starting with "
           f"a dot), got {name[:60]!r}" + (f"… ({len(name)} characters)" if len(name) > 60 else ""))
    return problems


def saved_adapter_problems(adapter_path: str | None, merge: bool, bits: int | None) -> list[str]:
    """`adapter_path` and `merge` of eval.py and predict.py."""
    problems: list[str] = []
    if adapter_path is not None:
        check(problems, (Path(adapter_path) / "adapter_config.json").is_file(), "adapter_path",
               f"{adapter_path!r} is not a saved adapter (no adapter_config.json)")
    check(problems, not merge or adapter_path is not None, "merge", "merging needs an adapter_path")
    check(problems, not (merge and bits), "merge", "merging into quantized weights loses precision; use quant=none "
           "to merge")
    return problems
