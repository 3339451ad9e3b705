"""Failure paths: rejections, unknown outcomes, retries, recovery, crashes at every boundary,
idempotent commands and guaranteed deliveries.  Nothing lost, nothing doubled."""

import pytest

from txengine import Engine
from txengine.core import ProviderOp
from txengine.errors import (
    IdempotencyConflict,
    OutcomeUnknown,
    ProviderRejected,
    TransactionInDoubt,
)
from txengine.journal import replay
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER, tip

UNKNOWN_FAULTS = [
    Fault.TIMEOUT_BEFORE_COMMIT, Fault.TIMEOUT_AFTER_COMMIT, Fault.SERVER_ERROR,
    Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT, Fault.DROP_CONNECTION,
]


def kinds(engine, tx_id):
    return [(event.kind, event.data.get("event")) for event in engine.history(tx_id)]


def finalize_commits(sandbox, tx):
    return sandbox.commits.count((tx.provider_ref, "finalize"))


class TestRejection:
    def test_a_definite_no_leaves_the_state_and_journals_the_attempt(self, pos, basket, sandbox):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.wallets[CUSTOMER] = 100  # spent elsewhere since the preview
        with pytest.raises(ProviderRejected) as raised:
            pos.finalize(tx.id)
        assert raised.value.code == "INSUFFICIENT_CREDIT"
        assert raised.value.tx_id == tx.id and raised.value.event == "finalize"
        after = pos.get(tx.id)
        assert (after.state, after.pending) == ("previewed", None)
        assert kinds(pos, tx.id)[-2:] == [("attempt", "finalize"), ("rejected", "finalize")]
        assert pos.cancel(tx.id).state == "cancelled"
        assert sandbox.balance(CUSTOMER) == 100

    def test_a_rejected_preview_is_remembered_for_its_key(self, pos, basket, sandbox):
        with pytest.raises(ProviderRejected, match="UNKNOWN_CUSTOMER"):
            pos.preview("reference", basket, customer_token="stranger", idempotency_key="p1")
        calls = len(sandbox.requests)
        with pytest.raises(ProviderRejected, match="UNKNOWN_CUSTOMER"):
            pos.preview("reference", basket, customer_token="stranger", idempotency_key="p1")
        assert len(sandbox.requests) == calls


class TestUnknownOutcomes:
    @pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda f: f.value)
    def test_finalize_stays_in_doubt_until_its_retry_settles_it_once(self, pos, basket, sandbox, fault):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("finalize", fault)
        with pytest.raises(OutcomeUnknown) as raised:
            pos.finalize(tx.id)
        assert raised.value.tx_id == tx.id
        doubtful = pos.get(tx.id)
        assert (doubtful.state, doubtful.pending, doubtful.in_doubt) == ("previewed", "finalize", True)

        calls = len(sandbox.requests)
        with pytest.raises(TransactionInDoubt):
            pos.cancel(tx.id)
        assert len(sandbox.requests) == calls, "other commands send nothing while in doubt"
        assert pos.allowed_events(tx.id) == ["finalize"]

        assert pos.finalize(tx.id).state == "finalized"
        assert finalize_commits(sandbox, tx) == 1
        assert sandbox.balance(CUSTOMER) == 0
        assert kinds(pos, tx.id)[1:] == [("attempt", "finalize"), ("unknown", "finalize"),
                                         ("attempt", "finalize"), ("transition", "finalize")]

    @pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda f: f.value)
    def test_recover_settles_what_is_in_doubt(self, pos, basket, sandbox, fault):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("refund", fault)
        pos.finalize(tx.id)
        with pytest.raises(OutcomeUnknown):
            pos.refund(tx.id)
        assert pos.recover() == 1
        assert pos.get(tx.id).state == "refunded"
        assert sandbox.balance(CUSTOMER) == 800
        assert pos.recover() == 0

    def test_recover_lands_on_a_definite_rejection_too(self, pos, basket, sandbox):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_BEFORE_COMMIT)
        with pytest.raises(OutcomeUnknown):
            pos.finalize(tx.id)
        sandbox.wallets[CUSTOMER] = 0
        assert pos.recover() == 1
        assert (pos.get(tx.id).state, pos.get(tx.id).pending) == ("previewed", None)

    def test_an_unknown_preview_retried_with_its_key_creates_one_transaction(self, pos, basket, sandbox):
        sandbox.faults.inject("preview", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(OutcomeUnknown):
            pos.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="p1")
        tx = pos.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="p1")
        assert tx.state == "previewed"
        assert len(sandbox.previews) == 1

    def test_a_driver_crashing_after_it_sent_is_an_unknown_outcome_without_its_message(
            self, pos, basket, driver, monkeypatch):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)

        def explode(tx, key):
            yield driver._post(f"/previews/{tx.provider_ref}/finalize", idempotency_key=key)
            raise RuntimeError(f"boom with {CUSTOMER}")

        monkeypatch.setattr(driver, "finalize", explode)
        with pytest.raises(OutcomeUnknown) as raised:
            pos.finalize(tx.id)
        assert CUSTOMER not in str(raised.value)
        assert "RuntimeError" in str(raised.value)
        assert pos.get(tx.id).pending == "finalize", "the request went out: only recovery may settle it"

    def test_a_driver_refusing_input_while_building_leaves_nothing_claimed(self, pos, basket, driver, monkeypatch):
        from txengine.errors import ValidationError

        tx = pos.preview("reference", basket, customer_token=CUSTOMER)

        def refuse(tx, key):
            raise ValidationError("this provider cannot carry that amount")
            yield  # pragma: no cover  (a generator that refuses while building)

        monkeypatch.setattr(driver, "finalize", refuse)
        with pytest.raises(ValidationError, match="cannot carry"):
            pos.finalize(tx.id)
        assert pos.get(tx.id) == tx, "no attempt journaled, nothing pending"


def crash_at(engine, command, stop):
    """Run a command's operations until ``stop(op, performed)`` holds, then abandon it there:
    exactly what a process killed at that boundary leaves behind."""
    performed = []
    op = command.send(None)
    while not stop(op, performed):
        result = engine._perform(op)
        performed.append(op)
        op = command.send(result)
    command.close()


def before_the_call(op, performed):
    return isinstance(op, ProviderOp)


def after_the_provider_committed(op, performed):
    return bool(performed) and isinstance(performed[-1], ProviderOp)


class TestCrashes:
    @pytest.mark.parametrize("stop", [before_the_call, after_the_provider_committed])
    def test_a_restarted_engine_recovers_once_the_lease_runs_out(self, db_url, driver, sandbox, clock, basket, stop):
        with Engine.open(db_url, providers={"reference": driver}, clock=clock) as first:
            tx = first.preview("reference", basket, customer_token=CUSTOMER)
            crash_at(first, first.core.command(tx.id, "finalize"), stop)
        with Engine.open(db_url, providers={"reference": driver}, clock=clock) as second:
            assert second.get(tx.id).pending == "finalize"
            with pytest.raises(TransactionInDoubt):
                second.finalize(tx.id)  # the dead process still holds the lease
            assert second.recover() == 0
            clock.advance(seconds=60)
            assert second.recover() == 1
            assert second.get(tx.id).state == "finalized"
            assert finalize_commits(sandbox, tx) == 1
            assert replay(second.history(tx.id)) == second.get(tx.id)

    def test_an_in_doubt_transaction_never_expires_under_the_sweep(self, engine, basket, sandbox, clock):
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id)
        clock.advance(hours=1)
        assert engine.expire_due() == 0, "the provider may have committed: only recovery decides"
        assert engine.recover() == 1
        assert engine.get(tx.id).state == "finalized"


class TestIdempotentCommands:
    def test_the_same_key_returns_the_original_result(self, pos, basket, sandbox):
        first = pos.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="p1")
        pos.update(first.id, [tip()])
        again = pos.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="p1")
        assert again == first, "the original result, not the current state"
        assert len(sandbox.previews) == 1

        done = pos.finalize(first.id, idempotency_key="f1")
        assert pos.finalize(first.id, idempotency_key="f1") == done
        assert finalize_commits(sandbox, done) == 1

    def test_a_local_command_replays_too(self, pos, basket):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        paying = pos.begin_payment(tx.id, idempotency_key="b1")
        pos.finalize(tx.id)
        assert pos.begin_payment(tx.id, idempotency_key="b1") == paying

    def test_the_same_key_with_other_parameters_conflicts(self, pos, basket):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="p1")
        with pytest.raises(IdempotencyConflict):
            pos.preview("reference", basket, customer_token="someone-else", idempotency_key="p1")
        with pytest.raises(IdempotencyConflict):
            pos.update(tx.id, [tip()], idempotency_key="p1")  # the preview's key, another command
        pos.update(tx.id, [tip(100)], idempotency_key="u1")
        with pytest.raises(IdempotencyConflict):
            pos.update(tx.id, [tip(200)], idempotency_key="u1")

    def test_a_key_belongs_to_one_transaction(self, pos, basket):
        one = pos.preview("reference", basket, customer_token=CUSTOMER)
        two = pos.preview("reference", basket, customer_token=CUSTOMER)
        pos.cancel(one.id, idempotency_key="c1")
        with pytest.raises(IdempotencyConflict, match=one.id):
            pos.cancel(two.id, idempotency_key="c1")


class TestDeliveries:
    def test_finalize_enqueues_and_deliver_pending_sends_once(self, pos, basket, sandbox):
        tx = pos.finalize(pos.preview("reference", basket, customer_token=CUSTOMER).id)
        [queued] = pos.deliveries(tx.id)
        assert (queued.kind, queued.status) == ("receipt", "pending")
        assert pos.deliver_pending() == 1
        assert pos.deliver_pending() == 0
        assert sandbox.receipts == {tx.provider_ref: 1}
        assert pos.deliveries(tx.id)[0].status == "delivered"

    def test_failures_back_off_then_park_as_dead_never_dropped(self, engine, basket, sandbox, clock):
        tx = engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id)
        schedule = engine.core.capabilities["reference"].delivery_schedule
        sandbox.faults.inject("receipt", Fault.SERVER_ERROR, times=len(schedule) + 1)
        for attempt, delay in enumerate(schedule, start=1):
            assert engine.deliver_pending() == 0
            [row] = engine.deliveries(tx.id)
            assert (row.status, row.attempts) == ("pending", attempt)
            assert delay <= row.next_attempt_at - clock.now() <= delay * 1.2
            assert engine.deliver_pending() == 0, "not due yet"
            clock.set(row.next_attempt_at)
        assert engine.deliver_pending() == 0
        [row] = engine.deliveries(tx.id)
        assert row.status == "dead" and "503" in row.last_error
        assert engine.store.retry_delivery(row.id, clock.now())
        assert engine.deliver_pending() == 1
        assert sandbox.receipts == {tx.provider_ref: 1}
