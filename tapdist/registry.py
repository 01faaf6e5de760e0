"""Named factories for models and FL algorithms, and the plugins that add to them.

The built-in model and algorithms register themselves on import; ``run.plugins`` names further
modules (or ``.py`` files) to import before a run, so a user's own model plugs in the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class RegistryError(LookupError):
    """A name is not registered, or a plugin cannot be imported."""


class Registry:
    """A mapping from names to factories, with errors that list what is there."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(factory: F) -> F:
            if name in self._factories and self._factories[name] is not factory:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return add

    def get(self, name: str) -> Callable:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "none"
            raise RegistryError(
                f"no {self.kind} named '{name}'; registered: {known}. A model "
                "or algorithm of your own is added by naming its module in "
                "run.plugins"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._factories)


MODELS = Registry("model")
ALGORITHMS = Registry("algorithm")


def load_builtins() -> None:
    """Register the built-in models and algorithms (imported here, not at package import)."""
    import tapdist.fl.algorithms  # noqa: F401
    import tapdist.models.federated  # noqa: F401


def load_plugins(specs: Iterable[str], base_dir: Path | None = None) -> None:
    """Import each plugin: a module name, or a ``.py`` path (relative to ``base_dir``)."""
    for spec in specs:
        try:
            _import(spec, base_dir)
        except RegistryError:
            raise
        except Exception as err:
            raise RegistryError(
                f"plugin '{spec}' failed to import: {type(err).__name__}: {err}"
            ) from err


def _import(spec: str, base_dir: Path | None) -> None:
    if not spec.endswith(".py"):
        importlib.import_module(spec)
        return
    path = Path(spec)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise RegistryError(
            f"plugin file {path} does not exist (run.plugins entries ending in "
            ".py are paths relative to the config file)"
        )
    name = f"tapdist_plugin_{path.stem}"
    if name in sys.modules:
        return
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
