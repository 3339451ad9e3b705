"""A row damaged behind the engine's back is a storage failure, never a bare decoding error.

SQLite checksums nothing: a bit flipped on a failing disk, or a hand edit, can leave a
snapshot, a journal entry or an intent that is no longer what the engine wrote.  Reading
one that no longer decodes raises ``StoreUnavailable`` naming the record; one that
decodes into a value a validator refuses raises that ``ValidationError`` (as
tests/test_typed_api.py has it for a state the lifecycle does not know).  Either is an
``EngineError``, changes nothing, and leaves every other transaction working.
"""

from __future__ import annotations

import pytest

from txengine.errors import StoreUnavailable, ValidationError

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
