"""Hydra and OmegaConf internals: the basic sweeper's expansion of a sweep into jobs, and a resolver's view of its
parent node. Checked on hydra-core 1.3.8 and omegaconf 2.3.1."""

from __future__ import annotations

from typing import Any


def sweep_jobs(overrides: list[Any]) -> list[list[str]]:
    """The jobs, as override strings in Hydra's order, that the basic sweeper runs for parsed `overrides`
    (`hydra._internal.core_plugins.basic_sweeper.BasicSweeper.split_arguments`, one batch)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(overrides, None)[0]


def grandparent(parent: Any) -> Any:
    """The node above a resolver's `_parent_` (`_get_parent`)."""
    return parent._get_parent()
