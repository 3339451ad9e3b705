"""A row damaged behind the engine's back is a storage failure, never a bare decoding error.

SQLite checksums nothing: a bit flipped on a failing disk, or a hand edit, can leave a
snapshot, a journal entry or an intent that is no longer what the engine wrote.  Reading
one raises ``StoreUnavailable`` naming the record (an ``EngineError``, like every error
the POS sees), changes nothing, and leaves every other transaction working.
"""

from __future__ import annotations

import pytest

from txengine.errors import StoreUnavailable

from .conftest import tip
from .pg_server import execute

DAMAGE = {
    "not JSON": "{\"id\": \"tx_",
    "a field missing": "{\"id\": \"x\"}",
    "an invalid value": None,  # the real snapshot, with a line's quantity set to 0
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_snapshot_is_a_storage_failure_of_that_transaction_only(engine, db_url, basket, damage):
    damaged, healthy = engine.preview("reference", basket), engine.preview("reference", basket)
    text = DAMAGE[damage]
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
            with pytest.raises(StoreUnavailable, match="stored snapshot is damaged") as raised:
                command()
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
