"""Time per transaction is monotonic (issue #10, item 11).

A wall clock that steps back (NTP, an operator, another host) never makes a journal
entry earlier than the one before it, and never moves a deadline already set: the
deadlines are checked against the real clock, never recomputed from it.
"""

from datetime import timedelta

import pytest

from txengine.errors import OutcomeUnknown
from txengine.machine import TimerPolicy
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER, tip


def journal_times(engine, tx_id):
    return [event.at for event in engine.history(tx_id)]


def assert_never_backwards(times):
    assert all(earlier <= later for earlier, later in zip(times, times[1:])), times


def test_journal_times_never_run_backwards_when_the_clock_steps_back(engine, basket, clock):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    clock.step_back(timedelta(hours=2))
    updated = engine.update(tx.id, [tip()])
    clock.step_back(timedelta(minutes=5))
    finalized = engine.finalize(tx.id)
    clock.step_back(timedelta(days=1))
    refunded = engine.refund(tx.id)

    times = journal_times(engine, tx.id)
    assert_never_backwards(times)
    assert times[-1] == tx.created_at  # the clock is behind every entry: each keeps the last time
    assert tx.updated_at <= updated.updated_at <= finalized.updated_at <= refunded.updated_at


def test_a_step_back_does_not_move_the_preview_deadline(engine, basket, clock):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    clock.step_back(timedelta(minutes=30))
    updated = engine.update(tx.id, [tip()])
    # An update extends the deadline it had, never one recomputed from the stepped clock.
    assert updated.expires_at == tx.expires_at + TimerPolicy().update_extension
    # Deadlines are checked against the real clock: the preview is still open, and it
    # expires exactly when the (corrected) clock reaches the deadline it always had.
    clock.set(updated.expires_at - timedelta(seconds=1))
    assert engine.expire_due() == 0
    clock.advance(seconds=1)
    assert engine.expire_due() == 1
    expired = engine.get(tx.id)
    assert expired.state == "expired" and expired.expires_at == updated.expires_at
    assert_never_backwards(journal_times(engine, tx.id))


def test_attempt_and_unknown_notes_keep_journal_order(engine, basket, clock, sandbox):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    clock.step_back(timedelta(hours=1))
    sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(tx.id)
    clock.step_back(timedelta(hours=1))
    assert engine.finalize(tx.id).state == "finalized"  # the retry resumes the in-doubt call
    kinds = [event.kind for event in engine.history(tx.id)]
    assert kinds == ["transition", "attempt", "unknown", "attempt", "transition"]
    assert_never_backwards(journal_times(engine, tx.id))


def test_a_clock_that_moves_forward_is_used_as_is(engine, basket, clock):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    clock.advance(minutes=1)
    updated = engine.update(tx.id, [tip()])
    assert updated.updated_at == tx.updated_at + timedelta(minutes=1)
