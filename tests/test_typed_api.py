"""States and events are ``StrEnum`` members a POS can type-check, and still plain strings
everywhere a string was promised: comparisons, messages, the journal and the database."""

from __future__ import annotations

import json
import sqlite3
from enum import StrEnum

import pytest

from txengine import Engine, LineItem, Money, PaymentLifecycle, TxEvent, TxState
from txengine.errors import IllegalTransition, ValidationError
from txengine.machine import EVENTS, STATES, check_spelled_out

from .conftest import CUSTOMER, tip


def test_the_enums_spell_out_the_declared_lifecycle_in_order():
    assert STATES == tuple(TxState) == tuple(state.id for state in PaymentLifecycle.states)
    assert EVENTS == tuple(TxEvent) == tuple(event.id for event in PaymentLifecycle._events)
    assert all(member == member.name and str(member) == member.name for member in (*TxState, *TxEvent))


def test_an_enum_that_drifts_from_the_declaration_is_refused():
    class Missing(StrEnum):
        previewed = "previewed"

    with pytest.raises(TypeError, match=r"Missing must spell out PaymentLifecycle's new, previewed"):
        check_spelled_out(Missing, (state.id for state in PaymentLifecycle.states))


def test_a_pos_gets_members_that_still_compare_to_strings(pos, basket):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    assert tx.state is TxState.previewed and tx.state == "previewed"
    assert f"{tx.state}" == "previewed" and {"previewed": 1}[tx.state] == 1
    assert "state='previewed'" in repr(tx) and repr([TxEvent.cancel]) == "['cancel']"  # reprs read as before
    allowed = pos.allowed_events(tx.id)
    assert all(type(event) is TxEvent for event in allowed)
    assert "finalize" in allowed and TxEvent.begin_payment in allowed
    assert json.dumps({"state": tx.state, "allowed": allowed}) == json.dumps(
        {"state": "previewed", "allowed": [str(event) for event in allowed]})

    tx = pos.finalize(tx.id)
    assert tx.state is TxState.finalized
    assert pos.get(tx.id).state is TxState.finalized  # read back from the store, not the cache
    with pytest.raises(IllegalTransition) as refused:
        pos.begin_payment(tx.id)
    assert "in state 'finalized'" in str(refused.value) and "TxState" not in str(refused.value)


def test_the_journal_and_the_snapshot_stay_plain_strings(engine, basket, db_url):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    tx = engine.finalize(tx.id)
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
        state, snapshot = db.execute("SELECT state, snapshot FROM transactions WHERE id = ?", (tx.id,)).fetchone()
        entries = [json.loads(data) for (data,) in db.execute(
            "SELECT data FROM journal WHERE tx_id = ? ORDER BY seq", (tx.id,))]
    assert state == "finalized" and json.loads(snapshot)["state"] == "finalized"
    assert [(entry.get("source"), entry.get("target")) for entry in entries if "target" in entry] == [
        ("new", "previewed"), ("previewed", "finalized")]
    assert all(type(event.data.get("event", "")) is str for event in engine.history(tx.id))


def test_a_stored_state_the_lifecycle_does_not_know_is_refused(engine, basket, db_url):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE transactions SET snapshot = json_set(snapshot, '$.state', 'teleported')")
    with Engine.open(db_url, providers=dict(engine.drivers)) as fresh:
        with pytest.raises(ValidationError, match="state 'teleported' is not one of new, previewed"):
            fresh.get(tx.id)


def test_an_update_from_a_generator_is_checked_for_its_currency_like_a_list(pos, basket):
    tx = pos.preview("reference", basket, customer_token=CUSTOMER)
    dollars = LineItem(None, "Tip", 1, Money(100, "USD"), 0)
    with pytest.raises(ValidationError, match="is in USD, the transaction in EUR"):
        pos.update(tx.id, (line for line in [dollars]))
    tx = pos.update(tx.id, (line for line in [tip(100)]))
    assert [line.name for line in tx.items][-1] == "Tip" and tx.currency == "EUR"
