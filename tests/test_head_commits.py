"""An expiry written from the transaction's head, its body left where it is.

The sweep decides an expiry on a transaction's head (its columns: state, version,
deadlines, time) and the store sets those fields of the stored snapshot in place,
without reading or rewriting the basket, the receipt or the provider's details.  These
tests hold that path to what the whole path writes: the same journal entry and the same
snapshot (byte for byte on SQLite, whose json_set keeps the text's layout), a journal
that replays to it, and a head that lost its race refused alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txengine import Basket, Engine, journal
from txengine.codec import HEAD_FIELDS, dumps, encode_transaction, head_snapshot_fields, loads
from txengine.machine import ACTIVE, TimerPolicy, decide
from txengine.models import LineItem, Money, PricedLine, ReceiptLine, Transaction, TransactionHead
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers.sandbox import DEFAULT_API_KEY as CHEERS_KEY, WORKED_EXAMPLE_TRANSACTION_KEY
from txengine.store.base import Commit

from .conftest import tip
from .pg_server import query_one

START = datetime(2026, 1, 15, 10, 0, tzinfo=timezone.utc)
moments = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1),
                       timezones=st.just(timezone.utc))


def a_transaction(state: str, version: int, expires_at: datetime, updated_at: datetime) -> Transaction:
    line = PricedLine(item=LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27),
                      discount=Money(40, "EUR"), credits=Money(0, "EUR"), outstanding=Money(1460, "EUR"))
    return Transaction(id="tx_0190000000001234567890abcdef", provider="reference", state=state,
                       items=(line,), currency="EUR", payment_type="SPLIT_PAYMENT", expires_at=expires_at,
                       provider_ref="pv_1", receipt=(ReceiptLine("textline", "Danke"),),
                       details={"wallet": {"points": 12}}, version=version, created_at=START,
                       updated_at=updated_at)


def expiry_entry(tx: Transaction | TransactionHead, now: datetime):
    step = decide(tx, "expire", now, TimerPolicy())
    return journal.transition_event(tx, now, event=step.event, source=tx.state, target=step.target,
                                    fields=step.changes)


@given(state=st.sampled_from(sorted(ACTIVE)), version=st.integers(1, 10_000), expires_at=moments,
       updated_at=moments, late=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)))
def test_an_expiry_decided_on_the_head_is_the_expiry_of_the_whole_snapshot(state, version, expires_at,
                                                                         updated_at, late):
    """Whatever the state, version and times (a clock behind the last entry included)."""
    tx = a_transaction(state, version, expires_at, updated_at)
    now = expires_at + late
    head = TransactionHead.of(tx)
    entry = expiry_entry(head, now)
    assert entry == expiry_entry(tx, now)  # the same journal entry
    whole = journal.apply(tx, entry)
    new_head = journal.apply_to_head(head, entry)
    assert new_head == TransactionHead.of(whole)
    patched = encode_transaction(tx) | dict(zip(HEAD_FIELDS, head_snapshot_fields(new_head)))
    assert dumps(patched) == dumps(encode_transaction(whole))  # what the store writes in place


def test_an_event_that_changes_the_body_needs_the_whole_snapshot():
    tx = a_transaction("previewed", 3, START + timedelta(minutes=10), START)
    step = decide(tx, "update", START, TimerPolicy())
    entry = journal.transition_event(tx, START, event=step.event, source=tx.state, target=step.target,
                                     fields={**step.changes, "items": tx.items})
    assert journal.apply_to_head(TransactionHead.of(tx), entry) is None
    attempt = journal.note_event(tx, START, journal.ATTEMPT, event="finalize")
    assert journal.apply_to_head(TransactionHead.of(tx), attempt) is None


def test_a_commit_carries_a_whole_snapshot_or_a_head_not_both():
    tx = a_transaction("previewed", 1, START, START)
    with pytest.raises(ValueError, match="not both"):
        Commit(tx.id, 1, snapshot=tx, head=TransactionHead.of(tx))


def test_expired_in_place_reads_as_the_journal_replays_it(engine, db_url, basket, clock):
    """Previews, updated ones (a later deadline) and ones waiting for payment, swept."""
    previewed = [engine.preview("reference", basket).id for _ in range(3)]
    updated = engine.preview("reference", basket).id
    engine.update(updated, basket.items + (tip(),))
    pending = engine.preview("reference", basket).id
    engine.begin_payment(pending)
    clock.advance(timedelta(hours=1))
    assert engine.expire_due() == 5
    for tx_id in previewed + [updated, pending]:
        stored = engine.get(tx_id)
        assert stored.state == "expired"
        assert stored == journal.replay(engine.history(tx_id))
        [text] = query_one(db_url, "SELECT snapshot FROM transactions WHERE id = ?", (tx_id,))
        assert loads(text) == encode_transaction(stored)
        if db_url.startswith("sqlite:"):  # json_set keeps the layout the engine encodes
            assert text == dumps(encode_transaction(stored))
        [state, version] = query_one(db_url, "SELECT state, version FROM transactions WHERE id = ?", (tx_id,))
        assert (state, version) == ("expired", stored.version)


def test_a_head_that_lost_its_race_is_refused_alone(engine, basket, clock):
    stale = [engine.preview("reference", basket) for _ in range(3)]
    engine.begin_payment(stale[1].id)  # another command moved it after the sweep read its head
    clock.advance(timedelta(hours=1))

    def head_expiry(tx: Transaction) -> Commit:
        head = TransactionHead.of(tx)
        entry = expiry_entry(head, clock.now())
        return Commit(tx.id, tx.version, events=(entry,), head=journal.apply_to_head(head, entry))

    outcomes = engine.store.write_each([head_expiry(tx) for tx in stale])
    assert [type(outcome).__name__ for outcome in outcomes] == ["NoneType", "ConcurrentModification", "NoneType"]
    assert [engine.get(tx.id).state for tx in stale] == ["expired", "payment_pending", "expired"]
    assert [len(engine.history(tx.id)) for tx in stale] == [2, 2, 2]  # the refused one journaled nothing


def test_one_sweep_expires_heads_and_whole_snapshots_side_by_side(db_url, driver, basket, clock):
    """Reference previews (nothing to tell) and Cheers previews (a release to queue, built
    from the whole transaction) due in the same batch: each kind expires its own way."""
    cheers_sandbox = CheersSandbox(clock=clock)
    cheers_sandbox.seed_worked_example()
    cheers = CheersDriver(environment="sandbox", api_key=CHEERS_KEY, transport=cheers_sandbox.transport())
    with Engine.open(db_url, providers={"reference": driver, "cheers": cheers}, clock=clock) as engine:
        beers = Basket([LineItem("f04ce0c0-1034-40bf-a066-3e313f68c781", "Draft Beer 0.5L", 3,
                                 Money(50000, "HUF"), 27)])
        mixed = [engine.preview("reference", basket).id,
                 engine.preview("cheers", beers, customer_token=WORKED_EXAMPLE_TRANSACTION_KEY).id,
                 engine.preview("reference", basket).id]
        clock.advance(timedelta(hours=1))
        assert engine.expire_due() == 3
        for tx_id in mixed:
            expired = engine.get(tx_id)
            assert expired.state == "expired" and expired == journal.replay(engine.history(tx_id))
        assert [d.kind for d in engine.get(mixed[1]).deliveries] == ["release"]
        assert engine.get(mixed[0]).deliveries == ()


def test_sweeps_racing_over_the_same_rows_expire_each_once(engine, db_url, driver, basket, clock):
    """Four engines (each its own connections) sweep one database at once: their batches
    overlap, every expiry lands exactly once, and none of them fails or waits for ever."""
    due = [engine.preview("reference", basket).id for _ in range(400)]
    clock.advance(timedelta(hours=1))
    sweepers = [Engine.open(db_url, providers={"reference": driver}, clock=clock) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(sweepers)) as pool:
            expired = list(pool.map(lambda sweeper: sweeper.expire_due(), sweepers))
    finally:
        for sweeper in sweepers:
            sweeper.close()
    assert sum(expired) + engine.expire_due() == len(due)
    for tx_id in due:
        kinds = [entry.data.get("event") for entry in engine.history(tx_id)]
        assert kinds.count("expire") == 1 and engine.get(tx_id).state == "expired"
