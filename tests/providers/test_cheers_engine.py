"""Cheers through the engine: whole POS sessions against the sandbox, sync and async.

The seed's worked example runs end to end with ``Money(50000, "HUF")``; lost answers
are recovered without doubling; expiry is local and releases the preview at Cheers
through the delivery queue.
"""

from __future__ import annotations

import glob
import json
from datetime import timedelta

import pytest

from txengine import AsyncEngine, Basket, Engine, LineItem, Money
from txengine.errors import (
    IllegalTransition,
    OutcomeUnknown,
    PreviewExpired,
    ProviderRejected,
    RefundWindowClosed,
    TransactionInDoubt,
)
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.sandbox import (
    DEFAULT_API_KEY,
    WORKED_EXAMPLE_TRANSACTION_ID,
    WORKED_EXAMPLE_TRANSACTION_KEY,
    WORKED_EXAMPLE_WALLET,
)
from txengine.testing.sandbox import Fault
from tests.conftest import BlockingView
from tests.providers.test_cheers import (
    SEED_PREVIEW_REQUEST,
    SEED_REFUND_REQUEST,
    SEED_UPDATE_REQUEST,
)

QR = WORKED_EXAMPLE_TRANSACTION_KEY
WALLET = WORKED_EXAMPLE_WALLET
BEER_ID = "f04ce0c0-1034-40bf-a066-3e313f68c781"


def huf(forints: int) -> Money:
    return Money(forints * 100, "HUF")


def beers() -> Basket:
    return Basket([LineItem(BEER_ID, "Draft Beer 0.5L", 3, Money(50000, "HUF"), 27)])


FEE_AND_TIP = [
    LineItem(None, "Service fee", 1, Money(900, "HUF"), 27),
    LineItem(None, "Tip", 1, Money(10000, "HUF"), 0),
]


@pytest.fixture
def sandbox(clock) -> CheersSandbox:
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_worked_example()
    return sandbox


@pytest.fixture
def driver(sandbox) -> CheersDriver:
    return CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=sandbox.transport())


@pytest.fixture(params=["sync", "async"])
def pos(request, db_url, driver, clock):
    if request.param == "sync":
        with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
            yield engine
    else:
        view = BlockingView(AsyncEngine.open(db_url, providers={"cheers": driver}, clock=clock))
        yield view
        view.close()


@pytest.fixture
def engine(db_url, driver, clock):
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        yield engine


def calls(sandbox: CheersSandbox) -> list[str]:
    return [request.path.rsplit("/", 1)[-1] for request in sandbox.requests]


def preview(pos, key: str = "k1", payment_type: str = "SPLIT_PAYMENT", token: str = QR):
    return pos.preview("cheers", beers(), customer_token=token, idempotency_key=key, payment_type=payment_type)


# --- the worked example, end to end ------------------------------------------------------------


def test_the_worked_example_through_the_engine(pos, sandbox, clock):
    start = clock.now()
    seed_key = "a7e454c6-17ab-4fee-b823-c595bf3adb4a"
    tx = preview(pos, key=seed_key)

    assert tx.state == "previewed"
    assert tx.provider_ref == WORKED_EXAMPLE_TRANSACTION_ID
    assert (tx.total_discount, tx.total_credits, tx.outstanding) == (huf(600), huf(800), huf(100))
    assert tx.expires_at == start + timedelta(minutes=10)
    (request,) = sandbox.requests
    assert json.loads(request.body) == json.loads(SEED_PREVIEW_REQUEST)
    assert request.header("X-Idempotency-Key") == seed_key
    assert request.header("X-Transaction-Key") == QR

    clock.advance(minutes=4)
    tx = pos.update(tx.id, FEE_AND_TIP)

    assert tx.state == "updated"
    assert json.loads(sandbox.requests[-1].body) == json.loads(SEED_UPDATE_REQUEST)
    assert tx.outstanding == huf(209)
    assert (tx.total_discount, tx.total_credits) == (huf(600), huf(800))
    assert [(line.discount, line.credits, line.outstanding) for line in tx.items[1:]] == [
        (huf(0), huf(0), huf(9)), (huf(0), huf(0), huf(100)),
    ]
    assert tx.expires_at == start + timedelta(minutes=20)

    tx = pos.begin_payment(tx.id)
    assert tx.state == "payment_pending"
    assert calls(sandbox) == ["preview", "update"]  # begin_payment is local

    clock.advance(minutes=15)  # past the original deadline, inside the extended one
    tx = pos.finalize(tx.id)
    assert tx.state == "finalized"
    assert tx.refund_deadline == clock.now() + timedelta(hours=24)
    assert sandbox.wallet_balance(WALLET) == 0

    tx = pos.refund(tx.id, comment="Customer returned the order")
    assert tx.state == "refunded"
    assert json.loads(sandbox.requests[-1].body) == json.loads(SEED_REFUND_REQUEST)
    assert sandbox.wallet_balance(WALLET) == 800
    assert calls(sandbox) == ["preview", "update", "finalize", "refund"]


def test_cancel_when_the_card_is_declined(pos, sandbox):
    tx = pos.begin_payment(preview(pos).id)
    tx = pos.cancel(tx.id)
    assert tx.state == "cancelled"
    assert sandbox.status(WORKED_EXAMPLE_TRANSACTION_ID) == "CANCELLED"
    assert sandbox.wallet_balance(WALLET) == sandbox.wallet_available(WALLET) == 800
    with pytest.raises(IllegalTransition):
        pos.finalize(tx.id)
    assert calls(sandbox) == ["preview", "cancel"]


def test_a_repeated_preview_key_returns_the_same_transaction(pos, sandbox):
    first = preview(pos)
    again = preview(pos)
    assert again.id == first.id
    assert calls(sandbox) == ["preview"]


# --- payment types ---------------------------------------------------------------------------


def test_insufficient_credit_then_the_cashier_chooses_external_payment(pos, sandbox):
    with pytest.raises(ProviderRejected) as refused:
        preview(pos, key="credit-try", payment_type="CREDIT")
    assert refused.value.code == "INSUFFICIENT_CREDIT"
    assert "EXTERNAL_PAYMENT" in str(refused.value)
    assert not sandbox.transaction_key_used(QR)

    tx = preview(pos, key="external-try", payment_type="EXTERNAL_PAYMENT")

    assert tx.payment_type == "EXTERNAL_PAYMENT"
    assert (tx.total_discount, tx.total_credits, tx.outstanding) == (huf(600), huf(0), huf(900))
    assert calls(sandbox) == ["preview", "preview"]


def test_credit_covering_everything_finalizes_without_collecting(pos, sandbox):
    sandbox.add_wallet("rich", credits=2000)
    tx = preview(pos, payment_type="CREDIT", token=sandbox.issue_transaction_key("rich"))
    assert tx.outstanding == huf(0)
    with pytest.raises(IllegalTransition):
        pos.begin_payment(tx.id)
    assert pos.finalize(tx.id).state == "finalized"
    assert sandbox.wallet_balance("rich") == 2000 - 900


def test_an_unknown_payment_type_is_refused_before_any_call(pos, sandbox):
    from txengine.errors import ValidationError

    with pytest.raises(ValidationError):
        preview(pos, payment_type="POINTS")
    assert sandbox.requests == []


# --- timers: local expiry, and the release delivery -------------------------------------------


def test_expiry_is_local_and_the_release_frees_the_preview(engine, sandbox, clock):
    tx = preview(engine)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)

    assert engine.expire_due() == 1
    assert engine.get(tx.id).state == "expired"
    (queued,) = engine.deliveries(tx.id)
    assert queued.kind == "release"
    assert calls(sandbox) == ["preview"]

    assert engine.deliver_pending() == 1
    assert calls(sandbox) == ["preview", "cancel"]
    # Cheers had expired it too: the release is done, nothing was deducted.
    assert sandbox.status(WORKED_EXAMPLE_TRANSACTION_ID) == "EXPIRED"
    assert sandbox.wallet_available(WALLET) == 800
    assert [d.status for d in engine.deliveries(tx.id)] == ["delivered"]


def test_the_release_cancels_a_preview_cheers_still_holds(db_url, clock):
    # Cheers keeps previews longer than the engine's policy: the release frees the hold.
    sandbox = CheersSandbox(clock=clock, preview_lifetime=timedelta(minutes=30))
    sandbox.seed_worked_example()
    driver = CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=sandbox.transport())
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        tx = preview(engine)
        clock.advance(minutes=10)
        with pytest.raises(PreviewExpired):
            engine.finalize(tx.id)
        assert sandbox.wallet_available(WALLET) == 0
        assert engine.deliver_pending() == 1
    assert sandbox.status(WORKED_EXAMPLE_TRANSACTION_ID) == "CANCELLED"
    assert sandbox.wallet_available(WALLET) == 800
    assert calls(sandbox) == ["preview", "cancel"]


def test_a_release_whose_answer_was_lost_is_redelivered_harmlessly(engine, sandbox, clock):
    tx = preview(engine)
    clock.advance(minutes=10)
    engine.expire_due()
    sandbox.faults.inject("cancel", Fault.SERVER_ERROR)

    assert engine.deliver_pending() == 0
    clock.advance(hours=1)
    assert engine.deliver_pending() == 1
    assert [d.status for d in engine.deliveries(tx.id)] == ["delivered"]
    assert calls(sandbox) == ["preview", "cancel", "cancel"]


def test_commands_after_the_deadline_expire_the_transaction_and_send_nothing(pos, sandbox, clock):
    tx = preview(pos)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    with pytest.raises(PreviewExpired):
        pos.finalize(tx.id)
    assert pos.get(tx.id).state == "expired"
    assert calls(sandbox) == ["preview"]


def test_refunds_close_after_24_hours_without_a_call(pos, sandbox, clock):
    tx = pos.finalize(preview(pos).id)
    clock.advance(cheers.REFUND_WINDOW)
    with pytest.raises(RefundWindowClosed):
        pos.refund(tx.id, comment="too late")
    assert calls(sandbox) == ["preview", "finalize"]
    assert sandbox.wallet_balance(WALLET) == 0


# --- lost answers: nothing lost, nothing doubled -------------------------------------------------


def test_a_single_lost_finalize_answer_is_absorbed_by_the_driver(pos, sandbox):
    tx = preview(pos)
    sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
    assert pos.finalize(tx.id).state == "finalized"
    assert [entry.kind for entry in sandbox.ledger] == ["finalize"]


def test_an_unknown_finalize_is_in_doubt_until_recovered(pos, sandbox):
    tx = preview(pos)
    sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT, times=2)
    with pytest.raises(OutcomeUnknown):
        pos.finalize(tx.id)
    assert pos.get(tx.id).pending == "finalize"
    with pytest.raises(TransactionInDoubt):
        pos.cancel(tx.id)

    assert pos.recover() == 1

    assert pos.get(tx.id).state == "finalized"
    assert [entry.kind for entry in sandbox.ledger] == ["finalize"]
    assert sandbox.wallet_balance(WALLET) == 0


def test_an_unknown_preview_is_retried_under_the_same_key(pos, sandbox):
    sandbox.faults.inject("preview", Fault.TIMEOUT_AFTER_COMMIT, times=2)
    with pytest.raises(OutcomeUnknown):
        preview(pos, key="till-7-sale-1")
    assert sandbox.transaction_key_used(QR)

    tx = preview(pos, key="till-7-sale-1")

    assert tx.provider_ref == WORKED_EXAMPLE_TRANSACTION_ID
    assert len(sandbox.transactions()) == 1
    assert {request.header("X-Idempotency-Key") for request in sandbox.requests} == {"till-7-sale-1"}


def test_a_lost_update_landed_twice_is_refused_and_the_payment_can_be_cancelled(pos, sandbox):
    tx = preview(pos)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        pos.update(tx.id, FEE_AND_TIP)

    assert pos.recover() == 1  # the re-sent update is definitely refused

    tx = pos.get(tx.id)
    assert (tx.state, tx.pending, len(tx.items)) == ("previewed", None, 1)
    assert pos.cancel(tx.id).state == "cancelled"
    assert sandbox.wallet_balance(WALLET) == 800
    assert any(event.data.get("code") == "UPDATE_APPLIED_TWICE" for event in pos.history(tx.id))


def test_refund_under_faults_returns_credits_once(pos, sandbox):
    tx = pos.finalize(preview(pos).id)
    sandbox.faults.inject("refund", Fault.GARBAGE_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        pos.refund(tx.id, comment="return")
    assert pos.refund(tx.id, comment="return").state == "refunded"
    assert [entry.kind for entry in sandbox.ledger] == ["finalize", "refund"]
    assert sandbox.wallet_balance(WALLET) == sandbox.opening_balance(WALLET)


# --- secrets ---------------------------------------------------------------------------------------


def test_neither_the_qr_key_nor_the_api_key_reaches_the_database(db_url, engine, sandbox, clock):
    tx = preview(engine)
    engine.update(tx.id, FEE_AND_TIP)
    with pytest.raises(ProviderRejected):
        preview(engine, key="k2")  # the QR is used: a rejection is journaled too
    engine.finalize(tx.id)
    engine.refund(tx.id, comment="return")
    text = repr(engine.get(tx.id)) + repr(engine.history(tx.id))
    assert QR not in text and DEFAULT_API_KEY not in text
    database = db_url.removeprefix("sqlite:///")
    for path in glob.glob(database + "*"):
        content = open(path, "rb").read()
        assert QR.encode() not in content
        assert DEFAULT_API_KEY.encode() not in content


# --- over a real socket, and caller input the driver refuses ----------------------------------------


async def test_a_session_through_the_async_engine_over_a_loopback_socket(db_url, sandbox, clock):
    from txengine.testing.sandbox import serve

    with serve(sandbox) as served:
        driver = CheersDriver(api_key=DEFAULT_API_KEY, base_url=served.base_url, timeout=5)
        async with AsyncEngine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
            tx = await engine.preview("cheers", beers(), customer_token=QR, idempotency_key="k1")
            tx = await engine.update(tx.id, FEE_AND_TIP)
            tx = await engine.begin_payment(tx.id)
            tx = await engine.finalize(tx.id)
    assert (tx.state, tx.outstanding, tx.total_credits) == ("finalized", huf(209), huf(800))
    assert sandbox.wallet_balance(WALLET) == 0


def test_a_fractional_tip_is_refused_and_the_transaction_stays_usable(engine, sandbox):
    from txengine.errors import ValidationError

    tx = preview(engine)
    with pytest.raises(ValidationError, match="whole HUF"):
        engine.update(tx.id, [LineItem(None, "Tip", 1, Money(950, "HUF"), 0)])
    assert calls(sandbox) == ["preview"]
    assert engine.get(tx.id).pending is None
    assert engine.cancel(tx.id).state == "cancelled"


def test_a_retried_update_that_landed_twice_reaches_the_pos_with_cheers_basket(pos, sandbox):
    """The driver's UpdateNotReconciled is what the POS catches: its code and Cheers' basket."""
    from txengine.providers.cheers.driver import UpdateNotReconciled

    tx = preview(pos)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        pos.update(tx.id, FEE_AND_TIP, idempotency_key="tip-1")
    with pytest.raises(UpdateNotReconciled) as refused:
        pos.update(tx.id, FEE_AND_TIP, idempotency_key="tip-1")

    assert refused.value.code == "UPDATE_APPLIED_TWICE"
    assert refused.value.reconciled.times_applied == 2
    assert (refused.value.tx_id, refused.value.event) == (tx.id, "update")
    assert pos.cancel(tx.id).state == "cancelled"
