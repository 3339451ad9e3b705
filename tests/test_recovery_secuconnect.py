"""Recovery against secuconnect: a lost start, abort, cancel, update or release is resolved
by ``recover()`` (or the delivery queue) to the Smart Transaction's real status, and the
card's ledger (``loyalty.transactions``) holds one booking, reversed at most once.

Retry safety of each secuconnect call (reviewed in ``providers/secuconnect/driver.py``):

- ``start`` (finalize): never re-sent blind.  The driver reads the Smart Transaction
  first (a status query): ``ok`` means our lost start committed, and that answer is
  the outcome; only a still-prepared transaction is started (and a repeated start on an
  ``ok`` one replays it, ASSUMED);
- ``PUT`` + ``preTransaction`` (update): set the whole basket and re-apply the balance;
  repeating them changes nothing twice;
- ``abort`` (cancel, and the ``release`` delivery of an expired preview) and ``cancel``
  (refund): a repeat on an aborted or reversed transaction succeeds again (ASSUMED);
- create (preview): not re-sent; a retried preview makes a new Smart Transaction, and
  the lost one moves no money and expires.
"""

from __future__ import annotations

import pytest

from txengine import Engine, LineItem, Money
from txengine.errors import OutcomeUnknown
from txengine.testing.sandbox import Fault
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
from txengine.providers.secuconnect import driver as secu
from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

CARD = "9276004429942845"  # the seed's card: 10,00 EUR
POOR_CARD = "9276000000000025"
BASKET = [LineItem("30037", "Sandwich Romano", 1, Money(349, "EUR"), 7),
          LineItem("30200", "Fruit salad, small bowl", 1, Money(249, "EUR"), 7),
          LineItem("51", "Water, mildly sprinkling, 0.25 ltr.", 2, Money(99, "EUR"), 19)]
TIP = LineItem(None, "Tip", 1, Money(100, "EUR"), 0)
AFTER_COMMIT = [Fault.TIMEOUT_AFTER_COMMIT, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT]
BEFORE_COMMIT = [Fault.TIMEOUT_BEFORE_COMMIT, Fault.SERVER_ERROR, Fault.DROP_CONNECTION]


@pytest.fixture
def sandbox(clock) -> SecuconnectSandbox:
    sandbox = SecuconnectSandbox(clock)
    sandbox.add_card(POOR_CARD, cash_balance=500)
    return sandbox


@pytest.fixture
def engine(db_url, sandbox, clock):
    driver = SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                               transport=sandbox.transport())
    with Engine.open(db_url, providers={"secuconnect": driver}, clock=clock) as engine:
        yield engine


def lose(sandbox, operation, fault, command):
    # Twice: the driver re-sends the calls it knows to be safe once before giving up.
    sandbox.faults.inject(operation, fault, times=2)
    with pytest.raises(OutcomeUnknown):
        command()
    sandbox.faults.clear()


def bookings(sandbox):
    return [(b.redeemed, b.reversed_at is not None) for b in sandbox.loyalty_transactions]


@pytest.mark.parametrize("fault", AFTER_COMMIT + BEFORE_COMMIT, ids=lambda f: f.value)
@pytest.mark.parametrize("card, method, left", [(CARD, "loyalty", 204), (POOR_CARD, "cash", 0)])
def test_a_lost_start_is_resolved_by_reading_the_status(engine, sandbox, fault, card, method, left):
    tx = engine.preview("secuconnect", BASKET, customer_token=card)
    lose(sandbox, "start", fault, lambda: engine.finalize(tx.id))
    committed = fault in AFTER_COMMIT
    assert len(sandbox.loyalty_transactions) == int(committed)

    assert engine.recover() == 1

    done = engine.get(tx.id)
    assert (done.state, done.pending, done.details["payment_method"]) == ("finalized", None, method)
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "ok"
    assert bookings(sandbox) == [(1000 - left if card == CARD else 500, False)], "one redemption"
    assert sandbox.card_balance(card) == left
    starts = [r for r in sandbox.requests if "/start/" in r.path]
    assert len(starts) == 1 + (0 if committed else 1), "a committed start is read back, not re-sent"


@pytest.mark.parametrize("fault", AFTER_COMMIT + BEFORE_COMMIT, ids=lambda f: f.value)
def test_a_lost_refund_is_recovered_to_one_reversal(engine, sandbox, fault):
    tx = engine.finalize(engine.preview("secuconnect", BASKET, customer_token=CARD).id)
    lose(sandbox, "cancel", fault, lambda: engine.refund(tx.id))
    assert engine.recover() == 1
    assert engine.get(tx.id).state == "refunded"
    assert bookings(sandbox) == [(796, True)] and sandbox.card_balance(CARD) == 1000


@pytest.mark.parametrize("fault", AFTER_COMMIT + BEFORE_COMMIT, ids=lambda f: f.value)
def test_a_lost_cancel_is_recovered_to_an_aborted_transaction(engine, sandbox, fault):
    tx = engine.preview("secuconnect", BASKET, customer_token=CARD)
    lose(sandbox, "abort", fault, lambda: engine.cancel(tx.id))
    assert engine.recover() == 1
    assert engine.get(tx.id).state == "cancelled"
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"
    assert bookings(sandbox) == [] and sandbox.card_balance(CARD) == 1000


@pytest.mark.parametrize("operation", ["update", "preTransaction"])
@pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.SERVER_ERROR], ids=lambda f: f.value)
def test_a_lost_update_is_recovered_and_the_basket_priced_once(engine, sandbox, operation, fault):
    tx = engine.preview("secuconnect", BASKET, customer_token=POOR_CARD)
    lose(sandbox, operation, fault, lambda: engine.update(tx.id, [TIP]))
    assert engine.recover() == 1
    updated = engine.get(tx.id)
    assert (updated.state, updated.outstanding, updated.total_credits) == (
        "updated", Money(396, "EUR"), Money(500, "EUR"))
    held = sandbox.smart_transaction(tx.provider_ref)
    assert (held["status"], held["basket_info"]["sum"]) == ("processing", 896)
    assert engine.finalize(tx.id).state == "finalized"
    assert bookings(sandbox) == [(500, False)]


@pytest.mark.parametrize("fault", AFTER_COMMIT + BEFORE_COMMIT, ids=lambda f: f.value)
def test_a_lost_release_is_redelivered_until_the_transaction_is_aborted(engine, sandbox, clock, fault):
    tx = engine.preview("secuconnect", BASKET, customer_token=CARD)
    clock.advance(secu.ASSUMED_PREVIEW_TTL)
    assert engine.expire_due() == 1
    sandbox.faults.inject("abort", fault, times=2)
    assert engine.deliver_pending() == 0
    sandbox.faults.clear()
    [release] = engine.get(tx.id).deliveries
    assert (release.kind, release.status, release.attempts) == ("release", "pending", 1)
    clock.set(release.next_attempt_at)
    assert engine.deliver_pending() == 1
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"
    assert bookings(sandbox) == [] and sandbox.card_balance(CARD) == 1000
