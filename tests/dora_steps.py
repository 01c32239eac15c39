"""finlora's DoRA under the adapter-step protocol for the tests of the generic step code (`finlora.compiled`,
`finlora.capture`), where `finlora.dora` has not registered itself. Nothing is added where an adapter is registered
already, so these tests run the adapter's own registration once it has one."""

from __future__ import annotations

import pytest

from finlora import adapter_steps, dora


class DoraSteps(adapter_steps.AdapterSteps):
    def before_recording(self, model):
        dora.forget_norms(model)

    def compiled_step(self, model, in_place):
        return dora.fresh_norms(model, in_place=in_place)


def register_dora_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """For one test: `DoraSteps` registered if nothing is (the registry as it was afterwards)."""
    registry = adapter_steps._registered
    if not registry and hasattr(dora, "fresh_norms"):
        monkeypatch.setitem(registry, "dora", DoraSteps())
