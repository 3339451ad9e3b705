"""secuconnect through the engine: whole POS sessions against the sandbox, sync and async.

What a POS would notice: the card balance applied and redeemed exactly once, the
receipt lines on the transaction (card number masked), refunds returning the balance,
expired previews released at the provider, and the card number nowhere in the database.
"""

from __future__ import annotations

import asyncio
import pytest

from txengine import AsyncEngine, Engine, LineItem, Money
from txengine.errors import (
    OutcomeUnknown,
    PreviewExpired,
    ProviderRejected,
    RefundWindowClosed,
    TransactionInDoubt,
)
from txengine.models import ReceiptLine
from txengine.testing.sandbox import Fault
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
from txengine.providers.secuconnect import driver as secu
from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ERRORS
from tests.conftest import BlockingView

from tests.providers.test_secuconnect_contract import FRUIT_SALAD, SANDWICH, SEED_CARD, WATER
from tests.providers.test_secuconnect_contract import MASKED_CARD as MASKED

POOR_CARD = "9276000000000025"
SEED_BASKET = [SANDWICH, FRUIT_SALAD, WATER]
TIP = LineItem(None, "Tip", 1, Money(100, "EUR"), 0)


@pytest.fixture
def sandbox(clock) -> SecuconnectSandbox:
    sandbox = SecuconnectSandbox(clock)  # the seed's card with 10,00 EUR
    sandbox.add_card(POOR_CARD, cash_balance=500)
    return sandbox


@pytest.fixture
def driver(sandbox, clock) -> SecuconnectDriver:
    return SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                             transport=sandbox.transport())


@pytest.fixture(params=["sync", "async"])
def pos(request, db_url, driver, clock):
    if request.param == "sync":
        with Engine.open(db_url, providers={"secuconnect": driver}, clock=clock) as engine:
            yield engine
    else:
        view = BlockingView(AsyncEngine.open(db_url, providers={"secuconnect": driver}, clock=clock))
        yield view
        view.close()


@pytest.fixture
def engine(db_url, driver, clock):
    with Engine.open(db_url, providers={"secuconnect": driver}, clock=clock) as engine:
        yield engine


def operations(sandbox) -> list[str]:
    """The provider calls made so far (tokens left out): create, GET stx, start/cash..."""
    names = []
    for request in sandbox.requests:
        if request.path == secu.TOKEN_PATH:
            continue
        rest = request.path.removeprefix(secu.TRANSACTIONS_PATH)
        action = rest.strip("/").split("/")[1:]  # what follows the transaction id
        names.append("create" if not rest else "/".join(action) if action else f"{request.method} stx")
    return names


# --- whole sessions ----------------------------------------------------------------------------------


def test_a_session_the_card_covers_finalizes_with_loyalty_and_keeps_the_receipt(pos, sandbox):
    tx = pos.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD, idempotency_key="p1")
    assert tx.state == "previewed" and tx.provider_ref.startswith("STX_")
    assert (tx.total_credits, tx.outstanding) == (Money(796, "EUR"), Money(0, "EUR"))
    assert tx.details["card_masked"] == MASKED and tx.receipt == ()

    tx = pos.finalize(tx.id)

    assert tx.state == "finalized"
    assert sandbox.card_balance(SEED_CARD) == 204
    assert operations(sandbox) == ["create", "preTransaction", "GET stx", "start/loyalty"]
    trans_id = tx.details["trans_id"]
    assert tx.receipt == (
        ReceiptLine("separator", text="Kundenkarte"),
        ReceiptLine("name-value", name="Kartennummer: ", value=MASKED),
        ReceiptLine("name-value", name="TA Code: ", value=trans_id),
        ReceiptLine("space"),
        ReceiptLine("textline", text="Umsatz erfasst:"),
        ReceiptLine("textline", text="7,96 EUR", decoration=("important",)),
        ReceiptLine("space"),
        ReceiptLine("textline", text="Guthaben eingelöst:"),
        ReceiptLine("textline", text="7,96 EUR", decoration=("important",)),
        ReceiptLine("space"),
        ReceiptLine("textline", text="Aktuelles Guthaben"),
        ReceiptLine("textline", text="2,04 EUR", decoration=("important",)),
    )
    assert tx.details["loyalty_transaction_id"] == sandbox.loyalty_transactions[0].id
    assert tx.details["payment_method"] == "loyalty"
    assert pos.get(tx.id) == tx


def test_a_split_session_collects_the_missing_sum_and_redeems_the_whole_card(pos, sandbox):
    tx = pos.preview("secuconnect", SEED_BASKET, customer_token=POOR_CARD)
    assert [(line.credits.amount_minor, line.outstanding.amount_minor) for line in tx.items] == [
        (349, 0), (151, 98), (0, 198)]
    calls = len(sandbox.requests)

    tx = pos.begin_payment(tx.id)  # the cashier takes 2,96 EUR: nothing is sent
    assert tx.state == "payment_pending" and len(sandbox.requests) == calls

    tx = pos.finalize(tx.id)
    assert tx.state == "finalized" and tx.details["payment_method"] == "cash"
    assert tx.details["missing_sum"] == 296
    assert sandbox.card_balance(POOR_CARD) == 0


def test_the_seeds_cash_sale_puts_the_seeds_receipt_on_the_transaction(pos, sandbox):
    """EXTERNAL_PAYMENT is the seed's flow: start/cash on a card whose balance is not applied."""
    tx = pos.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD, payment_type="EXTERNAL_PAYMENT")
    assert (tx.total_credits, tx.outstanding) == (Money(0, "EUR"), Money(796, "EUR"))
    tx = pos.finalize(pos.begin_payment(tx.id).id)

    assert operations(sandbox) == ["create", "GET stx", "start/cash"]
    assert [line.render() for line in tx.receipt] == [
        "------------- Kundenkarte --------------",
        f"Kartennummer:{MASKED:>27}",  # name left, value right, 40 columns
        f"TA Code:{tx.details['trans_id']:>32}",
        "",
        "Umsatz erfasst:",
        "7,96 EUR",
        "",
        "Aktuelles Guthaben",
        "10,00 EUR",
    ]
    assert sandbox.card_balance(SEED_CARD) == 1000


def test_a_tip_added_after_the_preview_is_priced_by_the_provider(pos, sandbox):
    tx = pos.preview("secuconnect", SEED_BASKET, customer_token=POOR_CARD)
    tx = pos.update(tx.id, [TIP])

    assert tx.state == "updated"
    assert [line.name for line in tx.items] == [item.name for item in SEED_BASKET] + ["Tip"]
    assert tx.outstanding == Money(396, "EUR") and tx.total_credits == Money(500, "EUR")
    assert operations(sandbox)[-2:] == ["PUT stx", "preTransaction"]
    assert sandbox.smart_transaction(tx.provider_ref)["basket_info"]["sum"] == 896
    assert tx.details["card_id"]  # kept from the preview through the update

    tx = pos.finalize(tx.id)
    assert sandbox.smart_transaction(tx.provider_ref)["basket_info"]["missing_sum"] == 396


def test_cancel_aborts_at_the_provider(pos, sandbox):
    tx = pos.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    tx = pos.cancel(tx.id)
    assert tx.state == "cancelled"
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"
    assert sandbox.card_balance(SEED_CARD) == 1000


def test_a_refund_returns_the_balance_and_stores_the_reversal_receipt(pos, sandbox, clock):
    tx = pos.finalize(pos.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD).id)
    clock.advance(hours=23)
    tx = pos.refund(tx.id, comment="Customer returned the order")
    assert tx.state == "refunded"
    assert sandbox.card_balance(SEED_CARD) == 1000
    assert tx.receipt[4] == ReceiptLine("textline", text="Storno erfasst:")
    assert tx.receipt[1].value == MASKED


def test_a_refund_after_the_window_is_closed_locally_and_sends_nothing(pos, sandbox, clock):
    tx = pos.finalize(pos.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD).id)
    clock.advance(secu.ASSUMED_REFUND_WINDOW)
    calls = len(sandbox.requests)
    with pytest.raises(RefundWindowClosed):
        pos.refund(tx.id)
    assert len(sandbox.requests) == calls
    assert sandbox.card_balance(SEED_CARD) == 204


# --- expiry: the deferred release ----------------------------------------------------------------------


def test_an_expired_preview_is_released_at_the_provider_by_the_delivery_queue(engine, sandbox, clock):
    tx = engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    clock.advance(secu.ASSUMED_PREVIEW_TTL)

    assert engine.expire_due() == 1
    assert engine.get(tx.id).state == "expired"
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "processing"  # not yet released
    (delivery,) = engine.deliveries(tx.id)
    assert delivery.kind == "release"

    assert engine.deliver_pending() == 1
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"
    assert engine.deliver_pending() == 0
    assert sandbox.card_balance(SEED_CARD) == 1000


def test_a_command_after_the_deadline_expires_the_transaction_and_queues_the_release(engine, sandbox, clock):
    tx = engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    clock.advance(secu.ASSUMED_PREVIEW_TTL)
    with pytest.raises(PreviewExpired):
        engine.finalize(tx.id)
    assert "start/loyalty" not in operations(sandbox)
    engine.deliver_pending()
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"


def test_a_release_whose_answer_was_lost_is_redelivered_harmlessly(engine, sandbox, clock):
    tx = engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    clock.advance(secu.ASSUMED_PREVIEW_TTL)
    engine.expire_due()
    sandbox.faults.inject("abort", Fault.TIMEOUT_AFTER_COMMIT, times=2)  # the inline resend too
    assert engine.deliver_pending() == 0
    (delivery,) = engine.deliveries(tx.id)
    assert delivery.status == "pending" and delivery.attempts == 1

    clock.advance(minutes=1)
    assert engine.deliver_pending() == 1
    assert operations(sandbox).count("abort") == 3
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"


# --- failures ------------------------------------------------------------------------------------------


def test_a_lost_start_answer_then_a_retry_redeems_the_card_exactly_once(pos, sandbox):
    tx = pos.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    sandbox.faults.inject("start", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        pos.finalize(tx.id, idempotency_key="fin-1")
    assert pos.get(tx.id).pending == "finalize"
    with pytest.raises(TransactionInDoubt):
        pos.cancel(tx.id)

    tx = pos.finalize(tx.id, idempotency_key="fin-1")

    assert tx.state == "finalized"
    assert sandbox.card_balance(SEED_CARD) == 204
    assert len(sandbox.loyalty_transactions) == 1
    assert operations(sandbox).count("start/loyalty") == 1
    assert tx.receipt[1].value == MASKED


def test_recover_settles_a_lost_start_without_a_second_redemption(engine, sandbox, clock):
    tx = engine.preview("secuconnect", SEED_BASKET, customer_token=POOR_CARD)
    sandbox.faults.inject("start", Fault.GARBAGE_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(tx.id)
    clock.advance(minutes=2)  # past the intent's lease

    assert engine.recover() == 1

    assert engine.get(tx.id).state == "finalized"
    assert sandbox.card_balance(POOR_CARD) == 0
    assert [booking.redeemed for booking in sandbox.loyalty_transactions] == [500]


def test_a_refusal_leaves_the_transaction_as_it_was(engine, sandbox):
    tx = engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    other = engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    engine.finalize(other.id)  # the card is spent by another till

    with pytest.raises(ProviderRejected) as refused:
        engine.finalize(tx.id)

    assert refused.value.code == str(ERRORS["balance_changed"].code)
    assert engine.get(tx.id).state == "previewed"
    assert [event.kind for event in engine.history(tx.id)][-1] == "rejected"
    assert sandbox.card_balance(SEED_CARD) == 204


def test_a_locked_card_is_refused_at_preview(engine, sandbox):
    sandbox.lock_card(SEED_CARD)
    with pytest.raises(ProviderRejected) as refused:
        engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
    assert refused.value.code == str(ERRORS["card_locked"].code)
    assert SEED_CARD not in str(refused.value)


def test_the_card_number_never_reaches_the_database(db_url, driver, sandbox, clock, tmp_path):
    with Engine.open(db_url, providers={"secuconnect": driver}, clock=clock) as engine:
        paid = engine.finalize(engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD).id)
        engine.refund(paid.id)
        sandbox.lock_card(SEED_CARD)
        with pytest.raises(ProviderRejected):
            engine.preview("secuconnect", SEED_BASKET, customer_token=SEED_CARD)
        history = engine.history(paid.id)
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("txengine.db"))
    assert SEED_CARD.encode() not in stored
    assert MASKED.encode() in stored  # the receipt is stored, masked
    assert SEED_CARD not in repr(history)


# --- async, in process through ASGI ----------------------------------------------------------------------


def test_the_async_engine_over_asgi_runs_a_whole_session(db_url, sandbox, clock):
    driver = SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                               async_transport=sandbox.asgi_transport())

    async def session():
        async with AsyncEngine.open(db_url, providers={"secuconnect": driver}, clock=clock) as engine:
            tx = await engine.preview("secuconnect", SEED_BASKET, customer_token=POOR_CARD)
            tx = await engine.begin_payment(tx.id)
            tx = await engine.finalize(tx.id)
            return await engine.refund(tx.id)

    tx = asyncio.run(session())
    assert tx.state == "refunded"
    assert sandbox.card_balance(POOR_CARD) == 500
    assert tx.details["payment_method"] == "cash"
