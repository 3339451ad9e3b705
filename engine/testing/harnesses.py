"""The harnesses registered with the kit (see ``txengine.testing.registry``).

txengine's providers register theirs as entry points (``txengine.providers.<name>.harness``);
this module only looks them up, so the kit never imports a provider itself.
"""

from __future__ import annotations

from .harness import ProviderHarness
from .registry import harness_names, load_harness


def bundled() -> tuple[ProviderHarness, ...]:
    """A fresh instance of every registered harness, in name order."""
    return tuple(load_harness(name) for name in harness_names())
