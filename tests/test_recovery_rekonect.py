"""Recovery against Rekonect: a lost answer at any request of pay, of the three-step
refund, or of the guaranteed submit, is re-driven to the state Rekonect holds; its
ledger shows one payment, one purchase, one cancel of each.

Retry safety of each Rekonect call (reviewed in ``providers/rekonect/driver.py``):

- member details (preview): read-only, re-sent inline once;
- ``pay``: de-duplicated by ``transaction.transactionId`` (the engine's transaction id):
  a repeat answers the original confirmation code and balance (ASSUMED, see the driver);
- submit (``/transaction``): recorded once per ``transactionId``, a repeat answers the
  same confirmation code, also after the purchase was cancelled (ASSUMED);
- transaction cancel and payment cancel by confirmation code: a repeat answers success
  without reversing twice (ASSUMED).
A refund re-sent from its start (submit, cancel purchase, cancel payment) is therefore
safe after a loss at any of its steps.
"""

from __future__ import annotations

import httpx
import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import OutcomeUnknown
from txengine.providers.rekonect import RekonectDriver, RekonectSandbox
from txengine.providers.rekonect import driver as policy
from txengine.testing.sandbox import Fault

PHONE = "5511122233"


class LoseAnswer(httpx.BaseTransport):
    """Let the sandbox handle every request; lose the answer of the ``nth`` one to come."""

    def __init__(self, sandbox) -> None:
        self.inner = sandbox.transport()
        self.countdown: int | None = None

    def lose(self, nth: int) -> None:
        self.countdown = nth

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown == 0:
                self.countdown = None
                raise httpx.ReadTimeout("lost on the way back", request=request)
        return response


@pytest.fixture
def sandbox(clock) -> RekonectSandbox:
    sandbox = RekonectSandbox(clock, submit_answers_code=True)
    sandbox.add_member(PHONE, points=1500, credit=0)
    return sandbox


@pytest.fixture
def wire(sandbox) -> LoseAnswer:
    return LoseAnswer(sandbox)


@pytest.fixture
def engine(db_url, sandbox, wire, clock):
    driver = RekonectDriver(environment="sandbox", api_key=sandbox.api_key, source_name="till", pos_id="POS-1", branch_id="BR-1",
                            transport=wire)
    with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
        yield engine


def basket() -> Basket:
    return Basket([LineItem(None, "Lunch menu", 1, Money(2000, "EUR"), 10)])


def payments_of(sandbox, tx_id):
    return [p for p in sandbox.payments.values() if p.transaction_id == tx_id]


def test_a_lost_pay_answer_is_recovered_to_one_charge(engine, sandbox, wire):
    tx = engine.preview("rekonect", basket(), customer_token=PHONE)
    assert tx.total_credits.amount_minor == 1500
    wire.lose(1)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(tx.id)
    assert sandbox.balance(PHONE).total == 0, "Rekonect did charge"

    assert engine.recover() == 1

    done = engine.get(tx.id)
    assert (done.state, done.pending) == ("finalized", None)
    [payment] = payments_of(sandbox, tx.id)
    assert done.provider_ref == payment.confirmation_code and payment.status == "paid"
    assert sandbox.balance(PHONE).total == 0
    assert engine.deliver_pending() == 1
    assert sandbox.purchases[tx.id].submissions == 1


@pytest.mark.parametrize("step", [1, 2, 3], ids=["submit", "cancel-purchase", "cancel-payment"])
@pytest.mark.parametrize("delivered_first", [True, False], ids=["after-submit", "before-submit"])
def test_a_refund_lost_at_any_step_is_recovered_to_one_reversal(engine, sandbox, wire, step, delivered_first):
    tx = engine.finalize(engine.preview("rekonect", basket(), customer_token=PHONE).id)
    if delivered_first:
        assert engine.deliver_pending() == 1
    wire.lose(step)
    with pytest.raises(OutcomeUnknown):
        engine.refund(tx.id)
    assert engine.get(tx.id).pending == "refund"

    assert engine.recover() == 1

    refunded = engine.get(tx.id)
    assert (refunded.state, refunded.pending) == ("refunded", None)
    assert refunded.details["purchase_cancelled"] and refunded.details["payment_cancelled"]
    purchase = sandbox.purchases[tx.id]
    [payment] = payments_of(sandbox, tx.id)
    assert (purchase.status, payment.status) == ("cancelled", "cancelled")
    assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE], "points and credit back, once"
    assert engine.deliver_pending() == (0 if delivered_first else 1)  # the queued submit: a no-op replay
    assert [p.transaction_id for p in sandbox.purchases.values()] == [tx.id]
    assert sandbox.purchases[tx.id].status == "cancelled", "a late submit does not revive it"


@pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT,
                                   Fault.GARBAGE_AFTER_COMMIT, Fault.TIMEOUT_BEFORE_COMMIT],
                         ids=lambda f: f.value)
def test_a_lost_submit_is_redelivered_and_recorded_once(engine, sandbox, clock, fault):
    tx = engine.finalize(engine.preview("rekonect", basket()).id)  # a non-member: submit only
    sandbox.faults.inject("transaction", fault)
    assert engine.deliver_pending() == 0
    [queued] = engine.get(tx.id).deliveries
    assert (queued.status, queued.attempts) == ("pending", 1)
    clock.set(queued.next_attempt_at)
    assert engine.deliver_pending() == 1
    assert list(sandbox.purchases) == [tx.id] and sandbox.purchases[tx.id].status == "recorded"
    assert sandbox.submissions(tx.id) == (2 if fault is not Fault.TIMEOUT_BEFORE_COMMIT else 1)
    assert policy.DELIVERY_SCHEDULE[0] <= queued.next_attempt_at - tx.updated_at


def test_recovery_after_a_restart_uses_a_new_driver_and_the_same_keys(db_url, sandbox, clock):
    """The process that lost the answer is gone; a fresh engine and driver recover it."""
    wire = LoseAnswer(sandbox)
    options = dict(environment="sandbox", api_key=sandbox.api_key, source_name="till", pos_id="POS-1", branch_id="BR-1")
    with Engine.open(db_url, providers={"rekonect": RekonectDriver(transport=wire, **options)},
                     clock=clock) as first:
        tx = first.preview("rekonect", basket(), customer_token=PHONE)
        wire.lose(1)
        with pytest.raises(OutcomeUnknown):
            first.finalize(tx.id)
    with Engine.open(db_url, providers={"rekonect": RekonectDriver(transport=sandbox.transport(), **options)},
                     clock=clock) as second:
        assert second.recover() == 1 and second.get(tx.id).state == "finalized"
        assert len(payments_of(sandbox, tx.id)) == 1


@pytest.mark.parametrize("step", [1, 2], ids=["submit", "cancel-payment"])
def test_a_refund_with_the_documented_submit_answer_is_recovered_to_one_return(db_url, clock, step):
    # The seed's submit answer is ``data: {}``: no code to cancel the purchase by, so the
    # refund is two steps (re-submit, cancel the payment); a loss at either settles once.
    sandbox = RekonectSandbox(clock)
    sandbox.add_member(PHONE, points=1500)
    wire = LoseAnswer(sandbox)
    driver = RekonectDriver(**sandbox.credentials(), environment="sandbox", transport=wire)
    with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
        tx = engine.finalize(engine.preview("rekonect", basket(), customer_token=PHONE).id)
        assert engine.deliver_pending() == 1
        wire.lose(step)
        with pytest.raises(OutcomeUnknown):
            engine.refund(tx.id)

        assert engine.recover() == 1

        refunded = engine.get(tx.id)
    assert refunded.state == "refunded" and refunded.details["payment_cancelled"]
    assert refunded.details["purchase_not_cancelled"] == policy.NO_PURCHASE_CODE_REASON
    [payment] = payments_of(sandbox, tx.id)
    assert payment.status == "cancelled"
    assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE], "points back, once"
    assert [p.transaction_id for p in sandbox.purchases.values()] == [tx.id]
