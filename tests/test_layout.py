"""The code's shape: no import cycles inside the package, every default written once (in the schema), modules and
functions of a readable size, adapters reached through one protocol, private third-party APIs in one folder."""

from __future__ import annotations

import ast
import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, compose_cfg
from omegaconf import OmegaConf

from finlora.config import Config, EvalConfig, ExportConfig, PredictConfig

PACKAGE = ROOT / "src" / "finlora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_cycle_finder_finds_one():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_the_package():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    assert len(graph) > 10 and graph["finlora.train"]
    assert import_cycle(graph) is None, f"import cycle: {' -> '.join(import_cycle(graph))}"


# Each config group's schema: the field of the primary schema it fills (conf/hydra is Hydra's own).
SCHEMA = {name: type(getattr(Config(), name)) for name in ("model", "quant", "adapter", "task", "trainer", "logger",
                                                              "paths")}


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _own_values(path: Path) -> dict[str, Any]:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    raw.pop("defaults", None)
    return raw


def _repeats(baseline: Any, path: Path) -> list[str]:
    """Keys `path` sets to the value `baseline` (a typed config) already has, compared after the schema's
    conversion (so `nf4` equals the enum, `16` equals 16.0); in lists of typed entries (a task's test sets),
    each entry's keys against the entry schema's defaults."""
    return _same(baseline, _own_values(path), path.name)


def _same(baseline: Any, values: dict, where: str) -> list[str]:
    same = []
    before = OmegaConf.to_container(baseline, resolve=False)
    for key, value in _leaves(values).items():
        parent = key.rpartition(".")[0]
        if parent and OmegaConf.select(baseline, parent) is None:
            continue  # under a field whose default is None (a task entry's `source`): set, so never a repeat
        updated = copy.deepcopy(baseline)
        OmegaConf.update(updated, key, value, merge=True)
        if OmegaConf.to_container(updated, resolve=False) == before:
            same.append(f"{where}: {key}: {value}")
        entry = OmegaConf.select(baseline, key)._metadata.element_type if isinstance(value, list) else None
        if dataclasses.is_dataclass(entry):
            for i, item in enumerate(value):
                same += _same(OmegaConf.structured(entry), item, f"{where}: {key}[{i}]")
    return same


def _group_files() -> list[tuple[str, Path]]:
    return [(group, path) for group in SCHEMA for path in sorted((ROOT / "conf" / group).glob("*.yaml"))]


@pytest.mark.parametrize("group,path", _group_files(), ids=lambda x: getattr(x, "name", x))
def test_group_files_hold_only_what_differs_from_the_schema(group, path):
    baseline = OmegaConf.structured(SCHEMA[group])
    for parent in (OmegaConf.load(path).get("defaults") or []):
        if parent != "_self_":
            baseline = OmegaConf.merge(baseline, _own_values(path.parent / f"{parent}.yaml"))
    assert _repeats(baseline, path) == []


@pytest.mark.parametrize("name,schema", [("train", Config), ("eval", EvalConfig), ("export", ExportConfig),
                                         ("predict", PredictConfig)])
def test_primary_files_hold_only_what_differs_from_the_schema(name, schema):
    assert _repeats(OmegaConf.structured(schema), ROOT / "conf" / f"{name}.yaml") == []


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiments_hold_only_what_differs_from_their_groups(path, tmp_path):
    """Against the config their group choices compose to without them."""
    choices = [f"{k.split('/')[-1]}={v}" for d in OmegaConf.load(path).defaults for k, v in d.items()]
    baseline = compose_cfg(choices, tmp_path)
    assert _repeats(baseline, path) == []


def test_the_check_sees_a_repeated_default(tmp_path):
    (tmp_path / "repeat.yaml").write_text("r: 8\nalpha: 32\nimpl: finlora\ntarget_modules: [q_proj, k_proj, v_proj]\n")
    found = _repeats(OmegaConf.structured(SCHEMA["adapter"]), tmp_path / "repeat.yaml")
    assert found == ["repeat.yaml: r: 8", "repeat.yaml: impl: finlora",
                     "repeat.yaml: target_modules: ['q_proj', 'k_proj', 'v_proj']"]


# The code's size and reach (issue 35): what a newcomer can read, and what a new release of a dependency can break.
MAX_LINES = 400
GENERIC_STEP_CODE = ("finlora.capture", "finlora.module", "finlora.evaluate")
# Names with a leading underscore that are public all the same: os._exit (documented), Hydra's config keys.
PUBLIC_UNDERSCORED = {"_exit", "_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


def _package_files(outside_compat: bool = False) -> dict[str, Path]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {n: p for n, p in files.items() if not (outside_compat and n.startswith("finlora.compat"))}


def test_no_module_over_400_lines():
    long = {name: n for name, path in _package_files().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_function_over_cyclomatic_complexity_15():
    """Measured by ruff's mccabe rule (C901), the same check `make lint` runs (pyproject.toml sets the limit)."""
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "concise",
                           "--config", "lint.mccabe.max-complexity=15", str(PACKAGE)], capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr


def test_the_generic_step_code_imports_no_adapter():
    files = _package_files()
    for name in GENERIC_STEP_CODE:
        for module, path in files.items():
            if module == name or module.startswith(name + "."):
                adapters = {m for m in _imports(path, set(files)) if m.startswith("finlora.dora")}
                assert not adapters, f"{module} imports {adapters}: it reaches adapters through finlora.adapter_steps"


def _private_uses(path: Path) -> list[str]:
    """Where `path` names a private API: `x._name` (or getattr/hasattr/setattr of "_name") on anything but
    self/cls, a `__class__` assignment, or an import of a module or name with a leading underscore from outside
    finlora."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr not in PUBLIC_UNDERSCORED:
            dunder = node.attr.startswith("__") and node.attr.endswith("__")
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            swap = node.attr == "__class__" and isinstance(node.ctx, ast.Store)
            if (not dunder and not own) or swap:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_") \
                and not str(node.args[1].value).startswith("__"):
            found.append(f"{path.name}:{node.lineno}: {node.func.id}(…, {node.args[1].value!r})")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and not node.module.startswith("finlora"):
            names = [*node.module.split("."), *(a.name for a in node.names)]
            if any(n.startswith("_") and not n.startswith("__") for n in names):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                      if any(part.startswith("_") for part in a.name.split("."))]
    return found


def test_private_use_finder_finds_them():
    sample = PACKAGE.parent.parent / "tests" / "fixtures" / "private_uses.py"
    found = _private_uses(sample)
    expected = [".__class__", "._dynamo", "from torch._dynamo.utils import ...", "getattr(…, '_hook')",
                "import torch._dynamo"]
    assert sorted(f.split(": ", 1)[1] for f in found) == expected, found


def test_no_private_third_party_api_outside_compat():
    uses = [use for path in _package_files(outside_compat=True).values() for use in _private_uses(path)]
    assert not uses, "private APIs named outside finlora/compat: " + "; ".join(uses)
