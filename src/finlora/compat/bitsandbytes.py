"""bitsandbytes internals finlora reads: an 8-bit layer's int8 rows and scales. Checked on bitsandbytes 0.50.2."""

from __future__ import annotations

from torch import nn


def drop_stale_int8_rows(module: nn.Module) -> None:
    """Drop an 8-bit weight's `CB` left without its `SCB` while the layer's state holds the scales
    (`Int8Params.CB`/`SCB`, `MatmulLtState.SCB`): `Int8Params.to` sets CB again but not SCB, and the next forward's
    `init_8bit_state` would overwrite the good state with SCB=None."""
    w = module.weight
    if getattr(w, "CB", None) is not None and getattr(w, "SCB", None) is None and module.state.SCB is not None:
        w.CB = None
