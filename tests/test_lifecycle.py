"""The lifecycle through the public API, on both the blocking and the asyncio engine."""

from datetime import timedelta

import attrs
import pytest

from txengine import Capabilities, LineItem, Money
from txengine.errors import (
    IllegalTransition,
    PreviewExpired,
    RefundWindowClosed,
    TransactionNotFound,
    UnsupportedOperation,
    ValidationError,
)
from txengine.journal import replay
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox

from .conftest import CUSTOMER, tip

US = timedelta(microseconds=1)


def eur(minor):
    return Money(minor, "EUR")


def test_a_full_session_prices_updates_collects_finalizes_and_refunds(pos, basket, sandbox, clock):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="k1")
    assert (tx.state, tx.version) == ("previewed", 1)
    assert (tx.total_discount, tx.total_credits, tx.outstanding) == (eur(600), eur(800), eur(100))
    assert tx.expires_at == clock.now() + timedelta(minutes=10)

    clock.advance(minutes=9)
    tx = pos.update(tx.id, [LineItem(None, "Service fee", 1, eur(9), 27), tip(100)])
    assert tx.state == "updated"
    assert tx.outstanding == eur(209)
    assert [(l.name, l.discount, l.credits) for l in tx.items[1:]] == [
        ("Service fee", eur(0), eur(0)), ("Tip", eur(0), eur(0))]
    assert tx.expires_at == clock.now() - timedelta(minutes=9) + timedelta(minutes=20)

    clock.advance(minutes=5)  # past the original deadline, inside the extended one
    tx = pos.begin_payment(tx.id)
    assert tx.state == "payment_pending"
    tx = pos.finalize(tx.id)
    assert tx.state == "finalized"
    assert tx.refund_deadline == clock.now() + timedelta(hours=24)
    assert sandbox.balance(CUSTOMER) == 0

    tx = pos.refund(tx.id, comment="Customer returned the order")
    assert tx.state == "refunded"
    assert sandbox.balance(CUSTOMER) == 800
    assert pos.get(tx.id) == tx
    assert replay(pos.history(tx.id)) == tx


def test_every_line_and_total_adds_up(pos, basket):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    tx = pos.update(tx.id, [tip(250)])
    for line in tx.items:
        assert line.gross == line.discount + line.credits + line.outstanding
    assert tx.gross == tx.total_discount + tx.total_credits + tx.outstanding


def test_a_command_at_the_deadline_expires_the_transaction_and_persists_it(pos, basket, sandbox, clock):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    clock.set(tx.expires_at)
    calls = len(sandbox.requests)
    with pytest.raises(PreviewExpired) as raised:
        pos.finalize(tx.id)
    assert raised.value.tx_id == tx.id
    assert len(sandbox.requests) == calls, "an expired preview sends nothing"
    stored = pos.get(tx.id)
    assert stored.state == "expired"
    assert pos.history(tx.id)[-1].data["target"] == "expired"


def test_a_microsecond_before_the_deadline_is_still_in_time(pos, basket, clock):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    clock.set(tx.expires_at - US)
    assert pos.finalize(tx.id).state == "finalized"


def test_cancel_after_the_deadline_also_expires(pos, basket, clock):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    clock.advance(minutes=30)
    with pytest.raises(PreviewExpired):
        pos.cancel(tx.id)
    assert pos.get(tx.id).state == "expired"


def test_refunds_close_exactly_at_the_deadline_without_calling_the_provider(pos, basket, sandbox, clock):
    tx = pos.finalize(pos.preview("reference", basket, customer_token=CUSTOMER).id)
    clock.set(tx.refund_deadline)
    calls = len(sandbox.requests)
    with pytest.raises(RefundWindowClosed):
        pos.refund(tx.id)
    assert len(sandbox.requests) == calls
    assert pos.get(tx.id).state == "finalized"
    assert sandbox.balance(CUSTOMER) == 0


def test_a_refund_a_microsecond_before_the_deadline_goes_through(pos, basket, clock):
    tx = pos.finalize(pos.preview("reference", basket, customer_token=CUSTOMER).id)
    clock.set(tx.refund_deadline - US)
    assert pos.refund(tx.id).state == "refunded"


@pytest.mark.parametrize("ending", ["cancel", "refund", "expire"])
def test_terminal_transactions_refuse_everything_and_send_nothing(pos, basket, sandbox, clock, ending):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    if ending == "cancel":
        pos.cancel(tx.id)
    elif ending == "refund":
        pos.refund(pos.finalize(tx.id).id)
    else:
        clock.advance(minutes=10)
        assert pos.expire_due() == 1
    calls = len(sandbox.requests)
    for command in (lambda: pos.update(tx.id, [tip()]), lambda: pos.begin_payment(tx.id),
                    lambda: pos.finalize(tx.id), lambda: pos.cancel(tx.id), lambda: pos.refund(tx.id)):
        with pytest.raises(IllegalTransition):
            command()
    assert len(sandbox.requests) == calls
    assert pos.allowed_events(tx.id) == []


def test_allowed_events_come_from_the_machine_and_the_clock(pos, basket, clock):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    assert pos.allowed_events(tx.id) == ["update", "begin_payment", "finalize", "cancel"]
    clock.set(tx.expires_at)
    assert pos.allowed_events(tx.id) == []  # every command would raise PreviewExpired; expire is the engine's


def test_begin_payment_needs_an_outstanding_balance(pos, sandbox):
    sandbox.open_wallet("rich", 10_000)
    covered = [LineItem("beer", "Beer", 1, eur(500), 27)]
    tx = pos.preview("reference", covered, customer_token="rich")
    assert tx.outstanding == eur(0)
    with pytest.raises(IllegalTransition, match="nothing is outstanding"):
        pos.begin_payment(tx.id)
    assert pos.finalize(tx.id).state == "finalized"


def test_unsupported_events_are_refused_before_any_call(db_url, clock, sandbox, basket):
    from txengine import Engine

    class NoRefunds(ReferenceDriver):
        capabilities = attrs.evolve(ReferenceDriver.capabilities,
                                    remote=ReferenceDriver.capabilities.remote - {"refund"})

    driver = NoRefunds(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        tx = engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id)
        calls = len(sandbox.requests)
        with pytest.raises(UnsupportedOperation, match="does not support refund"):
            engine.refund(tx.id)
        assert len(sandbox.requests) == calls
        assert "refund" not in engine.allowed_events(tx.id)


def test_local_update_prices_new_lines_without_a_call(db_url, clock, sandbox, basket):
    from txengine import Engine

    class LocalUpdates(ReferenceDriver):
        capabilities = Capabilities(remote={"preview", "finalize", "cancel", "refund"},
                                    local={"begin_payment", "update"})

    driver = LocalUpdates(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        calls = len(sandbox.requests)
        tx = engine.update(tx.id, [tip(100)])
        assert len(sandbox.requests) == calls
        assert tx.outstanding == eur(200) and tx.state == "updated"


class TestExpireDue:
    def test_expires_only_what_is_due_and_counts_it(self, pos, basket, clock):
        first = pos.preview("reference", basket, customer_token=CUSTOMER)
        clock.advance(minutes=5)
        second = pos.preview("reference", basket, customer_token=CUSTOMER)
        clock.set(first.expires_at - US)
        assert pos.expire_due() == 0
        clock.set(first.expires_at)
        assert pos.expire_due() == 1
        assert pos.get(first.id).state == "expired"
        assert pos.get(second.id).state == "previewed"
        assert pos.expire_due() == 0

    def test_finalized_and_cancelled_transactions_never_expire(self, pos, basket, clock):
        kept = pos.finalize(pos.preview("reference", basket, customer_token=CUSTOMER).id)
        dropped = pos.cancel(pos.preview("reference", basket, customer_token=CUSTOMER).id)
        clock.advance(hours=1)
        assert pos.expire_due() == 0
        assert pos.get(kept.id).state == "finalized"
        assert pos.get(dropped.id).state == "cancelled"

    def test_sweeps_more_than_one_batch(self, engine, basket, clock):
        ids = [engine.preview("reference", basket).id for _ in range(7)]
        clock.advance(minutes=10)
        assert engine._run(engine.core.expire_due(batch=3)) == 7
        assert {engine.get(tx_id).state for tx_id in ids} == {"expired"}


class TestBadInput:
    """Bad caller input fails with ValidationError before any provider call, and stores nothing."""

    @pytest.mark.parametrize("call", [
        lambda pos, b: pos.preview("nope", b),
        lambda pos, b: pos.preview("reference", ["not a line"]),
        lambda pos, b: pos.preview("reference", []),
        lambda pos, b: pos.preview("reference", b, payment_type="CREDIT"),
        lambda pos, b: pos.preview("reference", b, idempotency_key=""),
        lambda pos, b: pos.preview("reference", b, idempotency_key="x" * 256),
        lambda pos, b: pos.preview("reference", b, customer_token=12345),
    ])
    def test_preview(self, pos, basket, sandbox, call):
        with pytest.raises(ValidationError):
            call(pos, basket)
        assert sandbox.requests == []

    def test_commands(self, pos, basket, sandbox):
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        calls = len(sandbox.requests)
        for call in (lambda: pos.update(tx.id, []),
                     lambda: pos.update(tx.id, [LineItem(None, "Tip", 1, Money(100, "USD"), 0)]),
                     lambda: pos.update(tx.id, "Tip"),
                     lambda: pos.refund(tx.id, comment="x" * 501)):
            with pytest.raises(ValidationError):
                call()
        assert len(sandbox.requests) == calls
        assert pos.get(tx.id) == tx

    def test_unknown_transactions(self, pos):
        with pytest.raises(TransactionNotFound, match="tx_missing"):
            pos.finalize("tx_missing")
        with pytest.raises(TransactionNotFound):
            pos.get("tx_missing")


def test_update_cannot_grow_a_transaction_past_the_line_limit(pos, sandbox):
    from txengine.models import MAX_LINES

    tx = pos.preview("reference", [tip(1)] * (MAX_LINES - 1), customer_token=CUSTOMER)
    calls = len(sandbox.requests)
    with pytest.raises(ValidationError, match=f"at most {MAX_LINES} lines"):
        pos.update(tx.id, [tip(), tip()])
    assert len(sandbox.requests) == calls
    assert len(pos.update(tx.id, [tip()]).items) == MAX_LINES


def test_an_event_the_lifecycle_forbids_is_illegal_before_it_is_unsupported(db_url, clock, sandbox, basket):
    from txengine import Engine

    class NoRefunds(ReferenceDriver):
        capabilities = attrs.evolve(ReferenceDriver.capabilities,
                                    remote=ReferenceDriver.capabilities.remote - {"refund"})

    driver = NoRefunds(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        open_tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        with pytest.raises(IllegalTransition, match="not allowed from here"):
            engine.refund(open_tx.id)
        engine.cancel(open_tx.id)
        with pytest.raises(IllegalTransition, match="final"):
            engine.refund(open_tx.id)


def test_cancel_over_an_update_the_provider_applied_but_never_answered(engine, sandbox, basket):
    """The provider's basket holds the lost update's lines after ours; the cancel's answer
    is still proof (its id, its status, our lines first) and ends the transaction."""
    from txengine.errors import OutcomeUnknown
    from txengine.testing.sandbox import Fault

    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.update(tx.id, [LineItem(None, "Tip", 1, Money(100, "EUR"), 0)])
    assert len(sandbox.previews[tx.provider_ref].lines) == len(tx.items) + 1  # it landed there

    assert engine.cancel(tx.id).state == "cancelled"
    assert engine.get(tx.id).pending is None
    assert sandbox.previews[tx.provider_ref].status == "cancelled"
