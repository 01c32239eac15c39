"""The code's shape: no import cycles inside the package, and every default written once (in the schema)."""

from __future__ import annotations

import ast
import copy
import dataclasses
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
