"""Rekonect through the engine: whole POS sessions against the sandbox, sync and async,
with the guaranteed purchase submit going through the engine's delivery queue."""

from __future__ import annotations

import glob

import pytest

from txengine import AsyncEngine, Basket, Engine, LineItem, Money
from txengine.errors import OutcomeUnknown, PreviewExpired, ProviderRejected, RefundWindowClosed
from txengine.providers.rekonect import RekonectDriver, RekonectSandbox
from txengine.providers.rekonect import driver as policy
from txengine.testing.sandbox import Fault
from tests.conftest import BlockingView

PHONE = "5511122233"


@pytest.fixture
def sandbox(clock) -> RekonectSandbox:
    sandbox = RekonectSandbox(clock, submit_answers_code=True)
    sandbox.add_member(PHONE, points=1500, credit=0)
    sandbox.add_asset(PHONE, "FREECOFFEE", name="Free coffee", amount_off=350, product_codes={"COFFEE"})
    sandbox.add_deal("10% off pastries", percent_off=10, product_codes={"PASTRY"})
    return sandbox


@pytest.fixture
def driver(sandbox) -> RekonectDriver:
    return RekonectDriver(environment="sandbox", api_key=sandbox.api_key, source_name="till-app", pos_id="POS-7",
                          branch_id="BR-3", transport=sandbox.transport())


@pytest.fixture(params=["sync", "async"])
def pos(request, db_url, driver, clock):
    if request.param == "sync":
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            yield engine
    else:
        view = BlockingView(AsyncEngine.open(db_url, providers={"rekonect": driver}, clock=clock))
        yield view
        view.close()


@pytest.fixture
def engine(db_url, driver, clock):
    with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
        yield engine


def basket() -> Basket:
    return Basket([
        LineItem("COFFEE", "Flat white", 1, Money(350, "EUR"), 10),
        LineItem("PASTRY", "Croissant", 2, Money(250, "EUR"), 10),
        LineItem(None, "Sparkling water", 1, Money(2000, "EUR"), 20),
    ])


def tip(amount_minor: int) -> LineItem:
    return LineItem(None, "Tip", 1, Money(amount_minor, "EUR"), 0)


def statuses(engine, tx_id) -> list[str]:
    return [delivery.status for delivery in engine.deliveries(tx_id)]


def paths(sandbox, since: int = 0) -> list[str]:
    return [request.path for request in sandbox.requests[since:]]


class TestSessions:
    def test_a_member_pays_with_points_the_purchase_is_submitted_then_refunded(self, pos, sandbox, clock):
        tx = pos.preview("rekonect", basket(), customer_token=PHONE, idempotency_key="p-1")
        assert tx.state == "previewed"
        assert (tx.total_discount.amount_minor, tx.total_credits.amount_minor,
                tx.outstanding.amount_minor) == (400, 1500, 950)
        assert tx.expires_at == clock.now() + policy.TIMERS.preview_ttl

        pos.begin_payment(tx.id)
        tx = pos.finalize(tx.id)
        assert tx.state == "finalized"
        assert tx.provider_ref == tx.details["payment_confirmation_code"] in sandbox.payments
        assert sandbox.balance(PHONE).total == 0
        assert statuses(pos, tx.id) == ["pending"] and sandbox.purchases == {}

        assert pos.deliver_pending() == 1
        assert statuses(pos, tx.id) == ["delivered"]
        purchase = sandbox.purchases[tx.id]
        assert purchase.member_key == sandbox.member(PHONE).membership_key
        assert purchase.body["transaction"]["totalAmount"] == 2450
        assert next(iter(sandbox.assets.values())).used_by == tx.id
        assert pos.deliver_pending() == 0 and sandbox.submissions(tx.id) == 1

        calls = len(sandbox.requests)
        tx = pos.refund(tx.id, comment="Customer returned the order")
        assert tx.state == "refunded"
        assert paths(sandbox, calls) == ["/v1/transaction", "/v1/transaction", "/v1/payment"]
        assert sandbox.purchases[tx.id].status == "cancelled"
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]
        assert next(iter(sandbox.assets.values())).used_by is None

    def test_update_is_local_and_the_tip_is_submitted_unpriced(self, pos, sandbox):
        tx = pos.preview("rekonect", basket(), customer_token=PHONE)
        calls = len(sandbox.requests)
        tx = pos.update(tx.id, [tip(300)])
        assert sandbox.requests[calls:] == []
        assert tx.state == "updated" and tx.outstanding.amount_minor == 950 + 300
        assert (tx.items[-1].discount.amount_minor, tx.items[-1].credits.amount_minor) == (0, 0)
        pos.finalize(tx.id)
        pos.deliver_pending()
        submitted = sandbox.purchases[tx.id].body["transaction"]
        assert submitted["items"][-1] == {"lineId": "4", "name": "Tip", "quantity": 1, "grossAmount": 300,
                                          "netAmount": 300, "action": "sale"}
        assert submitted["meansOfPayment"][-1] == {"type": "EXTERNAL", "amount": 1250}

    def test_cancel_before_payment_is_local(self, pos, sandbox):
        tx = pos.preview("rekonect", basket(), customer_token=PHONE)
        calls = len(sandbox.requests)
        assert pos.cancel(tx.id).state == "cancelled"
        assert sandbox.requests[calls:] == [] and pos.deliveries(tx.id) == []
        assert pos.deliver_pending() == 0 and sandbox.purchases == {}

    def test_a_non_members_purchase_is_submitted_for_analytics(self, pos, sandbox):
        tx = pos.preview("rekonect", basket())
        assert sandbox.requests == [] and tx.outstanding.amount_minor == 2850
        pos.begin_payment(tx.id)
        pos.finalize(tx.id)
        assert sandbox.requests == []  # nothing to charge: the submit is queued
        assert pos.deliver_pending() == 1
        assert sandbox.purchases[tx.id].member_key is None
        assert paths(sandbox) == ["/v1/transaction"]

    def test_a_preview_past_its_deadline_is_not_paid(self, pos, sandbox, clock):
        tx = pos.preview("rekonect", basket(), customer_token=PHONE)
        clock.advance(policy.TIMERS.preview_ttl)
        with pytest.raises(PreviewExpired):
            pos.finalize(tx.id)
        assert sandbox.payments == {} and pos.get(tx.id).state == "expired"

    def test_refunds_close_after_the_window(self, pos, sandbox, clock):
        tx = pos.preview("rekonect", basket(), customer_token=PHONE)
        pos.finalize(tx.id)
        pos.deliver_pending()
        clock.advance(policy.TIMERS.refund_window)
        calls = len(sandbox.requests)
        with pytest.raises(RefundWindowClosed):
            pos.refund(tx.id)
        assert sandbox.requests[calls:] == []
        assert sandbox.balance(PHONE).total == 0


class TestFailures:
    def test_407_at_finalize_leaves_the_sale_open(self, engine, sandbox):
        tx = engine.preview("rekonect", basket(), customer_token=PHONE)
        engine.begin_payment(tx.id)
        sandbox.member(PHONE).points = 1200  # spent at another till since the preview
        with pytest.raises(ProviderRejected) as refused:
            engine.finalize(tx.id)
        assert refused.value.code == "407" and refused.value.tx_id == tx.id
        assert engine.get(tx.id).state == "payment_pending"
        assert engine.cancel(tx.id).state == "cancelled"
        assert engine.deliveries(tx.id) == [] and sandbox.balance(PHONE).total == 1200

    def test_a_lost_payment_answer_is_recovered_with_one_charge(self, engine, sandbox, clock):
        tx = engine.preview("rekonect", basket(), customer_token=PHONE)
        sandbox.faults.inject("payment", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id)
        assert engine.get(tx.id).pending == "finalize" and engine.deliveries(tx.id) == []
        assert sandbox.balance(PHONE).total == 0  # Rekonect did charge
        clock.advance(seconds=61)
        assert engine.recover() == 1
        tx = engine.get(tx.id)
        assert tx.state == "finalized" and list(sandbox.payments) == [tx.provider_ref]
        assert sandbox.balance(PHONE).total == 0 and statuses(engine, tx.id) == ["pending"]

    @pytest.mark.parametrize("fault", [Fault.SERVER_ERROR, Fault.TIMEOUT_AFTER_COMMIT, Fault.DROP_CONNECTION],
                             ids=lambda f: f.value)
    def test_a_failed_submit_is_retried_on_schedule_and_recorded_once(self, engine, sandbox, clock, fault):
        tx = engine.preview("rekonect", basket(), customer_token=PHONE)
        engine.finalize(tx.id)
        sandbox.faults.inject("transaction", fault)
        assert engine.deliver_pending() == 0
        [delivery] = engine.deliveries(tx.id)
        assert (delivery.status, delivery.attempts) == ("pending", 1)
        first_retry = policy.DELIVERY_SCHEDULE[0]
        assert first_retry <= delivery.next_attempt_at - clock.now() <= first_retry * 1.2
        calls = len(sandbox.requests)
        assert engine.deliver_pending() == 0 and len(sandbox.requests) == calls  # not due yet
        clock.advance(first_retry * 1.2)
        assert engine.deliver_pending() == 1
        assert list(sandbox.purchases) == [tx.id] and sandbox.recorded()[0].transaction_id == tx.id

    def test_a_submit_that_keeps_failing_is_parked_not_dropped(self, engine, sandbox, clock):
        tx = engine.preview("rekonect", basket())
        engine.finalize(tx.id)
        schedule = policy.DELIVERY_SCHEDULE
        sandbox.faults.inject("transaction", Fault.SERVER_ERROR, times=len(schedule) + 1)
        for delay in (*schedule, None):
            assert engine.deliver_pending() == 0
            if delay is not None:
                clock.advance(delay * 1.2)
        [parked] = engine.deliveries(tx.id)
        assert parked.status == "dead" and parked.attempts == len(schedule) + 1
        assert tx.id not in sandbox.purchases

    def test_a_gift_used_twice_parks_the_second_submit_with_522(self, engine, sandbox):
        first = engine.preview("rekonect", basket(), customer_token=PHONE, payment_type="EXTERNAL_PAYMENT")
        second = engine.preview("rekonect", basket(), customer_token=PHONE, payment_type="EXTERNAL_PAYMENT")
        engine.finalize(first.id)
        engine.finalize(second.id)
        assert engine.deliver_pending() == 1
        [parked] = engine.deliveries(second.id)
        assert parked.status == "dead" and "522" in parked.last_error
        assert list(sandbox.purchases) == [first.id]

    def test_a_purchase_parked_with_522_can_still_be_refunded(self, engine, sandbox):
        sandbox.member(PHONE).points = 5000
        first = engine.preview("rekonect", basket(), customer_token=PHONE)
        second = engine.preview("rekonect", basket(), customer_token=PHONE)
        engine.finalize(first.id)
        engine.finalize(second.id)
        engine.deliver_pending()
        assert statuses(engine, second.id) == ["dead"]
        tx = engine.refund(second.id)
        assert tx.state == "refunded" and tx.details["purchase_cancelled"] is False
        assert tx.details["payment_cancelled"] is True
        assert sandbox.payments[tx.provider_ref].status == "cancelled"
        assert sandbox.purchases[first.id].status == "recorded" and second.id not in sandbox.purchases
        assert sandbox.balance(PHONE).total == 5000 - 2450  # only the first purchase stays paid

    def test_refund_before_the_submit_was_delivered(self, engine, sandbox):
        tx = engine.preview("rekonect", basket(), customer_token=PHONE)
        engine.finalize(tx.id)
        sandbox.faults.inject("transaction", Fault.SERVER_ERROR)
        engine.deliver_pending()  # the first attempt fails; the queue will retry later
        assert engine.refund(tx.id).state == "refunded"
        assert sandbox.purchases[tx.id].status == "cancelled"
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]


class TestSecrets:
    def test_the_database_never_holds_the_phone_number_or_the_api_key(self, engine, sandbox, db_url):
        tx = engine.preview("rekonect", basket(), customer_token=PHONE, idempotency_key="p-1")
        engine.update(tx.id, [tip(100)])
        engine.finalize(tx.id)
        engine.deliver_pending()
        engine.refund(tx.id, comment="returned")
        with pytest.raises(ProviderRejected):
            engine.preview("rekonect", basket(), customer_token="5550001111")
        engine.close()
        path = db_url.removeprefix("sqlite:///")
        stored = b"".join(open(name, "rb").read() for name in glob.glob(path + "*"))
        assert stored and PHONE.encode() not in stored and b"5550001111" not in stored
        assert sandbox.api_key.encode() not in stored
