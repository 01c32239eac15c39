"""transformers internals: the input-gradients hook of a model. Checked on transformers 5.17, 5.24 and 5.25."""

from __future__ import annotations

from typing import Any


def input_grads_enabled(model: Any) -> bool:
    """Whether `enable_input_require_grads` left its hook on the input embeddings (`_require_grads_hook`), which
    `disable_input_require_grads` removes."""
    return getattr(model, "_require_grads_hook", None) is not None
