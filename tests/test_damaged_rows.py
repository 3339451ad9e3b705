"""A row damaged behind the engine's back is a storage failure, never a bare decoding error.

SQLite checksums nothing: a bit flipped on a failing disk, or a hand edit, can leave a
snapshot, a journal entry or an intent that is no longer what the engine wrote.  Reading
one that no longer decodes raises ``StoreUnavailable`` naming the record; one that
decodes into a value a validator refuses raises that ``ValidationError`` (as
tests/test_typed_api.py has it for a state the lifecycle does not know).  Either is an
``EngineError``, changes nothing, and leaves every other transaction working.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner

from txengine import Basket, Engine, LineItem, Money
from txengine.app.cli import cli
from txengine.errors import StoreUnavailable, ValidationError
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers.sandbox import DEFAULT_API_KEY as CHEERS_KEY, WORKED_EXAMPLE_WALLET

from .conftest import tip
from .pg_server import execute

#: how the snapshot is damaged -> (its text, or None: the real one with a line's quantity
#: set to 0), what reading it raises
DAMAGE = {
    "not JSON": ("{\"id\": \"tx_", StoreUnavailable, "stored snapshot is damaged"),
    "a field missing": ("{\"id\": \"x\"}", StoreUnavailable, "stored snapshot is damaged"),
    "an invalid value": (None, ValidationError, "quantity must be between 1"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_snapshot_fails_typed_for_that_transaction_only(engine, db_url, basket, damage):
    damaged, healthy = engine.preview("reference", basket), engine.preview("reference", basket)
    text, error, message = DAMAGE[damage]
    if text is None:
        execute(db_url, "UPDATE transactions SET snapshot = replace(snapshot, '\"quantity\":3', '\"quantity\":0')"
                        " WHERE id = ?", (damaged.id,))
    else:
        execute(db_url, "UPDATE transactions SET snapshot = ? WHERE id = ?", (text, damaged.id))
    engine.close()
    reopened = type(engine).open(db_url, providers=dict(engine.drivers), clock=engine.clock)
    try:
        for command in (lambda: reopened.get(damaged.id), lambda: reopened.begin_payment(damaged.id),
                        lambda: reopened.update(damaged.id, basket.items + (tip(),))):
            with pytest.raises(error, match=message) as raised:
                command()
            if error is StoreUnavailable:
                assert raised.value.tx_id == damaged.id
        assert reopened.begin_payment(healthy.id).state == "payment_pending"
    finally:
        reopened.close()


def test_a_damaged_journal_entry_is_a_storage_failure_naming_it(engine, db_url, basket):
    tx = engine.preview("reference", basket)
    # the journal refuses every change (a trigger): damage that gets past it
    execute(db_url, "DROP TRIGGER journal_is_append_only_update" if db_url.startswith("sqlite:")
            else "ALTER TABLE journal DISABLE TRIGGER journal_is_append_only")
    execute(db_url, "UPDATE journal SET data = 'garbage' WHERE tx_id = ? AND seq = 1", (tx.id,))
    with pytest.raises(StoreUnavailable, match=f"journal entry 1 of {tx.id} is damaged"):
        engine.history(tx.id)
    assert engine.get(tx.id).state == "previewed"  # the snapshot is intact: the POS can go on


# --- the expiry sweep: one damaged row neither stops it nor goes unnoticed ----------------------


def open_with_cheers(db_url, driver, clock, sandbox):
    """An engine with the reference provider (expired on its head) and Cheers (whose
    expiry is built from the whole snapshot: a release to queue)."""
    cheers = CheersDriver(environment="sandbox", api_key=CHEERS_KEY, transport=sandbox.transport())
    return Engine.open(db_url, providers={"reference": driver, "cheers": cheers}, clock=clock)


def sweep_refusing(engine, damaged: str, expired: int) -> None:
    with pytest.raises(StoreUnavailable, match=f"expired {expired}; 1 due transaction.* damaged.*{damaged}") as raised:
        engine.expire_due()
    assert raised.value.tx_id == damaged


def test_a_sweep_expires_every_readable_due_transaction_then_names_the_damaged_one(db_url, driver, basket, clock):
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_worked_example()
    with open_with_cheers(db_url, driver, clock, sandbox) as engine:
        beers = Basket([LineItem("f04ce0c0-1034-40bf-a066-3e313f68c781", "Draft Beer 0.5L", 1,
                                 Money(50000, "HUF"), 27)])
        cheers = [engine.preview("cheers", beers, customer_token=sandbox.issue_transaction_key(WORKED_EXAMPLE_WALLET)).id
                  for _ in range(3)]
        reference = [engine.preview("reference", basket).id for _ in range(2)]
    damaged = cheers[1]
    execute(db_url, "UPDATE transactions SET snapshot = ? WHERE id = ?", ('{"id": "x"}', damaged))
    clock.advance(timedelta(hours=1))
    with open_with_cheers(db_url, driver, clock, sandbox) as engine:  # reopened: nothing of it is cached
        sweep_refusing(engine, damaged, expired=4)
        for tx_id in cheers + reference:
            if tx_id != damaged:
                assert engine.get(tx_id).state == "expired"
        assert [d.kind for d in engine.get(cheers[0]).deliveries] == ["release"]
        sweep_refusing(engine, damaged, expired=0)  # every sweep says so until it is mended
        [head] = engine.store.due_for_expiry(clock.now(), 10, ["cheers"])
        assert head.id == damaged and head.state == "previewed" and head.version == 1  # left as it is


def test_a_sweep_refuses_a_head_whose_snapshot_is_not_json_alone(db_url, engine, basket, clock):
    due = [engine.preview("reference", basket).id for _ in range(3)]
    execute(db_url, "UPDATE transactions SET snapshot = ? WHERE id = ?", ('{"id": "tx_', due[1]))
    clock.advance(timedelta(hours=1))
    sweep_refusing(engine, due[1], expired=2)
    assert [engine.get(tx_id).state for tx_id in (due[0], due[2])] == ["expired", "expired"]
    assert len(engine.store.journal(due[1])) == 1  # nothing journaled for it


@pytest.mark.parametrize("damage", ["not JSON", "a field missing", "an invalid value"])
def test_txengine_list_shows_every_readable_transaction_and_names_the_damaged_ones(engine, db_url, basket, damage):
    damaged, healthy = engine.preview("reference", basket), engine.preview("reference", basket)
    text = DAMAGE[damage][0]
    if text is None:
        execute(db_url, "UPDATE transactions SET snapshot = replace(snapshot, '\"quantity\":3', '\"quantity\":0')"
                        " WHERE id = ?", (damaged.id,))
    else:
        execute(db_url, "UPDATE transactions SET snapshot = ? WHERE id = ?", (text, damaged.id))
    for options in ([], ["--json"]):
        listed = CliRunner().invoke(cli, ["list", "--db", db_url, *options])
        assert listed.exit_code == 3  # store unavailable, as for any damaged row
        assert healthy.id in listed.stdout and damaged.id not in listed.stdout
        assert f"could not be read and are not listed: their stored snapshots are damaged: {damaged.id}" in (
            listed.stderr)
