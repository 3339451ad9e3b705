"""Every name a reproduction printed by ``LifecycleStateMachine`` uses.

A failing run prints a program; under ``from txengine.testing.repro import *`` (plus your
own machine class, if it is not one of these) it runs as is::

    from txengine.testing.repro import *

    def test_regression():
        state = ReferenceLifecycle()
        tx_0 = state.preview(basket=Basket([LineItem('beer', 'Beer', 3, Money(500, 'EUR'), 27)]),
                             customer='regular', idempotency_key=None, payment_type='SPLIT_PAYMENT')
        state.finalize(idempotency_key=None, tx=tx_0)
        state.teardown()

The machines for the bundled harnesses are defined here, named as they print.
"""

import datetime
from decimal import Decimal
from typing import Any

from ..models import Basket, LineItem
from ..money import Money
from .lifecycle import At, LifecycleStateMachine
from .registry import harness_names, load_harness, machine_name
from .sandbox import Fault
from .strategies import RawBasket, RawLine, Step

_machines: dict[str, type[LifecycleStateMachine]] = {}


def _machine_names() -> dict[str, tuple[str, str]]:
    """Every registered harness's machine name -> (harness name, engine kind)."""
    return {machine_name(name, kind): (name, kind) for name in harness_names() for kind in ("sync", "async")}


def __getattr__(name: str) -> Any:
    """``ReferenceLifecycle``, ``ForloyOfflineLifecycle``, ``CheersAsyncLifecycle``...: built on first use
    from the registered harnesses, so a printed reproduction's machine name always resolves."""
    if name not in _machines:
        known = _machine_names()
        if name not in known:
            raise AttributeError(f"no machine {name!r}: no harness registered for it (known: {sorted(known)})")
        harness, kind = known[name]
        _machines[name] = LifecycleStateMachine.for_harness(load_harness(harness), engine_kind=kind, name=name)
    return _machines[name]


__all__ = [
    # values a printed step uses
    "At", "Basket", "Decimal", "Fault", "LineItem", "Money", "RawBasket", "RawLine", "Step", "datetime",
    "LifecycleStateMachine",
    # the machines, one per registered harness and engine kind
    *sorted(_machine_names()),
]
