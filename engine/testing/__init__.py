"""txengine's property-testing kit: what a POS team needs to test its own driver.

    from txengine.testing import LifecycleStateMachine, ProviderHarness, check_driver

- ``strategies`` (also importable as ``txengine.testing.strategies``): hypothesis
  strategies for money in any currency, line items, baskets (valid, huge, and hostile
  ones that must be refused), customer keys and command sequences;
- ``ProviderHarness``: the adapter that tells the suites how to build, reach and read
  one provider (sandbox, driver, customers, ledger, fault targets); harnesses for the
  reference provider and the four real ones ship in ``txengine.testing.harnesses``;
- ``LifecycleStateMachine``: every command, legal and illegal, with deadlines, faults,
  crashes and restarts, checking LIFECYCLE.md's invariants after every step;
- ``check_driver`` / ``assert_conformant`` (``txengine.testing.conformance``): does a driver
  tell the truth about its capabilities, commit once on retry, keep its idempotency keys?

``FakeClock`` is re-exported: tests move time, they never sleep.  A failing run prints a
program that reproduces it; ``from txengine.testing.repro import *`` imports every name
such a program uses.  See docs/testing-kit.md.
"""

from ..clock import FakeClock
from . import strategies
from .conformance import Finding, assert_conformant, check_driver
from .harness import ProviderHarness, SandboxTransport, SimulatedCrash, SQLiteStores, StoreFactory
from .harnesses import CheersHarness, ForloyHarness, ReferenceHarness, RekonectHarness, SecuconnectHarness
from .lifecycle import At, InvariantViolation, LifecycleStateMachine
from .strategies import (
    RawBasket,
    RawLine,
    Step,
    baskets,
    card_numbers,
    command_sequences,
    currencies,
    hostile_baskets,
    hostile_customer_tokens,
    hostile_idempotency_keys,
    hostile_lines,
    huge_baskets,
    line_items,
    money,
    phone_numbers,
    product_names,
    transaction_keys,
)

__all__ = [
    "At", "CheersHarness", "FakeClock", "Finding", "ForloyHarness", "InvariantViolation", "LifecycleStateMachine",
    "ProviderHarness", "RawBasket", "RawLine", "ReferenceHarness", "RekonectHarness", "SQLiteStores",
    "SandboxTransport", "SecuconnectHarness", "SimulatedCrash", "Step", "StoreFactory", "assert_conformant",
    "baskets", "card_numbers", "check_driver", "command_sequences", "currencies", "hostile_baskets",
    "hostile_customer_tokens", "hostile_idempotency_keys", "hostile_lines", "huge_baskets", "line_items",
    "money", "phone_numbers", "product_names", "strategies", "transaction_keys",
]
