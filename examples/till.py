"""The smallest POS: one sale through the sync ``Engine``, every result typed.

``tests/test_examples.py`` type-checks this file with ``mypy --strict``; the
``assert_type`` lines fail that check if txengine's public API ever answers ``Any``.
"""

from __future__ import annotations

from datetime import datetime
from typing import assert_type

from txengine import (AsyncEngine, Basket, Engine, Event, FakeClock, LineItem, Money, ReceiptLine, Transaction,
                      TxEvent, TxState)
from txengine.errors import EngineError, OutcomeUnknown
from txengine.providers.cheers import CheersDriver


def sell(engine: Engine, qr_key: str, till_key: str) -> Transaction:
    basket = Basket([LineItem("f04ce0c0", "Draft Beer 0.5L", 3, Money.of("500", "HUF"), 27)])
    tx = assert_type(engine.preview("cheers", basket, customer_token=qr_key, idempotency_key=till_key), Transaction)
    tx = assert_type(engine.update(tx.id, [LineItem(None, "Tip", 1, Money.of("100", "HUF"), 0)]), Transaction)
    if tx.outstanding:
        tx = engine.begin_payment(tx.id)
    try:
        return engine.finalize(tx.id)
    except OutcomeUnknown:
        engine.recover()
        return engine.get(tx.id)


def inspect(engine: Engine, tx: Transaction) -> list[TxEvent]:
    assert_type(tx.state, TxState)
    assert_type(tx.state == "finalized", bool)  # a StrEnum still compares with its string
    assert_type(tx.pending, TxEvent | None)
    assert_type(tx.expires_at, datetime | None)
    assert_type(tx.total_credits, Money)
    assert_type(engine.history(tx.id), list[Event])
    assert_type(engine.expire_due(), int)
    return assert_type(engine.allowed_events(tx.id), list[TxEvent])


def print_receipt(tx: Transaction) -> list[str]:
    """The provider's lines, then the till's own: a list goes wherever a tuple is kept."""
    own = ReceiptLine("name-value", name="To pay", value=str(tx.outstanding), decoration=["important"])
    return [line.render() for line in (*tx.receipt, own)]


async def sell_async(engine: AsyncEngine, qr_key: str) -> Transaction:
    basket = Basket([LineItem(None, "Espresso", 1, Money(350, "EUR"), 19)])
    tx = await engine.preview("cheers", basket, customer_token=qr_key)
    return assert_type(await engine.cancel(tx.id), Transaction)


def main() -> None:
    driver = CheersDriver(api_key="terminal-key", environment="sandbox")
    engine = assert_type(Engine.open("sqlite:///till.db", providers={"cheers": driver}, clock=FakeClock()), Engine)
    aengine = assert_type(AsyncEngine.open("sqlite:///till.db", providers={"cheers": driver}), AsyncEngine)
    try:
        inspect(engine, sell(engine, "5ccd" * 8, "till-1"))
    except EngineError as error:
        print(type(error).__name__, error.tx_id, error)
    finally:
        engine.close()
        del aengine
