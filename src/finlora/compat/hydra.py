"""OmegaConf internals: a resolver's view of its parent node. Checked on hydra-core 1.3.8 and omegaconf 2.3.1.
(The sweep planner expands a sweep with Hydra's public override API: `finlora.run.results.sweep_jobs`.)"""

from __future__ import annotations

from typing import Any


def grandparent(parent: Any) -> Any:
    """The node above a resolver's `_parent_` (`_get_parent`)."""
    return parent._get_parent()
