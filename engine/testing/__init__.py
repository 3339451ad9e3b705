"""txengine's property-testing kit: what a POS team needs to test its own driver.

    from txengine.testing import LifecycleStateMachine, ProviderHarness, check_driver

- ``strategies`` (also importable as ``txengine.testing.strategies``): hypothesis
  strategies for money in any currency, line items, baskets (valid, huge, and hostile
  ones that must be refused), customer keys and command sequences;
- ``ProviderHarness``: the adapter that tells the suites how to build, reach and read
  one provider (sandbox, driver, customers, ledger, fault targets); each provider
  registers its own (``txengine.testing.registry``: ``load_harness("cheers")``);
- ``LifecycleStateMachine``: every command, legal and illegal, with deadlines, faults,
  crashes and restarts, checking LIFECYCLE.md's invariants after every step;
- ``check_driver`` / ``assert_conformant`` (``txengine.testing.conformance``): does a driver
  tell the truth about its capabilities, commit once on retry, keep its idempotency keys?

``FakeClock`` is re-exported: tests move time, they never sleep.  A failing run prints a
program that reproduces it; ``from txengine.testing.repro import *`` imports every name
such a program uses.  See docs/testing-kit.md.

``txengine.testing.sandbox`` (the sandbox toolkit and its fault vocabulary) needs no
hypothesis: provider sandboxes import it with only the ``sandbox`` extra installed.  The
names below are therefore loaded on first use, not when the package is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_HOMES = {
    "FakeClock": "txengine.clock",
    "Finding": ".conformance", "assert_conformant": ".conformance", "check_driver": ".conformance",
    "ProviderHarness": ".harness", "SandboxTransport": ".harness", "SimulatedCrash": ".harness",
    "SQLiteStores": ".harness", "StoreFactory": ".harness", "deterministic_key": ".harness",
    "CallableStores": ".harness", "as_store_factory": ".harness",
    "At": ".lifecycle", "InvariantViolation": ".lifecycle", "LifecycleStateMachine": ".lifecycle",
    "harness_names": ".registry", "load_harness": ".registry", "register_harness": ".registry",
    "register_profiles": ".profiles",
    **{name: ".strategies" for name in (
        "RawBasket", "RawLine", "Step", "baskets", "card_numbers", "command_sequences", "currencies",
        "hostile_baskets", "hostile_customer_tokens", "hostile_idempotency_keys", "hostile_lines",
        "huge_baskets", "line_items", "money", "phone_numbers", "product_names", "transaction_keys")},
}
_SUBMODULES = {"conformance", "harness", "harnesses", "lifecycle", "oracle", "profiles", "registry", "repro",
               "sandbox", "strategies"}

__all__ = sorted([*_HOMES, "strategies"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
