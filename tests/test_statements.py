"""How much SQL each command costs: the statements and the commits are part of the design.

Every commit is a synchronous=FULL flush, the one cost a POS waits on; every statement
is a round trip into SQLite.  These tests count what each command sends on the store's
own connection (sqlite3's trace callback), so a change that adds a statement or a
commit to the hot path shows up here, in review, instead of in a benchmark months later.

What the counts encode:

- a keyless command keeps no idempotency record: nothing could ever replay it, and the
  intent (for a remote call) already carries its provider idempotency key;
- a remote call is two commits: the claim (durable before the call) and its outcome;
- a local transition is one commit: compare-and-swap the snapshot, append the event;
- a keyed command writes its idempotency record in the same transaction as the
  compare-and-swap, never in one of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest

from txengine import Engine
from txengine.errors import ValidationError

from .conftest import CUSTOMER, tip


class Trace:
    """The statements the store's connection ran, first words only (``UPDATE transactions``)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.texts: list[str] = []  # each statement whole

    def __call__(self, sql: str) -> None:
        self.texts.append(sql)
        words = sql.split()
        self.statements.append(" ".join(words[:3] if words[0].upper() in ("INSERT", "DELETE") else words[:2]))

    @property
    def commits(self) -> int:
        return sum(statement == "COMMIT" for statement in self.statements)


@contextmanager
def traced(engine: Engine) -> Iterator[Trace]:
    trace = Trace()
    connection = engine.store._connection()  # the calling thread's: the sync engine runs here
    connection.set_trace_callback(trace)
    try:
        yield trace
    finally:
        connection.set_trace_callback(None)


def cost(engine: Engine, command: Callable[[], object]) -> Trace:
    with traced(engine) as trace:
        command()
    return trace


CLAIM = ["BEGIN IMMEDIATE", "UPDATE transactions", "INSERT INTO journal", "INSERT INTO intents", "COMMIT"]
SETTLE = ["BEGIN IMMEDIATE", "UPDATE transactions", "INSERT INTO journal", "DELETE FROM intents", "COMMIT"]
LOAD = ["SELECT version,"]


def test_a_keyless_preview_claims_its_generated_key_then_commits_the_snapshot_and_forgets_the_key(engine, basket):
    engine.preview("reference", basket, customer_token=CUSTOMER)  # warms the engine's key reads
    trace = cost(engine, lambda: engine.preview("reference", basket, customer_token=CUSTOMER))
    # The claim and the hold are what completes a preview whose answer is lost (its
    # generated key is in the OutcomeUnknown); once the snapshot exists nobody can ask
    # for that key again, so its record goes in the same commit as the hold.
    assert split_commits(trace.statements) == [
        ["BEGIN IMMEDIATE", "INSERT INTO commands", "INSERT INTO preview_holds", "COMMIT"],
        ["BEGIN IMMEDIATE", "INSERT INTO transactions", "DELETE FROM commands", "INSERT INTO journal",
         "DELETE FROM preview_holds", "COMMIT"],
    ]


def test_a_keyless_local_transition_is_one_read_and_one_commit(engine, basket):
    tx = engine.preview("reference", basket)
    trace = cost(engine, lambda: engine.begin_payment(tx.id))
    assert trace.statements == [*LOAD, "BEGIN IMMEDIATE", "UPDATE transactions", "INSERT INTO journal", "COMMIT"]


def test_a_keyless_remote_command_is_a_claim_and_an_outcome(engine, basket):
    tx = engine.preview("reference", basket)
    trace = cost(engine, lambda: engine.update(tx.id, [tip()]))
    assert trace.statements == [*LOAD, *CLAIM, *SETTLE]
    assert trace.commits == 2


def test_a_keyed_remote_command_records_its_key_inside_the_claim_and_the_outcome(engine, basket):
    tx = engine.preview("reference", basket)
    trace = cost(engine, lambda: engine.update(tx.id, [tip()], idempotency_key="tip-1"))
    assert trace.commits == 2
    claim, settle = split_commits(trace.statements[trace.statements.index("BEGIN IMMEDIATE"):])
    assert "INSERT INTO commands" in claim and "UPDATE commands" in settle
    assert len(trace.statements) <= 15


def test_a_keyed_local_transition_records_its_key_in_the_same_commit(engine, basket):
    tx = engine.preview("reference", basket)
    trace = cost(engine, lambda: engine.begin_payment(tx.id, idempotency_key="pay-1"))
    assert trace.commits == 1
    assert "INSERT INTO commands" in trace.statements


def test_a_keyless_lifecycle_leaves_only_the_journal_and_the_snapshot(engine, basket, db_url):
    for _ in range(3):
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        engine.update(tx.id, [tip()])
        engine.begin_payment(tx.id)
        engine.finalize(tx.id)
    database = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    assert database.execute("SELECT count(*) FROM commands").fetchone() == (0,)
    assert database.execute("SELECT count(*) FROM intents").fetchone() == (0,)
    assert database.execute("SELECT count(*) FROM journal").fetchone()[0] > 0


def split_commits(statements: list[str]) -> list[list[str]]:
    transactions, current = [], []
    for statement in statements:
        current.append(statement)
        if statement == "COMMIT":
            transactions.append(current)
            current = []
    return transactions


def test_expire_due_writes_each_batch_in_one_commit_and_journals_every_expiry(engine, basket, clock):
    due = [engine.preview("reference", basket).id for _ in range(30)]
    clock.advance(timedelta(hours=1))
    with traced(engine) as trace:
        assert engine.expire_due() == 30
    assert trace.commits == 1
    # decided on the heads the sweep's read returns: no snapshot comes back to be decoded
    # (json_valid checks each in SQLite, under the lock, so a damaged one is refused alone)
    assert not [sql for sql in trace.texts if sql.startswith("SELECT")
                and "snapshot" in sql.replace("json_valid(snapshot)", "")]
    # an expiry can only be refused by its compare-and-swap: the versions are read once
    # under the write lock, then one swap and one journal entry each, no savepoints
    assert trace.statements.count("UPDATE transactions") == 30 and "SAVEPOINT one_commit" not in trace.statements
    assert trace.statements.count("INSERT INTO journal") == 30
    for tx_id in due:
        assert engine.get(tx_id).state == "expired"
        assert engine.history(tx_id)[-1].data["event"] == "expire"


def test_an_expiry_that_lost_its_race_is_rolled_back_alone(engine, basket, clock):
    stale = [engine.preview("reference", basket) for _ in range(3)]
    clock.advance(timedelta(hours=1))
    engine.store.write_each([engine.core._expiry(stale[1], clock.now(), engine.core.capabilities["reference"])])
    outcomes = engine.store.write_each(
        [engine.core._expiry(tx, clock.now(), engine.core.capabilities["reference"]) for tx in stale])
    assert [type(outcome).__name__ for outcome in outcomes] == ["NoneType", "ConcurrentModification", "NoneType"]
    assert [engine.get(tx.id).version for tx in stale] == [tx.version + 1 for tx in stale]


def test_keyed_records_are_kept_for_the_retention_then_forgotten_by_the_sweep(engine, basket, clock, db_url):
    tx = engine.preview("reference", basket, idempotency_key="till-7-preview")
    engine.begin_payment(tx.id, idempotency_key="till-7-pay")
    clock.advance(timedelta(hours=23))
    engine.expire_due()
    assert engine.preview("reference", basket, idempotency_key="till-7-preview").id == tx.id  # replayed
    clock.advance(timedelta(hours=2))
    with traced(engine) as trace:
        engine.expire_due()
    assert trace.commits == 1
    database = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    assert database.execute("SELECT count(*) FROM commands").fetchone() == (0,)
    # the journal keeps everything: both commands, and the expiry of the abandoned payment
    assert [event.data["event"] for event in engine.history(tx.id)] == ["preview", "begin_payment", "expire"]


def test_a_sweep_with_nothing_to_forget_or_expire_commits_nothing(engine, basket, clock):
    engine.preview("reference", basket, idempotency_key="fresh")
    with traced(engine) as trace:
        assert engine.expire_due() == 0
    assert trace.commits == 0


@pytest.mark.parametrize("retention", [timedelta(0), timedelta(hours=-1), 3600])
def test_the_retention_must_be_a_positive_duration(db_url, driver, clock, retention):
    with pytest.raises(ValidationError, match="idempotency_retention"):
        Engine.open(db_url, providers={"reference": driver}, clock=clock, idempotency_retention=retention)
