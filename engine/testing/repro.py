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

from ..models import Basket, LineItem
from ..money import Money
from .harnesses import CheersHarness, ForloyHarness, ReferenceHarness, RekonectHarness, SecuconnectHarness
from .lifecycle import At, LifecycleStateMachine
from .strategies import RawBasket, RawLine, Step

try:
    from txengine.providers.sandbox import Fault
except ImportError:  # pragma: no cover
    Fault = None  # type: ignore[assignment,misc]

_machine = LifecycleStateMachine.for_harness

ReferenceLifecycle = _machine(ReferenceHarness())
CheersLifecycle = _machine(CheersHarness())
RekonectLifecycle = _machine(RekonectHarness())
ForloyLifecycle = _machine(ForloyHarness())
ForloyOfflineLifecycle = _machine(ForloyHarness(offline=True), name="ForloyOfflineLifecycle")
SecuconnectLifecycle = _machine(SecuconnectHarness())

ReferenceAsyncLifecycle = _machine(ReferenceHarness(), engine_kind="async")
CheersAsyncLifecycle = _machine(CheersHarness(), engine_kind="async")
RekonectAsyncLifecycle = _machine(RekonectHarness(), engine_kind="async")
ForloyAsyncLifecycle = _machine(ForloyHarness(), engine_kind="async")
SecuconnectAsyncLifecycle = _machine(SecuconnectHarness(), engine_kind="async")

__all__ = [
    # values a printed step uses
    "At", "Basket", "Decimal", "Fault", "LineItem", "Money", "RawBasket", "RawLine", "Step", "datetime",
    # the machines
    "LifecycleStateMachine",
    "CheersLifecycle", "ForloyLifecycle", "ForloyOfflineLifecycle", "ReferenceLifecycle", "RekonectLifecycle",
    "SecuconnectLifecycle",
    "CheersAsyncLifecycle", "ForloyAsyncLifecycle", "ReferenceAsyncLifecycle", "RekonectAsyncLifecycle",
    "SecuconnectAsyncLifecycle",
]
