"""Item 4 (core side): a Cheers update whose answer is lost twice no longer stays in doubt
for ever.  It is re-sent blindly once, then parked for an operator (recover() stops
re-sending it); ``cancel`` ends the transaction and releases the preview at Cheers; an
operator can also settle it with ``resolve``."""

from __future__ import annotations

import pytest

from txengine.errors import OutcomeUnknown, TransactionInDoubt
from txengine.models import LineItem
from txengine.money import Money
from txengine.providers.cheers import sandbox as cheers_sandbox
from txengine.testing.sandbox import Fault

from .test_recovery_cheers import WALLET, engine, ledger, preview, sandbox  # noqa: F401 (fixtures)

TIP = LineItem(None, "Tip", 1, Money(10000, "HUF"), 0)


def _wedge(engine, sandbox, clock):
    """An update whose answer is lost, then lost again on recovery's one re-send."""
    tx = preview(engine)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT, times=2)
    with pytest.raises(OutcomeUnknown):
        engine.update(tx.id, [TIP])
    assert engine.recover() == 0  # re-sent once; its answer is lost too
    clock.advance(minutes=15)  # past every backoff
    sent = len(sandbox.requests)
    assert engine.recover() == 0  # not re-sent a third time: parked
    assert len(sandbox.requests) == sent
    return tx


def test_an_update_lost_twice_is_parked_not_resent(engine, sandbox, clock):
    tx = _wedge(engine, sandbox, clock)
    parked = engine.get(tx.id)
    assert parked.pending == "update" and "resolve it or cancel" in parked.attention
    assert [intent.tx_id for intent in engine.needing_attention()] == [tx.id]
    assert engine.allowed_events(tx.id) == ["cancel"]
    clock.advance(minutes=15)
    sent = len(sandbox.requests)
    assert engine.recover() == 0
    with pytest.raises(TransactionInDoubt, match="needs an operator"):
        engine.update(tx.id, [TIP])
    assert len(sandbox.requests) == sent  # nothing re-sent, by recover or by a retry


def test_cancel_ends_a_wedged_update_and_releases_the_credits(engine, sandbox, clock):
    tx = _wedge(engine, sandbox, clock)
    cancelled = engine.cancel(tx.id)
    assert (cancelled.state, cancelled.pending) == ("cancelled", None)
    assert sandbox.status(tx.provider_ref) == cheers_sandbox.CANCELLED
    assert (ledger(sandbox), sandbox.wallet_balance(WALLET)) == ([], 800)
    assert engine.needing_attention() == [] and engine.recover() == 0


def test_cancel_ends_an_update_in_doubt_at_once(engine, sandbox):
    tx = preview(engine)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.update(tx.id, [TIP])
    assert engine.allowed_events(tx.id) == ["update", "cancel"]
    assert engine.cancel(tx.id).state == "cancelled"
    assert sandbox.status(tx.provider_ref) == cheers_sandbox.CANCELLED


@pytest.mark.parametrize("applied", [False, True])
def test_an_operator_resolves_a_parked_update(engine, sandbox, clock, applied):
    tx = _wedge(engine, sandbox, clock)
    resolved = engine.resolve(tx.id, applied=applied)
    assert resolved.pending is None
    assert (resolved.state, len(resolved.items)) == (("updated", 2) if applied else ("previewed", 1))
    assert engine.get(tx.id).attention is None and engine.needing_attention() == []
    assert [event.kind for event in engine.history(tx.id)][-2] == "resolved"
