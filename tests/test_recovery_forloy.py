"""Recovery against Forloy: a record (online) or a sync batch (offline store-and-forward)
whose answer is lost is sent again under the same ``idempotency_key``; Forloy replays it,
and its ledger holds each purchase once: one punch, one cashback, one discount.

Retry safety of each Forloy call (reviewed in ``providers/forloy/driver.py``):

- login and card lookup: commit nothing; re-sent inline;
- ``/transactions/record``: carries the intent's idempotency key (documented: a repeat
  returns the original result with ``"idempotent": true``), checked by Forloy before the
  punch cooldown, so a retry is never refused as a second punch;
- ``/transactions/sync``: every record carries its delivery's key; a re-sent batch
  replays the recorded ones and judges the rest at their ``client_timestamp``;
- refresh (token rotation) and reward claims are never re-sent; neither is a lifecycle
  side effect.  Refund is unsupported, cancel and expiry are local: nothing to recover.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import OutcomeUnknown
from txengine.providers.forloy import driver as forloy
from txengine.providers.forloy import ForloyDriver, forloy_pair
from txengine.testing.sandbox import Fault

COFFEE = Basket([LineItem("latte", "Latte", 2, Money.of("3.90", "EUR"), 7),
                 LineItem("cake", "Carrot cake", 1, Money.of("4.20", "EUR"), 7)])
LOST = 1 + forloy.SAFE_RETRIES  # the driver re-sends a keyed record once inline


def recorded(sandbox, tx_id):
    return [t for t in sandbox.transactions if t.pos_reference_id == tx_id]


CARDS = {
    "punch": lambda s: s.add_punch_card(current_punches=9),
    "cashback": lambda s: s.add_cashback_card(balance="10.00", cashback_rate="0.10"),
    "discount": lambda s: s.add_discount_card(discount_rate="0.15"),
}


def effect(card):
    """What one recorded purchase did to the card."""
    if card.card_type == "punch":
        return (card.lifetime_punches, card.current_punches)
    if card.card_type == "cashback":
        return (card.balance, card.lifetime_spend)
    return (card.lifetime_spend,)


EXPECTED = {"punch": (10, 0), "cashback": (Decimal("11.20"), Decimal("12.00")), "discount": (Decimal("12.00"),)}


@pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.GARBAGE_AFTER_COMMIT,
                                   Fault.TRUNCATED_AFTER_COMMIT, Fault.DROP_CONNECTION],
                         ids=lambda f: f.value)
@pytest.mark.parametrize("kind", sorted(CARDS))
def test_a_lost_record_is_recovered_to_one_purchase(db_url, clock, kind, fault):
    sandbox, driver = forloy_pair(clock)
    card = CARDS[kind](sandbox)
    with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as engine:
        tx = engine.begin_payment(engine.preview("forloy", COFFEE, customer_token=card.barcode_value).id)
        sandbox.faults.inject("record", fault, times=LOST)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id)
        sandbox.faults.clear()
        committed = fault is not Fault.DROP_CONNECTION
        assert len(recorded(sandbox, tx.id)) == int(committed)

        assert engine.recover() == 1

        done = engine.get(tx.id)
        assert (done.state, done.pending) == ("finalized", None)
        [purchase] = recorded(sandbox, tx.id)
        assert done.provider_ref == purchase.transaction_id
        assert done.details["idempotent_replay"] is committed
        assert effect(card) == EXPECTED[kind], "the card moved once"


def test_recovery_in_a_new_process_logs_in_again_and_replays(db_url, clock):
    sandbox, driver = forloy_pair(clock)
    card = sandbox.add_punch_card()
    with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as first:
        tx = first.preview("forloy", COFFEE, customer_token=card.barcode_value)
        sandbox.faults.inject("record", Fault.TIMEOUT_AFTER_COMMIT, times=LOST)
        with pytest.raises(OutcomeUnknown):
            first.finalize(tx.id)
    clock.advance(hours=2)  # the old session's token has expired too
    fresh = ForloyDriver(environment="production", email=sandbox.STAFF_EMAIL, password=sandbox.STAFF_PASSWORD,
                         location_id=sandbox.LOCATION_ID, staff_user_id=sandbox.STAFF_USER_ID,
                         clock=clock, transport=sandbox.transport())
    with Engine.open(db_url, providers={"forloy": fresh}, clock=clock) as second:
        assert second.recover() == 1
        assert second.get(tx.id).state == "finalized"
    assert len(recorded(sandbox, tx.id)) == 1 and card.lifetime_punches == 1


class TestOffline:
    @pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT,
                                       Fault.SERVER_ERROR, Fault.TIMEOUT_BEFORE_COMMIT],
                             ids=lambda f: f.value)
    def test_a_lost_sync_batch_is_resent_and_each_record_lands_once(self, db_url, clock, fault):
        sandbox, driver = forloy_pair(clock, offline=True)
        cards = [CARDS[kind](sandbox) for kind in sorted(CARDS)]
        with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as engine:
            txs = [engine.finalize(engine.preview("forloy", COFFEE, customer_token=c.qr_code_data).id)
                   for c in cards]
            sandbox.faults.inject("sync", fault, times=LOST)
            assert engine.deliver_pending() == 0
            sandbox.faults.clear()
            rows = [engine.get(tx.id).deliveries[0] for tx in txs]
            assert {(r.status, r.attempts) for r in rows} == {("pending", 1)}

            clock.set(max(r.next_attempt_at for r in rows))
            assert engine.deliver_pending() == 3
        assert [len(recorded(sandbox, tx.id)) for tx in txs] == [1, 1, 1]
        assert [effect(c) for c in cards] == [EXPECTED[kind] for kind in sorted(CARDS)]
        syncs = [r for r in sandbox.requests if r.path.endswith("/transactions/sync")]
        assert len(syncs) >= 2 and not any(r.path.endswith("/transactions/record") for r in sandbox.requests)

    def test_a_batch_of_a_hundred_and_one_goes_as_two_syncs(self, db_url, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        with Engine.open(db_url, providers={"forloy": driver}, clock=clock, delivery_round=200) as engine:
            for _ in range(forloy.SYNC_BATCH_LIMIT + 1):
                card = sandbox.add_cashback_card()
                engine.finalize(engine.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
            assert engine.deliver_pending() == forloy.SYNC_BATCH_LIMIT + 1
        syncs = [r for r in sandbox.requests if r.path.endswith("/transactions/sync")]
        assert len(syncs) == 2 and len(sandbox.transactions) == forloy.SYNC_BATCH_LIMIT + 1


def outbox_payloads(db_url: str) -> list[str]:
    """The outbox's payload column as stored, read around the engine."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as database:
            return [row[0] for row in database.execute("SELECT payload FROM outbox ORDER BY id")]
    import psycopg

    with psycopg.connect(db_url) as database:
        return [row[0] for row in database.execute("SELECT payload FROM outbox ORDER BY id")]


def a_new_process_driver(sandbox, clock) -> ForloyDriver:
    return ForloyDriver(email=sandbox.STAFF_EMAIL, password=sandbox.STAFF_PASSWORD, location_id=sandbox.LOCATION_ID,
                        staff_user_id=sandbox.STAFF_USER_ID, transport=sandbox.transport(), clock=clock,
                        base_url=sandbox.base_url, offline=True)


class TestOfflineAcrossARestart:
    """The sync record needs the customer's QR code; the POS process may restart between
    the sale and its sync, or between a sync whose answer was lost and its re-send."""

    @pytest.mark.parametrize("fault", [None, Fault.GARBAGE_AFTER_COMMIT, Fault.TIMEOUT_AFTER_COMMIT],
                             ids=lambda f: "not sent yet" if f is None else f.value)
    def test_a_queued_record_is_synced_by_the_restarted_engine_exactly_once(self, db_url, clock, fault):
        sandbox, driver = forloy_pair(clock, offline=True)
        card = sandbox.add_punch_card()
        with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as engine:
            tx = engine.finalize(engine.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
            if fault is not None:
                sandbox.faults.inject("sync", fault, times=LOST)
                assert engine.deliver_pending() == 0
                sandbox.faults.clear()
        stored = outbox_payloads(db_url)
        assert card.qr_code_data not in "".join(stored), "the QR code is sealed, never stored as text"
        assert all("$sealed" in payload for payload in stored)

        restarted = a_new_process_driver(sandbox, clock)  # nothing in memory
        with Engine.open(db_url, providers={"forloy": restarted}, clock=clock) as engine:
            clock.advance(timedelta(minutes=5))
            assert engine.deliver_pending() == 1
            assert engine.get(tx.id).deliveries[0].status == "delivered"
        [record] = recorded(sandbox, tx.id)
        assert record.via == "sync" and card.lifetime_punches == 1
        assert not any("$sealed" in payload for payload in outbox_payloads(db_url)), "deleted once delivered"

    def test_a_record_queued_without_its_qr_code_stays_unsent_when_the_card_is_scanned_again(self, db_url, clock):
        """Found by the property kit: the process restarted between the scan and finalize,
        so the record was queued without the code; a later scan of the same card put the
        code in the new process's memory, the record went out with it, its answer was
        lost, the process restarted again, and then no process could re-send it: parked as
        never sent while Forloy held it.  Only the code sealed into the record counts."""
        sandbox, driver = forloy_pair(clock, offline=True)
        card = sandbox.add_cashback_card(balance="10.00", cashback_rate="0.10")
        with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as engine:
            tx = engine.preview("forloy", COFFEE, customer_token=card.qr_code_data)
        restarted = a_new_process_driver(sandbox, clock)  # the scan is forgotten
        with Engine.open(db_url, providers={"forloy": restarted}, clock=clock) as engine:
            engine.finalize(tx.id)  # queued without the code
            engine.preview("forloy", COFFEE, customer_token=card.qr_code_data)  # the same card, scanned again
            assert engine.deliver_pending() == 0
            [sync] = engine.get(tx.id).deliveries
        assert sync.status == "dead" and sync.last_error.startswith(f"[{forloy.QR_UNAVAILABLE}]")
        assert recorded(sandbox, tx.id) == [] and effect(card) == (Decimal("10.00"), Decimal("0"))
        assert not any(r.path.endswith("/transactions/sync") for r in sandbox.requests)

    def test_a_record_sealed_under_another_secret_key_is_refused_before_it_is_sent(self, db_url, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        card = sandbox.add_punch_card()
        with Engine.open(db_url, providers={"forloy": driver}, clock=clock, secret_key="the first POS secret key") as engine:
            tx = engine.finalize(engine.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        restarted = a_new_process_driver(sandbox, clock)
        with Engine.open(db_url, providers={"forloy": restarted}, clock=clock, secret_key="another POS secret key") as engine:
            assert engine.deliver_pending() == 0
            [sync] = engine.get(tx.id).deliveries
        assert sync.status == "dead" and sync.last_error.startswith(f"[{forloy.QR_UNAVAILABLE}]")
        assert recorded(sandbox, tx.id) == [] and card.lifetime_punches == 0
        assert not any(r.path.endswith("/transactions/sync") for r in sandbox.requests)
