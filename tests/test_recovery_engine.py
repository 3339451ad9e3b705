"""The engine's side of recovery: re-sends under the original key, backing off while the
provider keeps failing (a POS retrying the command itself is never held back), leaving
other engines' providers alone, and a schema-1 database migrated in place."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from txengine import Engine
from txengine.core import RECOVERY_BACKOFF
from txengine.errors import OutcomeUnknown
from txengine.store.sqlite import MIGRATIONS, SQLiteStore, _statements
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER


def finalize_keys(sandbox, tx):
    return [r.header("idempotency-key") for r in sandbox.requests
            if r.path == f"/previews/{tx.provider_ref}/finalize"]


def test_recover_backs_off_while_the_provider_stays_down(engine, basket, sandbox, clock):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    backoffs = RECOVERY_BACKOFF[1:4]  # 5 s, 30 s, 2 min: well inside the preview's 10 minutes
    sandbox.faults.inject("finalize", Fault.SERVER_ERROR, times=1 + len(backoffs))
    with pytest.raises(OutcomeUnknown):
        engine.finalize(tx.id, idempotency_key="fin-1")
    sends = 1
    for backoff in backoffs:
        assert engine.recover() == 0  # due at once after the first failure, then backing off
        sends += 1
        assert len(finalize_keys(sandbox, tx)) == sends
        assert engine.recover() == 0 and len(finalize_keys(sandbox, tx)) == sends, "not yet due"
        clock.advance(backoff - timedelta(microseconds=1))
        assert engine.recover() == 0 and len(finalize_keys(sandbox, tx)) == sends
        clock.advance(timedelta(microseconds=1))
    assert engine.recover() == 1, "the provider is back"
    assert engine.get(tx.id).state == "finalized"
    assert set(finalize_keys(sandbox, tx)) == {"fin-1"}, "always the original key"
    assert sandbox.commits == [(tx.provider_ref, "finalize")]


def test_the_pos_retrying_its_command_is_never_held_back(engine, basket, sandbox):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    sandbox.faults.inject("finalize", Fault.SERVER_ERROR, times=3)
    for _ in range(3):
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id, idempotency_key="fin-1")
    assert engine.finalize(tx.id, idempotency_key="fin-1").state == "finalized"
    assert len(finalize_keys(sandbox, tx)) == 4


def test_an_engine_without_the_provider_leaves_its_intents_alone(db_url, basket, sandbox, clock, driver):
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as pos:
        tx = pos.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_BEFORE_COMMIT)
        with pytest.raises(OutcomeUnknown):
            pos.finalize(tx.id)
    other = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    other.name = "elsewhere"
    with Engine.open(db_url, providers={"elsewhere": other}, clock=clock) as unrelated:
        assert unrelated.recover() == 0
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as pos:
        assert pos.recover() == 1 and pos.get(tx.id).state == "finalized"


def test_a_schema_1_database_is_migrated_and_its_queue_still_drains(tmp_path, basket, sandbox, clock, driver):
    path = tmp_path / "old.db"
    with Engine.open(f"sqlite:///{path}", providers={"reference": driver}, clock=clock) as engine:
        tx = engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id)
    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as db:  # the same data, in the first schema
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in _statements(MIGRATIONS[0]):
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute(f"ATTACH DATABASE '{path}' AS new")
        for table in ("meta", "transactions", "journal"):
            db.execute(f"INSERT INTO {table} SELECT * FROM new.{table}")
        db.execute("INSERT INTO commands SELECT key, command, fingerprint, tx_id, status, version, code,"
                   " message, lease_until FROM new.commands")
        db.execute("INSERT INTO outbox SELECT id, tx_id, provider, kind, payload, idempotency_key, status,"
                   " attempts, next_attempt_at, lease_until, last_error, created_at, delivered_at FROM new.outbox")
    store = SQLiteStore(str(old))
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    with Engine.open(f"sqlite:///{old}", providers={"reference": driver}, clock=clock) as engine:
        assert [d.status for d in engine.get(tx.id).deliveries] == ["pending"]
        assert engine.deliver_pending() == 1
        assert engine.store.workers() == []
    assert sandbox.receipts == {tx.provider_ref: 1}
