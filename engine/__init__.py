"""txengine: an explicit, durable transaction state-machine engine for loyalty payments.

    from txengine import Engine, Basket, LineItem, Money, FakeClock
"""

import logging

from .aio import AsyncEngine
from .clock import Clock, FakeClock, SystemClock
from .drivers import Capabilities, HttpDriver, PreviewRequest, ProviderDriver
from .engine import Engine
from .machine import PaymentLifecycle, TimerPolicy, TxEvent, TxState
from .models import Basket, Event, LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from .money import Money
from .secret import Secret

__all__ = [
    "AsyncEngine", "Basket", "Capabilities", "Clock", "Engine", "Event", "FakeClock", "HttpDriver",
    "LineItem", "Money", "Outcome", "PaymentLifecycle", "PreviewRequest", "PricedLine",
    "ProviderDriver", "Quote", "ReceiptLine", "Secret", "SystemClock", "TimerPolicy", "Transaction",
    "TxEvent", "TxState",
]

# A library logs, the application decides where to: without this, Python would print
# every warning (an unknown outcome, say) on the POS's stderr when it configured none.
logging.getLogger("txengine").addHandler(logging.NullHandler())
