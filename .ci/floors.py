"""Print a pip constraints file pinning each direct dependency to its declared floor.

    python .ci/floors.py [pyproject.toml] > floors.txt

Reads ``[project].dependencies`` of ``pyproject.toml`` and writes ``name==version`` for
every ``>=`` bound (extras dropped: ``dask[array]>=2026.8.0`` gives ``dask==2026.8.0``).
A dependency without a ``>=`` bound is an error: its floor would not be tested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9._-]+)(\[[^\]]*\])?\s*(.*)$")


def floors(pyproject: Path) -> list[str]:
    """``name==floor`` for each direct dependency of ``pyproject``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        match = _REQUIREMENT.match(requirement.split(";")[0])
        if match is None:
            raise SystemExit(f"cannot read the requirement {requirement!r}")
        name, _, spec = match.groups()
        lower = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
        if not lower:
            raise SystemExit(f"{requirement!r} declares no floor (>=): it cannot be tested")
        pins.append(f"{name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    print("\n".join(floors(path)))
