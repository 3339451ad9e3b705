"""Where the kit finds provider harnesses without importing any provider.

A provider package registers its harness under the entry point group
``txengine.harnesses`` (``name = "package.module:factory"``, the factory called with no
arguments returns a ``ProviderHarness``); txengine's own providers do so in
pyproject.toml.  A POS team can do the same in its own package, or call
``register_harness`` in its conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .harness import ProviderHarness

ENTRY_POINT_GROUP = "txengine.harnesses"

_registered: dict[str, Callable[[], ProviderHarness]] = {}


def register_harness(name: str, factory: Callable[[], ProviderHarness]) -> None:
    """Make ``factory()`` the harness called ``name`` (overrides an entry point of that name)."""
    _registered[name] = factory


def _factories() -> dict[str, Callable[[], ProviderHarness]]:
    found: dict[str, Callable[[], ProviderHarness]] = {
        point.name: point.load for point in entry_points(group=ENTRY_POINT_GROUP)}
    found = {name: (lambda load=load: load()()) for name, load in found.items()}
    return {**found, **_registered}


def harness_names() -> list[str]:
    """Every registered harness's name, sorted."""
    return sorted(_factories())


def load_harness(name: str) -> ProviderHarness:
    """A new instance of the harness registered as ``name``."""
    factories = _factories()
    if name not in factories:
        known = ", ".join(sorted(factories)) or "none (is the package installed?)"
        raise LookupError(f"no harness registered as {name!r}; known: {known}")
    return factories[name]()


def machine_name(name: str, engine_kind: str = "sync") -> str:
    """The lifecycle machine's class name for a harness name: ``forloy-offline`` -> ``ForloyOfflineLifecycle``."""
    title = "".join(part.title() for part in name.replace("_", "-").split("-"))
    return f"{title}{'Async' if engine_kind == 'async' else ''}Lifecycle"
