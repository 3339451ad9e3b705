"""Recovery against Cheers: every remote event whose answer is lost (or never arrives) is
re-driven by ``recover()`` and lands where Cheers actually is; the sandbox's ledger shows
each credit movement exactly once.

Retry safety of each Cheers call (reviewed in ``providers/cheers/driver.py``):

- preview: ``X-Idempotency-Key`` (documented) - a retry with the engine's key replays;
- finalize, cancel, refund: replayed on a transaction already in the target state
  (``ASSUMED_REPLAYED_COMMANDS``), so a re-send is harmless;
- the ``release`` delivery (cancel of an expired preview): the same replay, and an
  expired preview counts as released;
- update: NOT idempotent and Cheers has no status query.  A re-sent update whose first
  answer was lost lands twice at Cheers; the driver recognises that answer and refuses
  it (``UPDATE_APPLIED_TWICE``), so the engine never stores a basket Cheers does not
  hold, and the cashier cancels.  Added lines carry no credits: no money is at stake.
"""

from __future__ import annotations

import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import OutcomeUnknown
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.sandbox import DEFAULT_API_KEY, WORKED_EXAMPLE_TRANSACTION_KEY, WORKED_EXAMPLE_WALLET
from txengine.testing.sandbox import Fault

AFTER_COMMIT = [Fault.TIMEOUT_AFTER_COMMIT, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT]
BEFORE_COMMIT = [Fault.TIMEOUT_BEFORE_COMMIT, Fault.SERVER_ERROR, Fault.DROP_CONNECTION]
#: the driver re-sends replayed commands once inline; a lost answer must beat that too
LOST = 1 + cheers.TRANSPORT_RETRIES
WALLET = WORKED_EXAMPLE_WALLET


@pytest.fixture
def sandbox(clock) -> CheersSandbox:
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_worked_example()
    return sandbox


@pytest.fixture
def engine(db_url, sandbox, clock):
    driver = CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=sandbox.transport())
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        yield engine


def beers() -> Basket:
    return Basket([LineItem("f04ce0c0-1034-40bf-a066-3e313f68c781", "Draft Beer 0.5L", 3,
                            Money(50000, "HUF"), 27)])


def preview(engine):
    return engine.preview("cheers", beers(), customer_token=WORKED_EXAMPLE_TRANSACTION_KEY)


def ledger(sandbox) -> list[str]:
    return [entry.kind for entry in sandbox.ledger]


def lose(engine, sandbox, operation, fault, command):
    sandbox.faults.inject(operation, fault, times=LOST)
    with pytest.raises(OutcomeUnknown):
        command()
    sandbox.faults.clear()


# (event, how to reach the state it leaves, the command, final state, ledger, Cheers status, wallet)
CASES = {
    "finalize": (lambda e, tx: tx, lambda e, tx: e.finalize(tx.id),
                 "finalized", ["finalize"], "FINALIZED", 0),
    "cancel": (lambda e, tx: tx, lambda e, tx: e.cancel(tx.id),
               "cancelled", [], "CANCELLED", 800),
    "refund": (lambda e, tx: e.finalize(tx.id), lambda e, tx: e.refund(tx.id, comment="returned"),
               "refunded", ["finalize", "refund"], "REFUNDED", 800),
}


@pytest.mark.parametrize("fault", AFTER_COMMIT + BEFORE_COMMIT, ids=lambda f: f.value)
@pytest.mark.parametrize("event", sorted(CASES))
def test_a_lost_command_is_recovered_to_the_state_cheers_holds(engine, sandbox, clock, event, fault):
    reach, command, state, expected_ledger, status, wallet = CASES[event]
    tx = reach(engine, preview(engine))
    lose(engine, sandbox, event, fault, lambda: command(engine, tx))
    assert engine.get(tx.id).pending == event
    committed = fault in AFTER_COMMIT
    assert ledger(sandbox) == (expected_ledger if committed else expected_ledger[:-1] if event != "cancel" else [])

    assert engine.recover() == 1

    recovered = engine.get(tx.id)
    assert (recovered.state, recovered.pending) == (state, None)
    assert ledger(sandbox) == expected_ledger, "each credit movement exactly once"
    assert sandbox.status(tx.provider_ref) == status
    assert sandbox.wallet_balance(WALLET) == wallet
    assert engine.recover() == 0


def test_a_lost_update_that_landed_is_refused_on_recovery_and_the_cashier_cancels(engine, sandbox):
    tx = preview(engine)
    tip = LineItem(None, "Tip", 1, Money(10000, "HUF"), 0)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.update(tx.id, [tip])

    assert engine.recover() == 1  # re-sent: Cheers now holds the tip twice, and says so

    after = engine.get(tx.id)
    assert (after.state, after.pending, len(after.items)) == ("previewed", None, 1)
    assert [e.data.get("code") for e in engine.history(tx.id)][-1] == cheers.UPDATE_APPLIED_TWICE
    assert engine.cancel(tx.id).state == "cancelled"
    assert (ledger(sandbox), sandbox.wallet_balance(WALLET)) == ([], 800)


def test_a_lost_update_that_never_landed_is_applied_once_by_recovery(engine, sandbox):
    tx = preview(engine)
    tip = LineItem(None, "Tip", 1, Money(10000, "HUF"), 0)
    sandbox.faults.inject("update", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.update(tx.id, [tip])
    assert engine.recover() == 1
    updated = engine.get(tx.id)
    assert (updated.state, len(updated.items)) == ("updated", 2)
    assert len(sandbox.transaction(tx.provider_ref).lines) == 2
    assert engine.finalize(tx.id).state == "finalized" and ledger(sandbox) == ["finalize"]


@pytest.mark.parametrize("fault", AFTER_COMMIT + BEFORE_COMMIT, ids=lambda f: f.value)
def test_a_lost_release_is_redelivered_until_cheers_holds_it_released(engine, sandbox, clock, fault):
    tx = preview(engine)
    clock.advance(cheers.TIMERS.preview_ttl)
    assert engine.expire_due() == 1
    sandbox.faults.inject("cancel", fault, times=LOST)
    assert engine.deliver_pending() == 0
    sandbox.faults.clear()
    [release] = engine.get(tx.id).deliveries
    assert (release.kind, release.status, release.attempts) == ("release", "pending", 1)

    clock.set(release.next_attempt_at)
    assert engine.deliver_pending() == 1
    assert sandbox.status(tx.provider_ref) in ("CANCELLED", "EXPIRED")  # expired counts as released
    assert ledger(sandbox) == [] and sandbox.wallet_balance(WALLET) == 800


def test_an_unreadable_refusal_of_a_command_is_unknown_not_a_refusal(engine, sandbox, clock):
    """A 4xx whose code is cut off may be Cheers' "already done": recovery asks again."""
    tx = preview(engine)
    sandbox.faults.inject("cancel", Fault.TIMEOUT_BEFORE_COMMIT, times=LOST)
    with pytest.raises(OutcomeUnknown):
        engine.cancel(tx.id)
    clock.advance(cheers.TIMERS.preview_ttl)  # Cheers now answers 410 CREDIT_TRANSACTION_EXPIRED...
    sandbox.faults.inject("cancel", Fault.TRUNCATED_AFTER_COMMIT)  # ...cut in half
    assert engine.recover() == 0 and engine.get(tx.id).pending == "cancel"
    clock.advance(seconds=5)  # the recovery backoff after a second unknown outcome
    assert engine.recover() == 1
    assert engine.get(tx.id).state == "cancelled" and sandbox.status(tx.provider_ref) == "EXPIRED"
    assert ledger(sandbox) == [] and sandbox.wallet_balance(WALLET) == 800
