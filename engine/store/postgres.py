"""The fleet store: one PostgreSQL database shared by many POS processes and workers.

Same tables, same versioned migrations and same behaviour as the SQLite store.  Each
store operation is written once, as a generator of SQL statements (``_Operations``), and
run either blocking on a ``psycopg_pool.ConnectionPool`` (``Engine``) or on the event loop
on an ``AsyncConnectionPool`` (``AsyncEngine``, through ``aperform``):

- every operation is ONE database transaction (the pool's ``connection()`` block
  commits on success and rolls back on any error: nothing is ever half-applied);
- commands on one transaction serialise on its row: the compare-and-swap ``UPDATE ...
  WHERE version = %s`` locks the row, a concurrent writer waits for the first to commit,
  re-reads the row, finds the version moved and raises ``ConcurrentModification``;
- the timer sweep, ``recover()`` and the delivery queue select their rows ``FOR UPDATE
  SKIP LOCKED``: workers sharing one database never queue behind each other's rows;
- leases (intents, deliveries) start and end on the server's ``clock_timestamp()``,
  never on a host's clock, and intent leases are fenced by their owner token;
- the journal is append-only in the database itself (a trigger raises on UPDATE/DELETE);
- migrations run once per fleet under an advisory lock (PostgreSQL DDL is
  transactional: a migration is applied whole or not at all), and an engine meeting a
  schema newer than it knows refuses to start;
- a server that cannot be reached, restarts, or times a statement out is
  ``StoreUnavailable`` to the caller; the pool replaces broken connections by itself.

The URL's password never appears in a repr, a log line or an exception message.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import attrs

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from ..clock import Clock
from ..codec import HEAD_FIELDS, dumps, encode_transaction, head_snapshot_fields
from ..drivers import Delivery
from ..errors import (
    ConcurrentModification,
    EngineError,
    IdempotencyConflict,
    LeaseLost,
    StoreUnavailable,
    TransactionInDoubt,
    ValidationError,
)
from ..machine import ACTIVE
from ..models import DeliveryRecord, Event, Transaction, TransactionHead
from .base import (
    DEAD,
    DROP,
    PARK,
    PENDING,
    PUT,
    RELEASE,
    REPLACE,
    RESOLVE,
    TAKE,
    CommandOp,
    CommandRecord,
    Commit,
    DeliverySettlement,
    Intent,
    IntentOp,
    Listing,
    PreviewHold,
    WorkerRecord,
    head_refusal,
    heads_only,
    lost_race,
    read_json,
    read_snapshot,
)

UTC = timezone.utc
_ACTIVE_SQL = ", ".join(f"'{state}'" for state in sorted(ACTIVE))

#: the time leases are measured on, in SQL: the lease clock when one is set (tests), else
#: the server's ``clock_timestamp()``: one clock for every host of the fleet
_LEASE_NOW = "coalesce(%(lease_clock)s::timestamptz, clock_timestamp())"

#: the key of the advisory lock every migrating engine of a fleet queues on ("txengine")
_MIGRATION_LOCK = 0x7478_656E_6769_6E65

# Version N here is version N of the SQLite store: the same tables and columns, in
# PostgreSQL's dialect (timestamptz for times, bigserial ids, a plpgsql trigger).
# tests/test_postgres_store.py keeps the two lists the same length.
MIGRATIONS: tuple[str, ...] = (
    # 1: the lifecycle tables
    f"""
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE transactions (
        id TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        state TEXT NOT NULL,
        version INTEGER NOT NULL,
        expires_at TIMESTAMPTZ,
        refund_deadline TIMESTAMPTZ,
        pending TEXT,
        snapshot TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX transactions_due ON transactions (expires_at)
        WHERE state IN ({_ACTIVE_SQL}) AND pending IS NULL;
    CREATE TABLE journal (
        tx_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (tx_id, seq)
    );
    CREATE FUNCTION journal_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the journal is append-only'; END $$;
    CREATE TRIGGER journal_is_append_only BEFORE UPDATE OR DELETE ON journal
        FOR EACH ROW EXECUTE FUNCTION journal_is_append_only();
    CREATE TRIGGER journal_is_never_truncated BEFORE TRUNCATE ON journal
        FOR EACH STATEMENT EXECUTE FUNCTION journal_is_append_only();
    CREATE TABLE intents (
        tx_id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        params TEXT NOT NULL,
        changes TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        lease_until TIMESTAMPTZ,
        last_error TEXT
    );
    CREATE INDEX intents_by_lease ON intents (lease_until);
    CREATE TABLE commands (
        key TEXT PRIMARY KEY,
        command TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        tx_id TEXT NOT NULL,
        status TEXT NOT NULL,
        version INTEGER,
        code TEXT,
        message TEXT,
        lease_until TIMESTAMPTZ
    );
    CREATE TABLE outbox (
        id BIGSERIAL PRIMARY KEY,
        tx_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        idempotency_key TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TIMESTAMPTZ,
        lease_until TIMESTAMPTZ,
        last_error TEXT,
        created_at TIMESTAMPTZ NOT NULL,
        delivered_at TIMESTAMPTZ
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE status = 'pending';
    CREATE INDEX outbox_by_tx ON outbox (tx_id);
    """,
    # 2: who holds a delivery's lease, when recover() may re-send an in-doubt intent,
    # dead deliveries found without a scan, and worker heartbeats
    """
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE intents ADD COLUMN retry_at TIMESTAMPTZ;
    CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        status TEXT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        heartbeat_at TIMESTAMPTZ NOT NULL,
        stopped_at TIMESTAMPTZ,
        iterations INTEGER NOT NULL,
        totals TEXT NOT NULL
    );
    """,
    # 3: fencing (the owner token of an intent's lease), operator attention, and when a
    # command was first tried (a retried preview keeps that time for its deadlines)
    """
    ALTER TABLE intents ADD COLUMN owner TEXT;
    ALTER TABLE intents ADD COLUMN attention TEXT;
    ALTER TABLE commands ADD COLUMN started_at TIMESTAMPTZ;
    CREATE INDEX commands_previews_in_doubt ON commands (tx_id)
        WHERE command = 'preview' AND status = 'in_flight';
    """,
    # 4: what a preview needs to be sent again (basket, payment type, the customer key
    # sealed), from its claim until it settles: recover() completes a lost preview
    """
    CREATE TABLE preview_holds (
        key TEXT PRIMARY KEY,
        tx_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        request TEXT NOT NULL,
        sealed_token TEXT,
        expires_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 5: idempotency records are kept for a retention, then forgotten by the expiry
    # sweep; keyless commands no longer write any, so the ones earlier versions left
    # (settled, under generated keys) go now, and records of unknown age count from now
    """
    CREATE INDEX commands_by_age ON commands (started_at) WHERE status != 'in_flight';
    DELETE FROM commands WHERE key LIKE 'auto:%' AND status != 'in_flight';
    UPDATE commands SET started_at = clock_timestamp() WHERE started_at IS NULL;
    """,
    # 6: a JSON check that does not raise, for the expiry sweep: a snapshot damaged into
    # text that is not JSON is refused alone instead of failing its whole batch (the
    # cast to jsonb raises; PostgreSQL 16 has IS JSON, SQLite json_valid)
    """
    CREATE FUNCTION txengine_is_json(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE STRICT AS $$
    BEGIN
        PERFORM $1::jsonb;
        RETURN true;
    EXCEPTION WHEN data_exception THEN
        RETURN false;
    END
    $$;
    """,
)

LATEST = len(MIGRATIONS)


class SchemaTooNew(StoreUnavailable):
    """The database was migrated by a newer txengine than this one."""


def describe(url: str) -> str:
    """The URL as it may be shown: user, host, port and database, never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable URL)"
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


def migrate(url: str, *, connect_timeout: float = 10.0) -> int:
    """Bring the database at ``url`` to this txengine's schema; returns the version.

    Safe to run from every host at once: the engines queue on one advisory lock and the
    first applies what is missing; the others find nothing left to do.
    """
    try:
        with psycopg.connect(url, connect_timeout=int(connect_timeout), options="-c timezone=UTC") as db:
            return _migrate(db, url)
    except psycopg.Error as error:
        raise StoreUnavailable(f"cannot migrate the PostgreSQL store {describe(url)}: {_cause(error)}") from None


def _migrate(db: psycopg.Connection, url: str) -> int:
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        current = _blocking_answer(db, _schema_version())
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        if current > LATEST:
            raise SchemaTooNew(
                f"the PostgreSQL store {describe(url)} has schema version {current}, newer than the"
                f" {LATEST} this txengine knows: upgrade txengine on this host before starting it"
            )
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            db.execute(script)
            db.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
        for key in ("hash_key", "sealing_key"):
            db.execute("INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                       (key, secrets.token_hex(32)))
    return max(current, LATEST)


@attrs.frozen
class One:
    """A statement whose first row (or None) is the answer."""

    query: str | sql.Composable
    params: Any = None


@attrs.frozen
class All:
    """A statement whose rows are the answer."""

    query: str | sql.Composable
    params: Any = None


@attrs.frozen
class Count:
    """A statement whose answer is how many rows it changed."""

    query: str | sql.Composable
    params: Any = None


@attrs.frozen
class Many:
    """One statement run once per parameter row."""

    query: str | sql.Composable
    params: Sequence[Any] = ()


#: a store operation: yields statements, receives their answers, returns its result.
#: Written once, it runs on a blocking connection (``PostgresStore``) or an asyncio one
#: (``PostgresStore.aperform``): the SQL and the decisions never differ between the two.
Statements = Generator["One | All | Count | Many", Any, Any]


class _Operations:
    """Every store operation as a generator of statements, in one database transaction."""

    def __init__(self, lease_clock: Clock | None) -> None:
        self.lease_clock = lease_clock
        self._recent: dict[str, Transaction] = {}
        self._recent_size = 4096

    def _lease_clock_now(self) -> datetime | None:
        """The lease clock's time, or None: the SQL then reads the server's clock."""
        return None if self.lease_clock is None else self.lease_clock.now()

    # --- reads ---

    def load(self, tx_id: str) -> Statements:
        if _unstorable(tx_id):
            return None
        row = yield One("SELECT snapshot FROM transactions WHERE id = %s", (tx_id,))
        return None if row is None else self._decoded(row[0], tx_id)

    def load_many(self, tx_ids: Sequence[str]) -> Statements:
        """The snapshots of ``tx_ids`` that exist, in one read (an expiry batch)."""
        wanted = [tx_id for tx_id in tx_ids if not _unstorable(tx_id)]
        if not wanted:
            return []
        rows = yield All("SELECT id, snapshot FROM transactions WHERE id = ANY(%s)", (wanted,))
        return [self._decoded(text, tx_id) for tx_id, text in rows]

    def keyed_hash_key(self) -> Statements:
        return bytes.fromhex((yield One("SELECT value FROM meta WHERE key = 'hash_key'"))[0])

    def sealing_key(self) -> Statements:
        """The per-database key preview holds are sealed under when the POS gives none."""
        return bytes.fromhex((yield One("SELECT value FROM meta WHERE key = 'sealing_key'"))[0])

    def previews_to_settle(self, now: datetime, limit: int, providers: Sequence[str]) -> Statements:
        """Held previews whose claim's lease is free at ``now`` (engine time, as on SQLite)."""
        rows = yield All(
            "SELECT h.key, h.tx_id, h.provider, h.request, h.sealed_token, h.expires_at"
            " FROM preview_holds h JOIN commands c ON c.key = h.key"
            " WHERE (c.lease_until IS NULL OR c.lease_until <= %s) AND h.provider = ANY(%s)"
            " ORDER BY h.expires_at LIMIT %s FOR UPDATE OF h SKIP LOCKED",
            (now, _providers(providers), limit),
        )
        return [PreviewHold(r[0], r[1], r[2], read_json(r[3], f"the preview hold of {r[1]}"), r[4], _utc(r[5]))
                for r in rows]

    def database_now(self) -> Statements:
        """The server's clock: one clock for every host of the fleet."""
        return (yield One("SELECT clock_timestamp()"))[0].astimezone(UTC)

    def _decoded(self, text: str, tx_id: str) -> Transaction:
        # Snapshots are immutable and their JSON names their version: the text we wrote
        # (or last read) maps to one Transaction, so skip re-validating it.
        tx = self._recent.get(text)
        if tx is None:
            tx = read_snapshot(text, tx_id)
            self._remember(text, tx)
        return tx

    def _remember(self, text: str, tx: Transaction) -> None:
        if len(self._recent) >= self._recent_size:
            self._recent.pop(next(iter(self._recent)), None)
        self._recent[text] = tx

    def load_intent(self, tx_id: str) -> Statements:
        if _unstorable(tx_id):
            return None
        row = yield One(
            "SELECT tx_id, event, idempotency_key, params, changes, attempts, lease_until, last_error,"
            " retry_at, attention FROM intents WHERE tx_id = %s", (tx_id,),
        )
        if row is None:
            return None
        what = f"the intent of {tx_id}"
        return Intent(row[0], row[1], row[2], read_json(row[3], what), read_json(row[4], what), row[5],
                      _utc(row[6]), row[7],
                      _utc(row[8]), row[9])

    def preview_in_doubt(self, tx_id: str) -> Statements:
        """The claim of a preview for ``tx_id`` whose outcome is not known (no snapshot yet)."""
        if _unstorable(tx_id):
            return None
        row = yield One("SELECT key FROM commands WHERE tx_id = %s AND command = 'preview'"
                        " AND status = 'in_flight'", (tx_id,))
        return None if row is None else (yield from self.load_command(row[0]))

    def needing_attention(self, limit: int, providers: Sequence[str] | None = None) -> Statements:
        """Intents parked for an operator (``Intent.attention`` set), oldest first."""
        rows = yield All(
            "SELECT intents.tx_id FROM intents JOIN transactions ON transactions.id = intents.tx_id"
            " WHERE intents.attention IS NOT NULL"
            " AND (%(providers)s::text[] IS NULL OR transactions.provider = ANY(%(providers)s))"
            " ORDER BY transactions.updated_at LIMIT %(limit)s",
            {"providers": None if providers is None else list(providers), "limit": limit},
        )
        intents = []
        for (tx_id,) in rows:
            intent = yield from self.load_intent(tx_id)
            if intent is not None:
                intents.append(intent)
        return intents

    def lease_now(self, now: datetime) -> Statements:
        """The time leases are measured on: the server's clock (or the lease clock)."""
        return (yield One(f"SELECT {_LEASE_NOW}", {"lease_clock": self._lease_clock_now()}))[0].astimezone(UTC)

    def load_command(self, key: str) -> Statements:
        if _unstorable(key):
            return None
        row = yield One(
            "SELECT key, command, fingerprint, tx_id, status, version, code, message, lease_until, started_at"
            " FROM commands WHERE key = %s", (key,),
        )
        if row is None:
            return None
        return CommandRecord(*row[:8], lease_until=_utc(row[8]), started_at=_utc(row[9]))

    def journal(self, tx_id: str) -> Statements:
        if _unstorable(tx_id):
            return []
        rows = yield All("SELECT seq, kind, at, data FROM journal WHERE tx_id = %s ORDER BY seq", (tx_id,))
        return [Event(tx_id, seq, kind, _utc(at), read_json(data, f"journal entry {seq} of {tx_id}"))
                for seq, kind, at, data in rows]

    def transaction_ids(self) -> Statements:
        return [row[0] for row in (yield All("SELECT id FROM transactions ORDER BY id"))]

    def find_transactions(self, listing: Listing) -> Statements:
        where, params = listing.where("%s", lambda at: at)
        (total,) = yield One(f"SELECT count(*) FROM transactions t{where}", params)
        page = yield All(f"SELECT id FROM transactions t{where} ORDER BY t.updated_at DESC, t.id DESC"
                         " LIMIT %s OFFSET %s", (*params, listing.limit, listing.offset))
        return total, [row[0] for row in page]

    # The sweeps skip rows another engine is committing right now (SKIP LOCKED): that
    # engine is already acting on them, and the version CAS of the expiry or recovery
    # itself makes the action happen once even if two sweeps pick the same row.

    def due_for_expiry(self, now: datetime, limit: int, providers: Sequence[str]) -> Statements:
        rows = yield All(
            "SELECT id, provider, state, version, expires_at, refund_deadline, pending, updated_at"
            f" FROM transactions WHERE state IN ({_ACTIVE_SQL}) AND pending IS NULL AND expires_at <= %s"
            " AND provider = ANY(%s) ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, _providers(providers), limit),
        )
        return [TransactionHead(id=tx_id, provider=provider, state=state, version=version,
                                expires_at=_utc(expires_at), refund_deadline=_utc(refund_deadline),
                                pending=pending, updated_at=updated_at.astimezone(UTC))
                for tx_id, provider, state, version, expires_at, refund_deadline, pending, updated_at in rows]

    def intents_to_recover(self, now: datetime, limit: int, providers: Sequence[str]) -> Statements:
        rows = yield All(
            "SELECT intents.tx_id FROM intents JOIN transactions ON transactions.id = intents.tx_id"
            f" WHERE (intents.lease_until IS NULL OR intents.lease_until <= {_LEASE_NOW})"
            " AND (intents.retry_at IS NULL OR intents.retry_at <= %(now)s)"
            " AND transactions.provider = ANY(%(providers)s) AND intents.attention IS NULL"
            " ORDER BY intents.lease_until NULLS FIRST LIMIT %(limit)s FOR UPDATE OF intents SKIP LOCKED",
            {"lease_clock": self._lease_clock_now(), "now": now, "providers": _providers(providers),
             "limit": limit},
        )
        return [row[0] for row in rows]

    # --- the one write path of the lifecycle ---

    def write(self, commit: Commit) -> Statements:
        if commit.snapshot is not None:
            yield from self._swap_snapshot(commit)
        elif commit.head is not None:
            yield from self._swap_head(commit.expected_version, commit.head)
        if commit.command is not None:
            yield from self._write_command(commit.command)
        if commit.events:
            yield Many(
                "INSERT INTO journal (tx_id, seq, kind, at, data) VALUES (%s, %s, %s, %s, %s)",
                [(e.tx_id, e.seq, e.kind, e.at, dumps(dict(e.data))) for e in commit.events],
            )
        if commit.intent is not None:
            yield from self._write_intent(commit.tx_id, commit.intent)
        if commit.hold is not None:
            hold = commit.hold
            yield Count(
                "INSERT INTO preview_holds (key, tx_id, provider, request, sealed_token, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (hold.key, hold.tx_id, hold.provider, dumps(dict(hold.request)), hold.sealed_token,
                 hold.expires_at),
            )
        if commit.release_hold is not None:
            yield Count("DELETE FROM preview_holds WHERE key = %s", (commit.release_hold,))
        if commit.enqueue:
            yield Many(
                "INSERT INTO outbox (tx_id, provider, kind, payload, idempotency_key, status,"
                " next_attempt_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [(d.tx_id, d.provider, d.kind, dumps(dict(d.payload)), d.idempotency_key,
                  PENDING, d.due_at, d.due_at) for d in commit.enqueue],
            )

    def write_each(self, commits: Sequence[Commit]) -> Statements:
        """Several commits in ONE database transaction, each on its own: one that fails
        (a lost compare-and-swap) is rolled back alone to its savepoint and its error
        returned in its place; the others commit together."""
        if heads_only(commits):
            return (yield from self._swap_heads(commits))
        outcomes: list[EngineError | None] = []
        for commit in commits:
            yield Count("SAVEPOINT one_commit")
            try:
                yield from self.write(commit)
            except EngineError as refused:
                yield Count("ROLLBACK TO SAVEPOINT one_commit")
                outcomes.append(refused)
            else:
                outcomes.append(None)
            yield Count("RELEASE SAVEPOINT one_commit")
        return outcomes

    def _swap_heads(self, commits: Sequence[Commit]) -> Statements:
        """``write_each`` for a batch of head commits (an expiry sweep's) in three round
        trips instead of four per commit: the rows are locked and their versions read
        (``FOR UPDATE``: nobody moves them until this transaction ends), then the swaps of
        those still current are one UPDATE over arrays and their journal entries one
        INSERT, the same columns and snapshot fields ``_swap_head`` sets one by one."""
        # locked in id order: two sweeps whose batches overlap queue, they never deadlock
        stored = {tx_id: (version, valid) for tx_id, version, valid in (yield All(
            "SELECT id, version, txengine_is_json(snapshot) FROM transactions WHERE id = ANY(%s)"
            " ORDER BY id FOR UPDATE", ([commit.tx_id for commit in commits],)))}
        outcomes = [head_refusal(commit.expected_version, commit.head, stored.get(commit.tx_id))
                    for commit in commits]
        written = [commit for commit, outcome in zip(commits, outcomes) if outcome is None]
        if not written:
            return outcomes
        rows = [(head.id, commit.expected_version, str(head.state), head.version, head.expires_at,
                 head.refund_deadline, head.pending and str(head.pending), head.updated_at, *head_snapshot_fields(head))
                for commit in written if (head := commit.head) is not None]
        yield Count(_SWAP_HEADS, [list(column) for column in zip(*rows)])  # one array per column
        entries = [entry for commit in written for entry in commit.events]
        yield Count(
            "INSERT INTO journal (tx_id, seq, kind, at, data)"
            " SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::timestamptz[], %s::text[])",
            ([e.tx_id for e in entries], [e.seq for e in entries], [e.kind for e in entries],
             [e.at for e in entries], [dumps(dict(e.data)) for e in entries]),
        )
        return outcomes

    def forget_commands(self, started_before: datetime) -> Statements:
        """Forget settled idempotency records of commands begun before ``started_before``;
        how many.  In-flight ones stay: they are claims a retry or recover() needs."""
        return (yield Count("DELETE FROM commands WHERE status != 'in_flight' AND started_at < %s",
                            (started_before,)))

    def _swap_snapshot(self, commit: Commit) -> Statements:
        tx = commit.snapshot
        assert tx is not None  # write() calls it only then
        text = dumps(encode_transaction(tx))
        values = (tx.state, tx.version, tx.expires_at, tx.refund_deadline, tx.pending, text, tx.updated_at)
        if commit.expected_version == 0:
            inserted = yield Count(
                "INSERT INTO transactions (state, version, expires_at, refund_deadline, pending,"
                " snapshot, updated_at, id, provider, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                values + (tx.id, tx.provider, tx.created_at),
            )
            if inserted != 1:
                raise ConcurrentModification("the transaction already exists", tx_id=tx.id)
        else:
            yield from self._swap(commit.expected_version, tx, values)
        self._remember(text, tx)  # a rolled-back write leaves a harmless, unread entry

    def _swap_head(self, expected_version: int, head: TransactionHead) -> Statements:
        # The columns, and the same fields of the stored snapshot set in place: its body
        # is neither read into Python nor encoded again (the text comes back in jsonb's
        # own layout, which decodes to the same snapshot).  Only over JSON: the cast would
        # fail the whole statement, so a row whose text is damaged is refused alone.
        columns = (head.state, head.version, head.expires_at, head.refund_deadline, head.pending)
        swapped = yield Count(_SWAP.format(snapshot=_SNAPSHOT_HEAD_SET) + " AND txengine_is_json(snapshot)",
                              columns + head_snapshot_fields(head) + (head.updated_at, head.id, expected_version))
        if swapped != 1:
            stored = yield One("SELECT version, txengine_is_json(snapshot) FROM transactions WHERE id = %s",
                               (head.id,))
            refusal = head_refusal(expected_version, head, stored)
            assert refusal is not None  # the swap matched nothing: the version moved, or the text is damaged
            raise refusal

    def _swap(self, expected_version: int, tx: Transaction, values: tuple) -> Statements:
        # The UPDATE locks the row: a concurrent command on this transaction waits here
        # until we commit, then finds the version moved.
        swapped = yield Count(_SWAP.format(snapshot="%s"), values + (tx.id, expected_version))
        if swapped != 1:
            raise lost_race(expected_version, tx)

    def _write_intent(self, tx_id: str, op: IntentOp) -> Statements:
        """Leases start and end on the lease clock (the server's), so engines whose clocks
        disagree never see a live lease as free; RELEASE, DROP and PARK with an ``owner``
        are fenced: they change the intent only while that owner still holds it."""
        lease = {"lease_clock": self._lease_clock_now(), "lease": op.lease, "owner": op.owner, "tx_id": tx_id}
        if op.op == PUT:
            intent = op.intent
            yield Count(
                "INSERT INTO intents (tx_id, event, idempotency_key, params, changes, attempts, lease_until,"
                f" owner) VALUES (%(tx_id)s, %(event)s, %(key)s, %(params)s, %(changes)s, %(attempts)s,"
                f" {_LEASE_NOW} + %(lease)s::interval, %(owner)s)",
                {**lease, "event": intent.event, "key": intent.idempotency_key,
                 "params": dumps(dict(intent.params)), "changes": dumps(dict(intent.changes)),
                 "attempts": intent.attempts},
            )
        elif op.op == TAKE:
            taken = yield Count(
                f"UPDATE intents SET lease_until = {_LEASE_NOW} + %(lease)s::interval, owner = %(owner)s,"
                " attempts = attempts + 1 WHERE tx_id = %(tx_id)s AND attention IS NULL"
                f" AND (lease_until IS NULL OR lease_until <= {_LEASE_NOW})",
                lease,
            )
            if taken != 1:
                raise TransactionInDoubt("its provider call is in flight in another process", tx_id=tx_id)
        elif op.op == PARK:
            yield from _fenced("UPDATE intents SET lease_until = NULL, owner = NULL, attention = %(error)s"
                               " WHERE tx_id = %(tx_id)s", {**lease, "error": op.error})
        elif op.op in (REPLACE, RESOLVE):
            freed = yield Count(
                f"DELETE FROM intents WHERE tx_id = %(tx_id)s AND (lease_until IS NULL OR lease_until <= {_LEASE_NOW})",
                lease,
            )
            if freed != 1:
                raise TransactionInDoubt("its provider call is in flight in another process", tx_id=tx_id)
            if op.op == REPLACE:
                yield from self._write_intent(tx_id, attrs.evolve(op, op=PUT))
        elif op.op == RELEASE:
            yield from _fenced("UPDATE intents SET lease_until = NULL, owner = NULL, last_error = %(error)s,"
                               " retry_at = %(retry_at)s WHERE tx_id = %(tx_id)s",
                               {**lease, "error": op.error, "retry_at": op.retry_at})
        elif op.op == DROP:
            yield from _fenced("DELETE FROM intents WHERE tx_id = %(tx_id)s", lease)
        else:
            raise ValueError(f"unknown intent operation {op.op!r}")

    def _write_command(self, op: CommandOp) -> Statements:
        record = op.record
        if op.forget:
            yield Count("DELETE FROM commands WHERE key = %s", (record.key,))
            return
        if op.insert:
            # ON CONFLICT: a concurrent insert of the same key waits for the first to
            # commit, then finds it instead of failing the whole transaction.
            inserted = yield Count(
                "INSERT INTO commands (key, command, fingerprint, tx_id, status, version, code, message,"
                " lease_until, started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (key) DO NOTHING",
                (record.key, record.command, record.fingerprint, record.tx_id, record.status,
                 record.version, record.code, record.message, record.lease_until, record.started_at),
            )
            if inserted == 1:
                return
            existing = yield One("SELECT fingerprint FROM commands WHERE key = %s", (record.key,))
            if existing is not None and existing[0] != record.fingerprint:
                raise IdempotencyConflict("the idempotency key was used for another command")
            raise ConcurrentModification("the same command is running elsewhere", tx_id=record.tx_id)
        condition, extra = sql.SQL(""), ()
        if op.take_lease_at is not None:
            condition, extra = sql.SQL(" AND (lease_until IS NULL OR lease_until <= %s)"), (op.take_lease_at,)
        updated = yield Count(
            sql.SQL("UPDATE commands SET status = %s, version = %s, code = %s, message = %s, lease_until = %s"
                    " WHERE key = %s") + condition,
            (record.status, record.version, record.code, record.message, record.lease_until,
             record.key) + extra,
        )
        # Settling a command that kept no record (a keyless one) has nothing to update;
        # taking over a record's lease must find the record free.
        if updated != 1 and op.take_lease_at is not None:
            raise TransactionInDoubt("the same command is in flight in another process", tx_id=record.tx_id)

    # --- the outbox ---

    def claim_deliveries(self, now: datetime, lease_until: datetime, limit: int,
                         owner: str | None = None, providers: Sequence[str] | None = None) -> Statements:
        """Due is decided on the engine's ``now``; the lease (``lease_until - now`` long)
        on the lease clock, so a worker whose clock runs minutes ahead never takes over a
        delivery another worker is still sending."""
        only = sql.SQL("") if providers is None else sql.SQL(" AND provider = ANY(%(providers)s)")
        rows = yield All(
                sql.SQL(
                    f"WITH clock AS (SELECT {_LEASE_NOW} AS now)"
                    " UPDATE outbox SET lease_until = (SELECT now FROM clock) + %(lease)s::interval,"
                    " lease_owner = %(owner)s WHERE id IN ("
                    " SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= %(now)s"
                    " AND (lease_until IS NULL OR lease_until <= (SELECT now FROM clock))"
                ) + only + sql.SQL(
                    " ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                    " RETURNING id, tx_id, provider, kind, payload, idempotency_key, attempts, next_attempt_at"
                ),
                {"lease_clock": self._lease_clock_now(), "lease": lease_until - now, "owner": owner,
                 "now": now, "limit": limit, "providers": list(providers or ())},
        )
        rows.sort(key=lambda row: (row[7], row[0]))  # RETURNING keeps no order
        return [Delivery(id=r[0], tx_id=r[1], provider=r[2], kind=r[3], payload=read_json(r[4], f"delivery {r[0]}"),
                         idempotency_key=r[5], attempts=r[6]) for r in rows]

    def settle_deliveries(self, settlements: Sequence[DeliverySettlement], now: datetime,
                          owner: str | None = None) -> Statements:
        # Only the lease holder settles: a worker whose lease ran out and was re-claimed
        # by another must not overwrite that worker's outcome.
        held = 0
        for s in settlements:
            held += yield Count(
                    "UPDATE outbox SET status = %(status)s, attempts = attempts + %(attempted)s,"
                    " next_attempt_at = CASE WHEN %(retimed)s THEN %(next)s ELSE next_attempt_at END,"
                    " last_error = coalesce(%(error)s, last_error), lease_until = NULL, lease_owner = NULL,"
                    " delivered_at = CASE WHEN %(status)s = 'delivered' THEN %(now)s ELSE delivered_at END,"
                    # a delivered record's sealed secrets are needed no more (a dead one keeps
                    # them: an operator may re-queue it)
                    " payload = CASE WHEN %(status)s = 'delivered' THEN (payload::jsonb - '$sealed')::text"
                    " ELSE payload END"
                    " WHERE id = %(id)s AND (%(owner)s::text IS NULL OR lease_owner = %(owner)s)",
                    {"status": s.status, "attempted": int(s.attempted), "retimed": s.attempted,
                     "next": s.next_attempt_at, "error": s.error, "now": now, "id": s.id, "owner": owner},
            )
        return held

    def deliveries(self, tx_id: str | None = None, status: str | None = None,
                   limit: int | None = None) -> Statements:
        rows = yield All(
                "SELECT id, tx_id, provider, kind, status, attempts, next_attempt_at, last_error,"
                " created_at, delivered_at FROM outbox"
                " WHERE (%(tx_id)s::text IS NULL OR tx_id = %(tx_id)s)"
                " AND (%(status)s::text IS NULL OR status = %(status)s) ORDER BY id LIMIT %(limit)s",
                {"tx_id": tx_id, "status": status, "limit": limit},
        )
        return [DeliveryRecord(r[0], r[1], r[2], r[3], r[4], r[5], _utc(r[6]), r[7], _utc(r[8]), _utc(r[9]))
                for r in rows]

    def backlog(self, now: datetime) -> Statements:
        in_doubt, stuck = yield One(
            f"SELECT count(*), count(*) FILTER (WHERE lease_until IS NULL OR lease_until <= {_LEASE_NOW})"
            " FROM intents", {"lease_clock": self._lease_clock_now()},
        )
        [pending] = yield One("SELECT count(*) FROM outbox WHERE status = 'pending'")
        [dead] = yield One("SELECT count(*) FROM outbox WHERE status = 'dead'")
        return {PENDING: pending, DEAD: dead, "in_doubt": in_doubt, "stuck": stuck}

    def retry_delivery(self, delivery_id: int, now: datetime) -> Statements:
        return (yield Count(
            "UPDATE outbox SET status = 'pending', next_attempt_at = %s, lease_until = NULL,"
            " lease_owner = NULL WHERE id = %s AND status = 'dead'", (now, delivery_id),
        )) == 1

    def retry_dead_deliveries(self, now: datetime) -> Statements:
        return (yield Count(
            "UPDATE outbox SET status = 'pending', next_attempt_at = %s, lease_until = NULL,"
            " lease_owner = NULL WHERE status = 'dead'", (now,),
        ))

    # --- workers ---

    def beat(self, worker: WorkerRecord) -> Statements:
        yield Count(
                "INSERT INTO workers (id, host, pid, status, started_at, heartbeat_at, stopped_at,"
                " iterations, totals) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
                " SET status = excluded.status, heartbeat_at = excluded.heartbeat_at,"
                " stopped_at = excluded.stopped_at, iterations = excluded.iterations,"
                " totals = excluded.totals",
                (worker.id, worker.host, worker.pid, worker.status, worker.started_at, worker.heartbeat_at,
                 worker.stopped_at, worker.iterations, dumps(dict(worker.totals))),
            )

    def workers(self) -> Statements:
        rows = yield All(
            "SELECT id, host, pid, status, started_at, heartbeat_at, stopped_at, iterations, totals"
            " FROM workers ORDER BY heartbeat_at DESC"
        )
        return [WorkerRecord(r[0], r[1], r[2], r[3], _utc(r[4]), _utc(r[5]), _utc(r[6]), r[7],
                             read_json(r[8], f"worker {r[0]}"))
                for r in rows]


def _blocking(name: str):
    """The blocking ``Store`` method running operation ``name`` in one transaction."""

    def method(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._ops, name)(*args, **kwargs))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = getattr(_Operations, name).__doc__
    return method


def _blocking_answer(db: psycopg.Connection, operation: Statements) -> Any:
    """Drive an operation of ``One`` statements on a connection already in a transaction
    (the migration reads the schema version inside its own)."""
    answer = None
    while True:
        try:
            step = operation.send(answer)
        except StopIteration as done:
            return done.value
        answer = db.execute(step.query, step.params).fetchone()


class PostgresStore:
    """A ``Store`` on a PostgreSQL database, through a pool of connections.

    ``pool_size``: connections held at most (a POS process needs one per concurrent
    command; a worker one per claim loop).  ``statement_timeout_ms``: how long one
    statement may run (or wait for a lock) before it fails as ``StoreUnavailable``
    instead of hanging the till.  ``wait_timeout``: how long a command waits for a free
    connection, which is also how long it waits for an unreachable server.
    """

    #: the clock leases are measured on when none is given: None is the server's own
    #: ``clock_timestamp()``, one clock for every host.  A test suite driving time with a
    #: FakeClock sets it to that clock (it stands in for the server's).
    default_lease_clock: Clock | None = None

    def __init__(self, url: str, *, pool_size: int = 4, statement_timeout_ms: int = 15_000,
                 wait_timeout: float = 5.0, migrate_schema: bool = True,
                 lease_clock: Clock | None = None) -> None:
        self._description = describe(url)
        self._wait_timeout = wait_timeout
        self._ops = _Operations(lease_clock if lease_clock is not None else self.default_lease_clock)
        if migrate_schema:
            migrate(url, connect_timeout=max(wait_timeout, 1))
        self._pool_options = {
            "conninfo": url, "min_size": 1, "max_size": pool_size, "open": False, "timeout": wait_timeout,
            "kwargs": {"options": f"-c timezone=UTC -c statement_timeout={int(statement_timeout_ms)}",
                       "connect_timeout": max(int(wait_timeout), 1)},
            # give up a reconnection attempt soon, so the next command starts a fresh one at
            # once instead of waiting out an exponential backoff after the server is back
            "reconnect_timeout": max(wait_timeout, 1.0),
        }
        # a connection a server restart broke is replaced on checkout, never used
        self._pool = ConnectionPool(check=ConnectionPool.check_connection, **self._pool_options)
        self._async_pool: AsyncConnectionPool | None = None  # opened by the first aperform()
        try:
            self._pool.open(wait=True, timeout=wait_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to the PostgreSQL store {self._description}") from None
        version = self._run(_schema_version())
        if version != LATEST:
            self._pool.close()
            kind = SchemaTooNew if version > LATEST else StoreUnavailable
            raise kind(f"the PostgreSQL store {self._description} has schema version {version}; this"
                       f" txengine needs {LATEST}: run `txengine migrate --db URL`"
                       + (" with a newer txengine" if version > LATEST else ""))

    def __repr__(self) -> str:
        return f"PostgresStore({self._description!r})"

    @property
    def lease_clock(self) -> Clock | None:
        return self._ops.lease_clock

    # --- running operations: blocking, or on the event loop ---

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Any failure of the server or the network is ``StoreUnavailable`` (the
        transaction rolled back: nothing is left half-applied)."""
        try:
            yield
        except EngineError:
            raise
        except PoolTimeout:
            raise StoreUnavailable(f"the PostgreSQL store {self._description} is unreachable"
                                   f" (no connection within {self._wait_timeout:g}s)") from None
        except psycopg.errors.UniqueViolation:
            # two writers raced on one key (a journal seq, an outbox delivery): the CAS
            # normally catches this first; either way the loser retries from a fresh read
            raise ConcurrentModification("another caller wrote the same record first") from None
        except psycopg.DataError as error:
            if "NUL" in str(error):
                raise ValidationError("text stored in PostgreSQL cannot contain NUL characters") from None
            raise StoreUnavailable(f"the PostgreSQL store {self._description} failed: {_cause(error)}") from None
        except psycopg.Error as error:
            # the server went away, restarted, timed a statement out, refused us: nothing
            # was committed, and no driver error reaches the POS
            raise StoreUnavailable(f"the PostgreSQL store {self._description} failed: {_cause(error)}") from None

    def _run(self, operation: Statements) -> Any:
        """One operation, one database transaction (committed when it returns)."""
        with self._translated(), self._pool.connection(timeout=self._wait_timeout) as db:
            answer = None
            while True:
                try:
                    step = operation.send(answer)
                except StopIteration as done:
                    return done.value
                if isinstance(step, Many):
                    with db.cursor() as cursor:
                        cursor.executemany(step.query, step.params)
                    answer = None
                    continue
                cursor = db.execute(step.query, step.params)
                answer = (cursor.fetchone() if isinstance(step, One) else
                          cursor.fetchall() if isinstance(step, All) else cursor.rowcount)

    async def aperform(self, method: str, *args: Any) -> Any:
        """Run store operation ``method`` on psycopg's asyncio connections: the async
        engine's path, with no thread hop."""
        operation = getattr(self._ops, method)(*args)
        with self._translated():
            pool = await self._opened_async_pool()
            async with pool.connection(timeout=self._wait_timeout) as db:
                answer = None
                while True:
                    try:
                        step = operation.send(answer)
                    except StopIteration as done:
                        return done.value
                    if isinstance(step, Many):
                        async with db.cursor() as cursor:
                            await cursor.executemany(step.query, step.params)
                        answer = None
                        continue
                    cursor = await db.execute(step.query, step.params)
                    answer = (await cursor.fetchone() if isinstance(step, One) else
                              await cursor.fetchall() if isinstance(step, All) else cursor.rowcount)

    async def _opened_async_pool(self) -> AsyncConnectionPool:
        if self._async_pool is None:
            pool = AsyncConnectionPool(check=AsyncConnectionPool.check_connection, **self._pool_options)
            try:
                await pool.open(wait=True, timeout=self._wait_timeout)
            except PoolTimeout:
                await pool.close()
                raise
            self._async_pool = pool
        return self._async_pool

    # --- the Store protocol ---

    load = _blocking("load")
    load_intent = _blocking("load_intent")
    load_command = _blocking("load_command")
    journal = _blocking("journal")
    transaction_ids = _blocking("transaction_ids")
    find_transactions = _blocking("find_transactions")
    due_for_expiry = _blocking("due_for_expiry")
    intents_to_recover = _blocking("intents_to_recover")
    write = _blocking("write")
    write_each = _blocking("write_each")
    load_many = _blocking("load_many")
    forget_commands = _blocking("forget_commands")
    claim_deliveries = _blocking("claim_deliveries")
    settle_deliveries = _blocking("settle_deliveries")
    deliveries = _blocking("deliveries")
    backlog = _blocking("backlog")
    retry_delivery = _blocking("retry_delivery")
    retry_dead_deliveries = _blocking("retry_dead_deliveries")
    beat = _blocking("beat")
    workers = _blocking("workers")
    preview_in_doubt = _blocking("preview_in_doubt")
    needing_attention = _blocking("needing_attention")
    lease_now = _blocking("lease_now")
    keyed_hash_key = _blocking("keyed_hash_key")
    sealing_key = _blocking("sealing_key")
    previews_to_settle = _blocking("previews_to_settle")
    database_now = _blocking("database_now")

    @property
    def schema_version(self) -> int:
        return self._run(_schema_version())

    def close(self) -> None:
        self._pool.close()

    async def aclose(self) -> None:
        if self._async_pool is not None:
            await self._async_pool.close()
            self._async_pool = None
        self._pool.close()


def _unstorable(text: str) -> bool:
    """PostgreSQL text cannot hold NUL: no stored key or id contains one, so a lookup by
    such a value finds nothing (SQLite answers the same, having stored none either)."""
    return isinstance(text, str) and "\x00" in text


def _fenced(statement: str, params: dict[str, Any]) -> Statements:
    """Run an intent change, only as its lease holder when ``params['owner']`` is given."""
    if params["owner"] is None:
        yield Count(statement, params)
        return
    if (yield Count(statement + " AND owner = %(owner)s", params)) != 1:
        raise LeaseLost("this attempt's lease was taken over; its answer is left for recover()",
                        tx_id=params["tx_id"])


def _schema_version() -> Statements:
    """0 for a blank database."""
    if (yield One("SELECT to_regclass('schema_version')"))[0] is None:
        return 0
    return (yield One("SELECT coalesce(max(version), 0) FROM schema_version"))[0]


def _pg_type(field: str) -> str:
    return "int" if field == "version" else "text"


def _with_head_fields(snapshot: str, value: Callable[[str], str]) -> str:
    """SQL for ``snapshot`` with its ``HEAD_FIELDS`` set to ``value(field)`` each."""
    pairs = ", ".join(f"'{field}', {value(field)}" for field in HEAD_FIELDS)
    return f"({snapshot}::jsonb || jsonb_build_object({pairs}))::text"


#: a compare-and-swap of a transaction's row, its snapshot set by ``snapshot``
_SWAP = ("UPDATE transactions SET state = %s, version = %s, expires_at = %s, refund_deadline = %s,"
         " pending = %s, snapshot = {snapshot}, updated_at = %s WHERE id = %s AND version = %s")

#: the stored snapshot with its head fields set from parameters (``_swap_head``)
_SNAPSHOT_HEAD_SET = _with_head_fields("snapshot", lambda field: f"%s::{_pg_type(field)}")

#: ``_swap_heads``' UPDATE: one row per head, from arrays (the head's columns, then its
#: snapshot fields in ``HEAD_FIELDS`` order)
_SWAP_HEADS = (
    "UPDATE transactions AS t SET state = h.state, version = h.version, expires_at = h.expires_at,"
    " refund_deadline = h.refund_deadline, pending = h.pending, updated_at = h.updated_at,"
    f" snapshot = {_with_head_fields('t.snapshot', lambda field: f'h.field_{field}')}"
    " FROM unnest(%s::text[], %s::int[], %s::text[], %s::int[], %s::timestamptz[], %s::timestamptz[],"
    " %s::text[], %s::timestamptz[], " + ", ".join(f"%s::{_pg_type(field)}[]" for field in HEAD_FIELDS)
    + ") AS h(id, expected_version, state, version, expires_at, refund_deadline, pending, updated_at, "
    + ", ".join(f"field_{field}" for field in HEAD_FIELDS)
    + ") WHERE t.id = h.id AND t.version = h.expected_version"
)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _providers(providers: Sequence[str]) -> list[str]:
    if not providers:
        raise ValueError("a sweep needs at least one provider")
    return list(providers)


def _cause(error: BaseException) -> str:
    """The server's or the driver's reason, first line only (never the connection string)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
