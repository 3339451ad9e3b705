"""Whole POS sessions through the engine against the Forloy sandbox."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from txengine import AsyncEngine, Basket, Engine, LineItem, Money
from txengine.errors import (
    OutcomeUnknown,
    ProviderRejected,
    TransactionInDoubt,
    UnsupportedOperation,
    ValidationError,
)
from txengine.providers.forloy import forloy_pair
from txengine.providers.forloy import driver as forloy
from txengine.testing.sandbox import Fault


def eur(amount: str) -> Money:
    return Money.of(amount, "EUR")


COFFEE = Basket([LineItem("latte", "Latte", 2, eur("3.90"), 7), LineItem("cake", "Carrot cake", 1, eur("4.20"), 7)])
TIP = LineItem(None, "Tip", 1, eur("1.00"), 0)


@pytest.fixture
def pair(clock):
    return forloy_pair(clock)


@pytest.fixture
def pos(pair, db_url, clock):
    with Engine.open(db_url, providers={"forloy": pair[1]}, clock=clock) as engine:
        yield engine


def calls(sandbox) -> list[str]:
    return [r.path.removeprefix("/api/v1") for r in sandbox.requests]


def test_a_punch_card_session_earns_its_reward(pos, pair):
    sandbox, _ = pair
    card = sandbox.add_punch_card(current_punches=9)
    tx = pos.preview("forloy", COFFEE, customer_token=card.qr_code_data, idempotency_key="till-1")
    assert (tx.state, tx.total_discount, tx.total_credits, tx.outstanding) == (
        "previewed", eur("0"), eur("0"), eur("12.00"))
    tx = pos.update(tx.id, [TIP])
    tx = pos.begin_payment(tx.id)
    assert tx.outstanding == eur("13.00")
    tx = pos.finalize(tx.id)
    assert tx.state == "finalized"
    assert tx.details["reward_earned"] is True and tx.details["new_punch_count"] == 10
    assert tx.provider_ref == sandbox.transactions[0].transaction_id
    assert sandbox.transactions[0].purchase_amount == Decimal("12.00")  # the tip earns nothing
    assert calls(sandbox) == ["/auth/login", "/cards/lookup", "/transactions/record"]
    assert len(sandbox.rewards_of(card.card_instance_id, "pending_claim")) == 1
    assert any("Free Coffee" in line.text for line in tx.receipt)


def test_a_discount_card_session_adds_up_line_by_line(pos, pair):
    sandbox, _ = pair
    card = sandbox.add_discount_card(discount_rate="0.15")
    tx = pos.preview("forloy", COFFEE, customer_token=card.barcode_value)
    for line in tx.items:
        assert line.gross == line.discount + line.credits + line.outstanding
    assert tx.total_discount == eur("1.80") and tx.outstanding == eur("10.20")
    tx = pos.finalize(pos.begin_payment(pos.update(tx.id, [TIP]).id).id)
    assert tx.details["discount_amount"] == "1.80" and tx.details["discount_matches_preview"] is True
    assert sandbox.transactions[0].discount_amount == tx.total_discount.to_decimal()


def test_refund_is_unsupported_and_sends_nothing(pos, pair):
    sandbox, _ = pair
    card = sandbox.add_cashback_card()
    tx = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    sent = len(sandbox.requests)
    with pytest.raises(UnsupportedOperation):
        pos.refund(tx.id, comment="returned")
    assert len(sandbox.requests) == sent
    assert pos.allowed_events(tx.id) == []
    assert pos.get(tx.id).state == "finalized"


def test_cancel_and_expiry_are_local(pos, pair, clock):
    sandbox, _ = pair
    card = sandbox.add_punch_card()
    cancelled = pos.cancel(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    left = pos.preview("forloy", COFFEE, customer_token=card.barcode_value)
    clock.advance(forloy.TIMERS.preview_ttl)
    assert pos.expire_due() == 1
    assert cancelled.state == "cancelled" and pos.get(left.id).state == "expired"
    assert calls(sandbox) == ["/auth/login", "/cards/lookup", "/cards/lookup"]
    assert sandbox.transactions == []


def test_a_cooldown_leaves_the_payment_pending_until_the_minute_is_over(pos, pair, clock):
    sandbox, _ = pair
    card = sandbox.add_punch_card()
    pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    clock.advance(seconds=20)
    second = pos.begin_payment(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    with pytest.raises(ProviderRejected) as refused:
        pos.finalize(second.id)
    assert refused.value.code == "COOLDOWN_ACTIVE" and refused.value.retry_after == 40
    assert pos.get(second.id).state == "payment_pending"
    clock.advance(seconds=refused.value.retry_after)
    assert pos.finalize(second.id).state == "finalized"
    assert [tx.punches_added for tx in sandbox.transactions] == [1, 1]


def test_an_unknown_record_is_recovered_exactly_once(pos, pair):
    sandbox, _ = pair
    card = sandbox.add_cashback_card(balance="10.00", cashback_rate="0.10")
    tx = pos.begin_payment(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    sandbox.faults.inject("record", Fault.TIMEOUT_AFTER_COMMIT, times=1 + forloy.SAFE_RETRIES)
    with pytest.raises(OutcomeUnknown):
        pos.finalize(tx.id)
    assert pos.get(tx.id).pending == "finalize"
    with pytest.raises(TransactionInDoubt):
        pos.cancel(tx.id)
    assert pos.recover() == 1
    done = pos.get(tx.id)
    assert done.state == "finalized" and done.details["idempotent_replay"] is True
    assert len(sandbox.transactions) == 1 and card.balance == Decimal("11.20")


def test_a_long_lived_engine_refreshes_its_session(pos, pair, clock):
    sandbox, _ = pair
    card = sandbox.add_cashback_card()
    pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    clock.advance(hours=2)
    pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
    assert (sandbox.logins, sandbox.refreshes) == (1, 1)


def test_bad_input_is_refused_before_forloy_hears_of_it(pos, pair):
    sandbox, _ = pair
    dollars = Basket([LineItem(None, "Coffee", 1, Money.of("3.00", "USD"), 7)])
    with pytest.raises(ValidationError):
        pos.preview("forloy", dollars, customer_token="90001234567890")
    with pytest.raises(ValidationError):
        pos.preview("forloy", COFFEE, customer_token=None)
    assert sandbox.requests == []


def test_no_secret_reaches_the_database(pos, pair, db_url):
    sandbox, driver = pair
    card = sandbox.add_punch_card()
    tx = pos.preview("forloy", COFFEE, customer_token=card.qr_code_data)
    pos.finalize(tx.id)
    path = Path(db_url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")
        dump = "\n".join(db.iterdump())
    for secret in (card.qr_code_data, sandbox.STAFF_PASSWORD, driver._session.access_token.reveal(),
                   driver._session.refresh_token.reveal()):
        assert secret not in dump
    assert card.card_instance_id in dump  # the card's id is kept, its key is not


class TestOffline:
    @pytest.fixture
    def offline(self, clock, db_url):
        sandbox, driver = forloy_pair(clock, offline=True)
        with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as engine:
            yield sandbox, engine

    def test_finalize_commits_locally_and_one_sync_delivers_the_batch(self, offline, clock):
        sandbox, pos = offline
        cards = [sandbox.add_punch_card(current_punches=9) for _ in range(3)]
        done = [pos.finalize(pos.preview("forloy", COFFEE, customer_token=c.qr_code_data).id) for c in cards]
        assert all(tx.state == "finalized" for tx in done)
        assert sandbox.transactions == []  # nothing recorded yet
        assert [row.status for row in pos.deliveries()] == ["pending"] * 3
        assert pos.deliver_pending() == 3
        assert pos.deliver_pending() == 0
        syncs = [r for r in sandbox.requests if r.path.endswith("/transactions/sync")]
        assert len(syncs) == 1 and not any(r.path.endswith("/transactions/record") for r in sandbox.requests)
        assert sorted(tx.pos_reference_id for tx in sandbox.transactions) == sorted(tx.id for tx in done)
        assert all(c.current_punches == 0 for c in cards)
        assert [row.status for row in pos.deliveries()] == ["delivered"] * 3

    def test_a_lost_sync_is_retried_later_without_doubling(self, offline, clock):
        sandbox, pos = offline
        card = sandbox.add_cashback_card(cashback_rate="0.10")
        tx = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        sandbox.faults.inject("sync", Fault.TIMEOUT_AFTER_COMMIT, times=1 + forloy.SAFE_RETRIES)
        assert pos.deliver_pending() == 0
        [row] = pos.deliveries(tx.id)
        assert row.status == "pending" and row.attempts == 1
        clock.set(row.next_attempt_at)
        assert pos.deliver_pending() == 1
        assert len(sandbox.transactions) == 1 and card.balance == Decimal("1.20")

    def test_a_refused_record_is_parked_visible_never_dropped(self, offline, clock):
        sandbox, pos = offline
        card = sandbox.add_punch_card()
        first = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        pos.deliver_pending()
        clock.advance(seconds=30)
        second = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        assert pos.deliver_pending() == 0
        [row] = pos.deliveries(second.id)
        assert row.status == "dead" and "COOLDOWN_ACTIVE" in row.last_error
        assert pos.deliveries(first.id)[0].status == "delivered"

    def test_a_batch_refused_in_part_settles_each_record_on_its_own(self, offline, clock):
        sandbox, pos = offline
        card = sandbox.add_punch_card()
        first = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        clock.advance(seconds=30)  # inside the punch cooldown: Forloy refuses the second record
        second = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        assert pos.deliver_pending() == 1, "one sync batch: one accepted, one refused"
        syncs = [r for r in sandbox.requests if r.path.endswith("/transactions/sync")]
        assert len(syncs) == 1
        assert pos.deliveries(first.id)[0].status == "delivered"
        [refused] = pos.deliveries(second.id)
        assert refused.status == "dead" and "COOLDOWN_ACTIVE" in refused.last_error


async def test_the_async_engine_runs_the_same_session(clock, db_url):
    sandbox, driver = forloy_pair(clock)
    card = sandbox.add_discount_card(discount_rate="0.10")
    async with AsyncEngine.open(db_url, providers={"forloy": driver}, clock=clock) as pos:
        tx = await pos.preview("forloy", COFFEE, customer_token=card.qr_code_data)
        tx = await pos.update(tx.id, [TIP])
        tx = await pos.finalize((await pos.begin_payment(tx.id)).id)
    assert tx.state == "finalized" and tx.total_discount == eur("1.20")
    assert tx.details["final_amount"] == "10.80"
    await driver.aclose()
