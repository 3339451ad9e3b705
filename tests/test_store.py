"""The SQLite store: durability settings, migrations, the append-only journal, exact replay,
and an expiry sweep whose cost follows the number due."""

import sqlite3

import pytest

from txengine.journal import replay
from txengine.store.sqlite import MIGRATIONS, SQLiteStore

from .conftest import CUSTOMER, tip


def raw(engine):
    return sqlite3.connect(engine.store.path)


def test_wal_and_full_synchronous_on_every_connection(engine):
    connection = engine.store._connection()
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_migrations_are_versioned_and_run_once(tmp_path):
    path = str(tmp_path / "m.db")
    store = SQLiteStore(path)
    assert store.schema_version == len(MIGRATIONS)
    key = store.keyed_hash_key()
    store.close()
    again = SQLiteStore(path)
    assert again.schema_version == len(MIGRATIONS)
    assert again.keyed_hash_key() == key, "reopening keeps the keyed-hash key"
    assert raw_count(path, "SELECT count(*) FROM schema_version") == len(MIGRATIONS)


def raw_count(path, sql):
    with sqlite3.connect(path) as connection:
        return connection.execute(sql).fetchone()[0]


def test_an_in_memory_database_is_refused():
    with pytest.raises(ValueError, match="durable"):
        SQLiteStore(":memory:")


def test_the_journal_is_append_only(engine, basket):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    with raw(engine) as connection:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute("UPDATE journal SET kind = 'x' WHERE tx_id = ?", (tx.id,))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute("DELETE FROM journal WHERE tx_id = ?", (tx.id,))


def test_replaying_the_journal_rebuilds_every_stored_snapshot(engine, basket, clock, sandbox):
    sandbox.open_wallet("other", 50)
    finished = engine.refund(engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id).id)
    updated = engine.update(engine.preview("reference", basket, customer_token="other").id, [tip()])
    engine.begin_payment(updated.id)
    engine.cancel(engine.preview("reference", basket).id)
    engine.preview("reference", basket)
    clock.advance(minutes=10)
    engine.expire_due()
    ids = engine.store.transaction_ids()
    assert len(ids) == 4
    assert finished.id in ids
    for tx_id in ids:
        stored = engine.store.load(tx_id)
        assert replay(engine.store.journal(tx_id)) == stored
        assert stored.version == len(engine.store.journal(tx_id))


def test_the_expiry_sweep_reads_the_deadline_index(engine, clock):
    """EXPLAIN the very statement the sweep runs: an index range scan in deadline order."""
    connection = engine.store._connection()
    statements = []
    connection.set_trace_callback(statements.append)
    engine.store.due_for_expiry(clock.now(), 10, ("reference",))
    connection.set_trace_callback(None)
    [sweep] = [sql for sql in statements if "FROM transactions" in sql]
    plan = [row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {sweep}")]
    assert any("transactions_due" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), "no sort: the index is the order"


def test_the_sweep_visits_only_due_rows(engine, basket, clock):
    """Thousands stored, a handful due: the sweep's reads follow the due count."""
    store = engine.store
    stored = [engine.preview("reference", basket).id for _ in range(40)]
    clock.advance(minutes=9)
    due_later = [engine.preview("reference", basket).id for _ in range(3)]
    for tx_id in stored:
        engine.finalize(tx_id)  # finalized rows leave the partial index
    visited, loads = [], []
    due_for_expiry, load_many = store.due_for_expiry, store.load_many

    def spied_due(*args):
        heads = due_for_expiry(*args)
        visited.extend(head.id for head in heads)
        return heads

    store.due_for_expiry = spied_due
    store.load_many = lambda tx_ids: loads.extend(tx_ids) or load_many(tx_ids)
    clock.advance(minutes=10)
    assert engine.expire_due() == 3
    assert sorted(visited) == sorted(due_later)
    assert loads == []  # the reference provider is told nothing of an expiry: no snapshot is read whole
    store.due_for_expiry, store.load_many = due_for_expiry, load_many


def test_engines_for_different_providers_share_a_database_without_spinning(db_url, clock, sandbox, basket):
    """A full batch of rows this engine has no driver for is never read, expired or retried."""
    from txengine import Engine
    from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
    from txengine.testing.sandbox import Fault

    other = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    mine = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"other": other}, clock=clock) as theirs, \
            Engine.open(db_url, providers={"reference": mine}, clock=clock) as ours:
        foreign = [theirs.preview("other", basket).id for _ in range(4)]
        in_doubt = [theirs.preview("other", basket).id for _ in range(3)]
        for tx_id in in_doubt:
            sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
            with pytest.raises(Exception):
                theirs.finalize(tx_id)
        own = ours.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
        with pytest.raises(Exception):
            ours.finalize(own.id)
        clock.advance(minutes=10)
        assert ours._run(ours.core.recover(batch=2)) == 1, "its own intent, behind three foreign ones"
        assert ours.get(own.id).pending is None  # settled: the sandbox refused the late finalize
        assert ours._run(ours.core.expire_due(batch=2)) == 1, "its own, behind four foreign ones"
        assert ours.get(own.id).state == "expired"
        assert {theirs.get(tx_id).state for tx_id in foreign} == {"previewed"}
        assert theirs.expire_due() == 4
