"""`finlora.config` as a package: its enums import nothing else, every name is importable from the package, and the
first schema name read from it registers the schemas that conf/*.yaml compose into."""

from __future__ import annotations

import subprocess
import sys

import finlora.config

PROBE = """
import sys
import finlora.config.enums
from finlora.config import AdapterMethod, Compile
heavy = sorted(m for m in ("hydra", "omegaconf", "torch", "finlora.config.schema") if m in sys.modules)
from hydra.core.config_store import ConfigStore
before = "train_schema.yaml" in ConfigStore.instance().repo
from finlora.config import ModelConfig
print(heavy, before, "train_schema.yaml" in ConfigStore.instance().repo)
"""


def test_enums_import_without_the_schema_and_a_schema_name_registers_it():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False", "True"]


def test_every_name_is_importable_from_the_package():
    for name in finlora.config.__all__:
        assert getattr(finlora.config, name) is not None, name
    assert set(finlora.config.__all__) <= set(dir(finlora.config))
    assert finlora.config.Config.__module__ == "finlora.config.schema"
