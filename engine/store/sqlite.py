"""The embedded default store: one SQLite file, safe across threads and processes.

WAL lets readers proceed while one writer commits; ``synchronous=FULL`` makes every
commit durable before we call a provider on the strength of it.  Writers take the
lock up front (``BEGIN IMMEDIATE``) so two processes racing on one transaction
serialize on the database instead of failing half-way, and the compare-and-swap on
``version`` picks the winner.  Each thread gets its own connection.

Times are stored twice where they are queried: as ISO text inside the JSON snapshot,
and as integer microseconds since the epoch in indexed columns.  The expiry sweep uses
a partial index over active, non-pending rows ordered by deadline, so its cost grows
with the number due, not the number stored.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from urllib.parse import quote
from datetime import datetime, timedelta, timezone

import attrs

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
from ..models import Event, Transaction, TransactionHead
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
    DeliveryRecord,
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

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ACTIVE_SQL = ", ".join(f"'{state}'" for state in sorted(ACTIVE))


def to_us(value: datetime | None) -> int | None:
    if value is None:
        return None
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int | None) -> datetime | None:
    if value is None:
        return None
    return _EPOCH + timedelta(microseconds=value)


MIGRATIONS: tuple[str, ...] = (
    # 1: the lifecycle tables
    f"""
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE transactions (
        id TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        state TEXT NOT NULL,
        version INTEGER NOT NULL,
        expires_at INTEGER,
        refund_deadline INTEGER,
        pending TEXT,
        snapshot TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX transactions_due ON transactions (expires_at)
        WHERE state IN ({_ACTIVE_SQL}) AND pending IS NULL;
    CREATE TABLE journal (
        tx_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        at INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (tx_id, seq)
    ) WITHOUT ROWID;
    CREATE TRIGGER journal_is_append_only_update BEFORE UPDATE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
    CREATE TRIGGER journal_is_append_only_delete BEFORE DELETE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
    CREATE TABLE intents (
        tx_id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        params TEXT NOT NULL,
        changes TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        lease_until INTEGER,
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
        lease_until INTEGER
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        tx_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        idempotency_key TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER,
        lease_until INTEGER,
        last_error TEXT,
        created_at INTEGER NOT NULL,
        delivered_at INTEGER
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX outbox_by_tx ON outbox (tx_id);
    """,
    # 2: who holds a delivery's lease (a stale holder cannot settle what another
    # re-claimed), when recover() may re-send an in-doubt intent (backoff while a
    # provider is down), dead deliveries found without a scan, and worker heartbeats
    """
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE intents ADD COLUMN retry_at INTEGER;
    CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        status TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        heartbeat_at INTEGER NOT NULL,
        stopped_at INTEGER,
        iterations INTEGER NOT NULL,
        totals TEXT NOT NULL
    );
    """,
    # 3: fencing (the owner token of an intent's lease: a late answer of an attempt
    # whose lease was taken over cannot commit), operator attention (an intent the
    # engine will not re-send blindly again waits for a person), and when a command
    # was first tried (a retried preview keeps that time for its deadlines)
    """
    ALTER TABLE intents ADD COLUMN owner TEXT;
    ALTER TABLE intents ADD COLUMN attention TEXT;
    ALTER TABLE commands ADD COLUMN started_at INTEGER;
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
        expires_at INTEGER NOT NULL
    );
    """,
    # 5: idempotency records are kept for a retention, then forgotten by the expiry
    # sweep; keyless commands no longer write any, so the ones earlier versions left
    # (settled, under generated keys) go now, and records of unknown age count from now
    """
    CREATE INDEX commands_by_age ON commands (started_at) WHERE status != 'in_flight';
    DELETE FROM commands WHERE key LIKE 'auto:%' AND status != 'in_flight';
    UPDATE commands SET started_at = CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)
        WHERE started_at IS NULL;
    """,
    # 6: nothing: PostgreSQL's version 6 adds a JSON check that does not raise, which
    # SQLite has built in (json_valid); the two stores keep one numbering
    "SELECT json_valid('{}');",
)


def _unavailable_on_sqlite_error(method):
    """Turn every ``sqlite3`` error of a store method into ``StoreUnavailable``.

    Disk full, a read-only file, an I/O error, a lock held past the busy timeout, a file
    that is not a database: the POS sees one ``EngineError`` naming the file and the
    cause.  Each write is one SQLite transaction, rolled back on error, so nothing is
    half-applied.  ``sqlite3.IntegrityError`` is translated where it means a race.
    """

    @functools.wraps(method)
    def translated(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the SQLite store {self.path} failed: {_cause(error)}") from error

    return translated


def _cause(error: sqlite3.Error) -> str:
    name = getattr(error, "sqlite_errorname", None)  # e.g. SQLITE_FULL (Python 3.11+)
    return f"{error} ({name})" if name else str(error)


class SQLiteStore:
    def __init__(self, path: str, *, busy_timeout_ms: int = 30_000, clock: Clock | None = None,
                 read_only: bool = False) -> None:
        """``clock``: the one clock leases are measured on, for every engine sharing this
        file (they run on one host: SQLite is not a network database).  None: each
        engine's own clock, which is the host clock in production."""
        self.clock = clock
        if not isinstance(path, str) or path in ("", ":memory:"):
            # Each thread has its own connection, and each in-memory connection its own
            # empty database: refuse instead of silently losing every other thread's work.
            raise ValidationError(
                f"the SQLite store needs a file path, not {path!r}: an in-memory database is neither"
                " durable nor shared between connections; use sqlite:///path/to/txengine.db")
        self.path = os.path.abspath(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._recent = _SnapshotCache(8192)
        self._gate = _WriterGate(self.path + "-writer", busy_timeout_ms / 1000)
        self._identity: tuple[int, int] | None = None
        # read_only: an operator's view; it neither migrates nor takes the write lock
        self.read_only = read_only
        try:
            if not read_only:
                self._require_json_functions()
                self._migrate()
            self._identity = self._file_identity()
        except sqlite3.Error as error:
            self.close()
            raise StoreUnavailable(f"cannot open the SQLite store {self.path}: {_cause(error)}") from error
        except OSError as error:
            self.close()
            raise StoreUnavailable(f"cannot open the SQLite store {self.path}: {error.strerror}") from error

    def _require_json_functions(self) -> None:
        """Refuse at open, not in the middle of an expiry sweep, a SQLite without JSON
        functions: the sweep sets a snapshot's head fields in place with json_set (every
        SQLite since 3.38 has them, an older one only if built with JSON1)."""
        try:
            self._connection().execute("SELECT json_set('{}', '$.state', 'expired')")
        except sqlite3.OperationalError:
            raise sqlite3.OperationalError(
                f"SQLite {sqlite3.sqlite_version} has no JSON functions (json_set); txengine needs"
                " SQLite 3.38 or later, or one built with JSON1") from None

    def _file_identity(self) -> tuple[int, int]:
        status = os.stat(self.path)
        return status.st_dev, status.st_ino

    def _check_same_file(self) -> None:
        """Refuse to commit into a database file that was deleted or replaced.

        SQLite keeps writing to the open (unlinked) inode: commits would vanish, or land
        in another file than the one every other process opens.  One ``stat`` per write.
        """
        if self._identity is None:  # still opening: the file is being created
            return
        try:
            identity = self._file_identity()
        except FileNotFoundError:
            raise StoreUnavailable(f"the SQLite store {self.path} was deleted under the running engine") from None
        except OSError as error:
            raise StoreUnavailable(f"the SQLite store {self.path} cannot be checked: {error.strerror}") from None
        if identity != self._identity:
            raise StoreUnavailable(f"the SQLite store {self.path} was replaced by another file under the"
                                   " running engine; restart it on the intended database")

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # --- connections and transactions ---

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                f"file:{quote(self.path)}?mode=ro" if self.read_only else self.path, uri=self.read_only,
                isolation_level=None, check_same_thread=False, timeout=self._busy_timeout_ms / 1000,
            )
            connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            if not self.read_only:
                connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
            # Zero deleted rows' bytes where that costs no extra I/O: a settled preview's
            # sealed customer key does not linger in free space (engine/secret.py).
            connection.execute("PRAGMA secure_delete = FAST")
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _write_transaction(self):
        self._check_same_file()
        return _Immediate(self._connection(), self._gate)

    def _migrate(self) -> None:
        with self._write_transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in _statements(script):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            if db.execute("SELECT 1 FROM meta WHERE key = 'hash_key'").fetchone() is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('hash_key', ?)", (secrets.token_hex(32),))
            if db.execute("SELECT 1 FROM meta WHERE key = 'sealing_key'").fetchone() is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('sealing_key', ?)", (secrets.token_hex(32),))

    @property
    @_unavailable_on_sqlite_error
    def schema_version(self) -> int:
        return self._connection().execute("SELECT max(version) FROM schema_version").fetchone()[0]

    @_unavailable_on_sqlite_error
    def keyed_hash_key(self) -> bytes:
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'hash_key'").fetchone()
        return bytes.fromhex(row[0])

    @_unavailable_on_sqlite_error
    def sealing_key(self) -> bytes:
        row = self._connection().execute("SELECT value FROM meta WHERE key = 'sealing_key'").fetchone()
        return bytes.fromhex(row[0])

    # --- reads ---

    @_unavailable_on_sqlite_error
    def load(self, tx_id: str):
        row = self._connection().execute(
            "SELECT version, snapshot FROM transactions WHERE id = ?", (tx_id,)
        ).fetchone()
        if row is None:
            return None
        version, text = row
        tx = self._recent.get(tx_id, version)
        if tx is None:
            tx = read_snapshot(text, tx_id)
            self._recent.put(tx)
        return tx

    def load_many(self, tx_ids: Sequence[str]) -> list[Transaction]:
        """The snapshots of ``tx_ids`` that exist, in one read (an expiry batch)."""
        found: list[Transaction] = []
        for start in range(0, len(tx_ids), 500):  # within SQLite's bound on parameters
            chunk = tx_ids[start:start + 500]
            for tx_id, version, text in self._connection().execute(
                f"SELECT id, version, snapshot FROM transactions WHERE id IN ({_placeholders(chunk)})", chunk,
            ):
                tx = self._recent.get(tx_id, version)
                found.append(tx if tx is not None else read_snapshot(text, tx_id))
        return found

    @_unavailable_on_sqlite_error
    def load_intent(self, tx_id: str) -> Intent | None:
        row = self._connection().execute(
            "SELECT tx_id, event, idempotency_key, params, changes, attempts, lease_until, last_error,"
            " retry_at, attention FROM intents WHERE tx_id = ?", (tx_id,),
        ).fetchone()
        if row is None:
            return None
        what = f"the intent of {tx_id}"
        return Intent(row[0], row[1], row[2], read_json(row[3], what), read_json(row[4], what), row[5],
                      from_us(row[6]), row[7],
                      from_us(row[8]), row[9])

    @_unavailable_on_sqlite_error
    def preview_in_doubt(self, tx_id: str) -> CommandRecord | None:
        """The claim of a preview for ``tx_id`` whose outcome is not known (no snapshot yet)."""
        row = self._connection().execute(
            "SELECT key FROM commands INDEXED BY commands_previews_in_doubt"
            " WHERE tx_id = ? AND command = 'preview' AND status = 'in_flight'", (tx_id,),
        ).fetchone()
        return None if row is None else self.load_command(row[0])

    @_unavailable_on_sqlite_error
    def previews_to_settle(self, now: datetime, limit: int, providers: Sequence[str]) -> list[PreviewHold]:
        rows = self._connection().execute(
            "SELECT h.key, h.tx_id, h.provider, h.request, h.sealed_token, h.expires_at"
            " FROM preview_holds h JOIN commands c ON c.key = h.key"
            " WHERE (c.lease_until IS NULL OR c.lease_until <= ?)"
            f" AND h.provider IN ({_placeholders(providers)}) ORDER BY h.expires_at LIMIT ?",
            (to_us(now), *providers, limit),
        ).fetchall()
        return [PreviewHold(r[0], r[1], r[2], read_json(r[3], f"the preview hold of {r[1]}"), r[4], from_us(r[5]))
                for r in rows]

    @_unavailable_on_sqlite_error
    def load_command(self, key: str) -> CommandRecord | None:
        row = self._connection().execute(
            "SELECT key, command, fingerprint, tx_id, status, version, code, message, lease_until, started_at"
            " FROM commands WHERE key = ?", (key,),
        ).fetchone()
        if row is None:
            return None
        return CommandRecord(*row[:8], lease_until=from_us(row[8]), started_at=from_us(row[9]))

    @_unavailable_on_sqlite_error
    def journal(self, tx_id: str) -> list[Event]:
        rows = self._connection().execute(
            "SELECT seq, kind, at, data FROM journal WHERE tx_id = ? ORDER BY seq", (tx_id,)
        ).fetchall()
        return [Event(tx_id, seq, kind, from_us(at), read_json(data, f"journal entry {seq} of {tx_id}"))
                for seq, kind, at, data in rows]

    @_unavailable_on_sqlite_error
    def transaction_ids(self) -> list[str]:
        return [row[0] for row in self._connection().execute("SELECT id FROM transactions ORDER BY id")]

    @_unavailable_on_sqlite_error
    def find_transactions(self, listing: Listing) -> tuple[int, list[str]]:
        where, params = listing.where("?", to_us)
        db = self._connection()
        db.execute("BEGIN")  # one read: the count and the page agree
        try:
            total = db.execute(f"SELECT count(*) FROM transactions t{where}", params).fetchone()[0]
            page = db.execute(f"SELECT id FROM transactions t{where} ORDER BY t.updated_at DESC, t.id DESC"
                              " LIMIT ? OFFSET ?", (*params, listing.limit, listing.offset)).fetchall()
        finally:
            db.execute("COMMIT")
        return total, [row[0] for row in page]

    # The sweeps select only rows of ``providers``, the ones the calling engine has drivers
    # for: engines configured for different providers can share one database without one
    # re-reading rows it can never act on (and starving the ones it can).

    @_unavailable_on_sqlite_error
    def due_for_expiry(self, now: datetime, limit: int, providers: Sequence[str]) -> list[TransactionHead]:
        rows = self._connection().execute(
            f"SELECT {_HEAD_COLUMNS} FROM transactions INDEXED BY transactions_due"
            f" WHERE state IN ({_ACTIVE_SQL}) AND pending IS NULL AND expires_at <= ?"
            f" AND provider IN ({_placeholders(providers)}) ORDER BY expires_at LIMIT ?",
            (to_us(now), *providers, limit),
        ).fetchall()
        return [_head(row) for row in rows]

    @_unavailable_on_sqlite_error
    def needing_attention(self, limit: int, providers: Sequence[str] | None = None) -> list[Intent]:
        only = "" if providers is None else f" AND transactions.provider IN ({_placeholders(providers)})"
        rows = self._connection().execute(
            "SELECT intents.tx_id FROM intents JOIN transactions ON transactions.id = intents.tx_id"
            f" WHERE intents.attention IS NOT NULL{only} ORDER BY transactions.updated_at LIMIT ?",
            (*(providers or ()), limit),
        ).fetchall()
        return [intent for intent in (self.load_intent(row[0]) for row in rows) if intent is not None]

    def lease_now(self, now: datetime) -> datetime:
        return self.clock.now() if self.clock is not None else now

    @_unavailable_on_sqlite_error
    def intents_to_recover(self, now: datetime, limit: int, providers: Sequence[str]) -> list[str]:
        rows = self._connection().execute(
            "SELECT intents.tx_id FROM intents JOIN transactions ON transactions.id = intents.tx_id"
            " WHERE (intents.lease_until IS NULL OR intents.lease_until <= ?)"
            " AND (intents.retry_at IS NULL OR intents.retry_at <= ?)"
            f" AND transactions.provider IN ({_placeholders(providers)})"
            " AND intents.attention IS NULL"
            " ORDER BY intents.lease_until LIMIT ?",
            (to_us(self.lease_now(now)), to_us(now), *providers, limit),
        ).fetchall()
        return [row[0] for row in rows]

    # --- the one write path of the lifecycle ---

    @_unavailable_on_sqlite_error
    def write(self, commit: Commit) -> None:
        texts = _Texts.of(commit)  # encoded before the write lock: other writers wait less
        with self._write_transaction() as db:
            self._apply(db, commit, texts)
        if commit.snapshot is not None:
            self._recent.put(commit.snapshot)  # committed: this version is the one every reader sees

    @_unavailable_on_sqlite_error
    def forget_commands(self, started_before: datetime) -> int:
        """Forget settled idempotency records of commands begun before ``started_before``;
        how many.  In-flight ones stay: they are claims a retry or recover() needs."""
        cutoff = to_us(started_before)
        due = ("FROM commands INDEXED BY commands_by_age WHERE status != 'in_flight'"
               " AND started_at < ?")
        if self._connection().execute(f"SELECT 1 {due} LIMIT 1", (cutoff,)).fetchone() is None:
            return 0  # the usual case: a read, no write transaction
        with self._write_transaction() as db:
            return db.execute(f"DELETE {due}", (cutoff,)).rowcount

    @_unavailable_on_sqlite_error
    def write_each(self, commits: Sequence[Commit]) -> list[EngineError | None]:
        """Write several commits in ONE database transaction (one flush), each on its own:
        one that fails (a lost compare-and-swap) is rolled back alone and its error
        returned in its place; the others commit together."""
        outcomes: list[EngineError | None] = []
        encoded = [_Texts.of(commit) for commit in commits]
        if heads_only(commits):
            with self._write_transaction() as db:
                return self._swap_heads(db, commits, encoded)
        with self._write_transaction() as db:
            for commit, texts in zip(commits, encoded):
                guarded = not _refused_only_before_writing(commit)  # an expiry needs no savepoint
                if guarded:
                    db.execute("SAVEPOINT one_commit")
                try:
                    self._apply(db, commit, texts)
                except EngineError as refused:
                    if guarded:
                        db.execute("ROLLBACK TO one_commit")
                    outcomes.append(refused)
                else:
                    outcomes.append(None)
                if guarded:
                    db.execute("RELEASE one_commit")
        for commit, outcome in zip(commits, outcomes):
            if outcome is None and commit.snapshot is not None:
                self._recent.put(commit.snapshot)
        return outcomes

    def _swap_heads(self, db: sqlite3.Connection, commits: Sequence[Commit],
                    encoded: Sequence[_Texts]) -> list[EngineError | None]:
        """``write_each`` for a batch of head commits (an expiry sweep's), set-wise: the
        versions are read once under the write lock (nobody else can move them until the
        commit), and the swaps and the journal entries of those still current are each one
        ``executemany``, the same statements ``_swap_head`` runs one by one."""
        stored: dict[str, tuple[int, int]] = {}
        tx_ids = [commit.tx_id for commit in commits]
        for start in range(0, len(tx_ids), 500):  # within SQLite's bound on parameters
            chunk = tx_ids[start:start + 500]
            stored.update((tx_id, (version, valid)) for tx_id, version, valid in db.execute(
                f"SELECT id, version, json_valid(snapshot) FROM transactions WHERE id IN ({_placeholders(chunk)})",
                chunk))
        outcomes = [head_refusal(commit.expected_version, commit.head, stored.get(commit.tx_id))
                    for commit in commits]
        swaps, entries = [], []
        for commit, texts, outcome in zip(commits, encoded, outcomes):
            if outcome is None and commit.head is not None:
                swaps.append(_head_swap_values(commit.expected_version, commit.head))
                entries.extend(_journal_rows(commit, texts))
        db.executemany(_HEAD_SWAP_SQL, swaps)
        db.executemany(_JOURNAL_SQL, entries)
        return outcomes

    def _apply(self, db: sqlite3.Connection, commit: Commit, texts: _Texts) -> None:
        # The version compare-and-swap first: a command that lost a race learns it as
        # ConcurrentModification, never as a clash with the winner's (automatic) key.
        if commit.snapshot is not None:
            self._swap_snapshot(db, commit, texts.snapshot)
        elif commit.head is not None:
            self._swap_head(db, commit.expected_version, commit.head)
        if commit.command is not None:
            self._write_command(db, commit.command)
        if commit.events:
            db.executemany(_JOURNAL_SQL, _journal_rows(commit, texts))
        if commit.intent is not None:
            self._write_intent(db, commit.tx_id, commit.intent, texts)
        if commit.hold is not None:
            hold = commit.hold
            db.execute(
                "INSERT INTO preview_holds (key, tx_id, provider, request, sealed_token, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (hold.key, hold.tx_id, hold.provider, texts.hold_request, hold.sealed_token,
                 to_us(hold.expires_at)),
            )
        if commit.release_hold is not None:
            db.execute("DELETE FROM preview_holds WHERE key = ?", (commit.release_hold,))
        if commit.enqueue:
            db.executemany(
                "INSERT INTO outbox (tx_id, provider, kind, payload, idempotency_key, status,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(d.tx_id, d.provider, d.kind, payload, d.idempotency_key, PENDING, to_us(d.due_at),
                  to_us(d.due_at)) for d, payload in zip(commit.enqueue, texts.payloads)],
            )

    def _swap_snapshot(self, db: sqlite3.Connection, commit: Commit, text: str | None) -> None:
        tx = commit.snapshot
        values = (tx.state, tx.version, to_us(tx.expires_at), to_us(tx.refund_deadline), tx.pending,
                  text, to_us(tx.updated_at))
        if commit.expected_version == 0:
            try:
                db.execute(
                    "INSERT INTO transactions (state, version, expires_at, refund_deadline, pending,"
                    " snapshot, updated_at, id, provider, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    values + (tx.id, tx.provider, to_us(tx.created_at)),
                )
            except sqlite3.IntegrityError:
                raise ConcurrentModification("the transaction already exists", tx_id=tx.id) from None
        else:
            self._swap(db, commit.expected_version, tx, values)

    def _swap(self, db: sqlite3.Connection, expected_version: int, tx: Transaction, values: tuple) -> None:
        if db.execute(_SWAP_SQL.format(snapshot="?"), values + (tx.id, expected_version)).rowcount != 1:
            raise lost_race(expected_version, tx)

    def _swap_head(self, db: sqlite3.Connection, expected_version: int, head: TransactionHead) -> None:
        if db.execute(_HEAD_SWAP_SQL + " AND json_valid(snapshot)",
                      _head_swap_values(expected_version, head)).rowcount != 1:
            refusal = head_refusal(expected_version, head, db.execute(
                "SELECT version, json_valid(snapshot) FROM transactions WHERE id = ?", (head.id,)).fetchone())
            assert refusal is not None  # the swap matched nothing: the version moved, or the text is damaged
            raise refusal

    def _write_intent(self, db: sqlite3.Connection, tx_id: str, op: IntentOp, texts: _Texts) -> None:
        if op.op == PUT:
            intent = op.intent
            db.execute(
                "INSERT INTO intents (tx_id, event, idempotency_key, params, changes, attempts,"
                " lease_until, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (tx_id, intent.event, intent.idempotency_key, texts.intent_params, texts.intent_changes,
                 intent.attempts, to_us(self._lease_until(op)), op.owner),
            )
        elif op.op == TAKE:
            taken = db.execute(
                "UPDATE intents SET lease_until = ?, owner = ?, attempts = attempts + 1"
                " WHERE tx_id = ? AND attention IS NULL AND (lease_until IS NULL OR lease_until <= ?)",
                (to_us(self._lease_until(op)), op.owner, tx_id, to_us(self.lease_now(op.now))),
            ).rowcount
            if taken != 1:
                raise TransactionInDoubt("its provider call is in flight in another process", tx_id=tx_id)
        elif op.op == PARK:
            self._fenced(db, "UPDATE intents SET lease_until = NULL, owner = NULL, attention = ?"
                             " WHERE tx_id = ?", (op.error, tx_id), op.owner)
        elif op.op in (REPLACE, RESOLVE):
            freed = db.execute("DELETE FROM intents WHERE tx_id = ? AND (lease_until IS NULL OR lease_until <= ?)",
                               (tx_id, to_us(self.lease_now(op.now)))).rowcount
            if freed != 1:
                raise TransactionInDoubt("its provider call is in flight in another process", tx_id=tx_id)
            if op.op == REPLACE:
                self._write_intent(db, tx_id, attrs.evolve(op, op=PUT), texts)
        elif op.op == RELEASE:
            self._fenced(db, "UPDATE intents SET lease_until = NULL, owner = NULL, last_error = ?, retry_at = ?"
                             " WHERE tx_id = ?", (op.error, to_us(op.retry_at), tx_id), op.owner)
        elif op.op == DROP:
            self._fenced(db, "DELETE FROM intents WHERE tx_id = ?", (tx_id,), op.owner)
        else:
            raise ValueError(f"unknown intent operation {op.op!r}")

    def _lease_until(self, op: IntentOp) -> datetime | None:
        if op.lease is None:
            return None
        return self.lease_now(op.now) + op.lease

    @staticmethod
    def _fenced(db: sqlite3.Connection, sql: str, values: tuple, owner: str | None) -> None:
        """Run an intent change, only as its lease holder when ``owner`` is given."""
        if owner is None:
            db.execute(sql, values)
            return
        if db.execute(sql + " AND owner = ?", values + (owner,)).rowcount != 1:
            raise LeaseLost("this attempt's lease was taken over; its answer is left for recover()",
                            tx_id=values[-1])

    def _write_command(self, db: sqlite3.Connection, op: CommandOp) -> None:
        record = op.record
        if op.forget:
            db.execute("DELETE FROM commands WHERE key = ?", (record.key,))
            return
        if op.insert:
            try:
                db.execute(
                    "INSERT INTO commands (key, command, fingerprint, tx_id, status, version, code, message,"
                    " lease_until, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.key, record.command, record.fingerprint, record.tx_id, record.status,
                     record.version, record.code, record.message, to_us(record.lease_until),
                     to_us(record.started_at)),
                )
            except sqlite3.IntegrityError:  # the key is taken: by this command or another one
                existing = db.execute("SELECT fingerprint FROM commands WHERE key = ?", (record.key,)).fetchone()
                if existing is not None and existing[0] != record.fingerprint:
                    raise IdempotencyConflict("the idempotency key was used for another command") from None
                raise ConcurrentModification("the same command is running elsewhere", tx_id=record.tx_id) from None
            return
        condition, extra = "", ()
        if op.take_lease_at is not None:
            condition, extra = " AND (lease_until IS NULL OR lease_until <= ?)", (to_us(op.take_lease_at),)
        updated = db.execute(
            "UPDATE commands SET status = ?, version = ?, code = ?, message = ?, lease_until = ?"
            " WHERE key = ?" + condition,
            (record.status, record.version, record.code, record.message, to_us(record.lease_until),
             record.key) + extra,
        ).rowcount
        # Settling a command that kept no record (a keyless one) has nothing to update;
        # taking over a record's lease must find the record free.
        if updated != 1 and op.take_lease_at is not None:
            raise TransactionInDoubt("the same command is in flight in another process", tx_id=record.tx_id)

    # --- the outbox ---

    @_unavailable_on_sqlite_error
    def claim_deliveries(self, now: datetime, lease_until: datetime, limit: int,
                         owner: str | None = None, providers: Sequence[str] | None = None) -> list[Delivery]:
        only = "" if providers is None else f" AND provider IN ({_placeholders(providers)})"
        with self._write_transaction() as db:
            rows = db.execute(
                "SELECT id, tx_id, provider, kind, payload, idempotency_key, attempts FROM outbox"
                " INDEXED BY outbox_due WHERE status = 'pending' AND next_attempt_at <= ?"
                f" AND (lease_until IS NULL OR lease_until <= ?){only} ORDER BY next_attempt_at, id LIMIT ?",
                (to_us(now), to_us(now), *(providers or ()), limit),
            ).fetchall()
            db.executemany("UPDATE outbox SET lease_until = ?, lease_owner = ? WHERE id = ?",
                           [(to_us(lease_until), owner, row[0]) for row in rows])
        return [Delivery(id=r[0], tx_id=r[1], provider=r[2], kind=r[3], payload=read_json(r[4], f"delivery {r[0]}"),
                         idempotency_key=r[5], attempts=r[6]) for r in rows]

    @_unavailable_on_sqlite_error
    def settle_deliveries(self, settlements: Sequence[DeliverySettlement], now: datetime,
                          owner: str | None = None) -> int:
        # Only the lease holder settles: a worker whose lease ran out and was re-claimed
        # by another must not overwrite that worker's outcome.
        with self._write_transaction() as db:
            cursor = db.executemany(
                "UPDATE outbox SET status = ?, attempts = attempts + ?,"
                " next_attempt_at = CASE WHEN ? THEN ? ELSE next_attempt_at END,"
                " last_error = coalesce(?, last_error), lease_until = NULL, lease_owner = NULL,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END,"
                # a delivered record's sealed secrets are needed no more (a dead one keeps
                # them: an operator may re-queue it)
                " payload = CASE WHEN ? = 'delivered' THEN json_remove(payload, '$.\"$sealed\"') ELSE payload END"
                " WHERE id = ? AND (? IS NULL OR lease_owner = ?)",
                [(s.status, int(s.attempted), s.attempted, to_us(s.next_attempt_at), s.error, s.status,
                  to_us(now), s.status, s.id, owner, owner) for s in settlements],
            )
            return cursor.rowcount

    _DELIVERY_COLUMNS = ("SELECT id, tx_id, provider, kind, status, attempts, next_attempt_at, last_error,"
                         " created_at, delivered_at FROM outbox")

    @_unavailable_on_sqlite_error
    def deliveries(self, tx_id: str | None = None, status: str | None = None,
                   limit: int | None = None) -> list[DeliveryRecord]:
        conditions, values = [], []
        if tx_id is not None:
            conditions.append("tx_id = ?")
            values.append(tx_id)
        if status is not None:
            conditions.append("status = ?")
            values.append(status)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._connection().execute(
            f"{self._DELIVERY_COLUMNS}{where} ORDER BY id LIMIT ?", (*values, -1 if limit is None else limit),
        ).fetchall()
        return [DeliveryRecord(r[0], r[1], r[2], r[3], r[4], r[5], from_us(r[6]), r[7], from_us(r[8]),
                               from_us(r[9])) for r in rows]

    @_unavailable_on_sqlite_error
    def backlog(self, now: datetime) -> dict[str, int]:
        db = self._connection()
        in_doubt, stuck = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE lease_until IS NULL OR lease_until <= ?) FROM intents",
            (to_us(now),),
        ).fetchone()
        return {
            PENDING: db.execute("SELECT count(*) FROM outbox INDEXED BY outbox_due"
                                " WHERE status = 'pending'").fetchone()[0],
            DEAD: db.execute("SELECT count(*) FROM outbox INDEXED BY outbox_dead"
                             " WHERE status = 'dead'").fetchone()[0],
            "in_doubt": in_doubt,
            "stuck": stuck,
        }

    @_unavailable_on_sqlite_error
    def retry_delivery(self, delivery_id: int, now: datetime) -> bool:
        with self._write_transaction() as db:
            return db.execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?, lease_until = NULL,"
                " lease_owner = NULL WHERE id = ? AND status = 'dead'", (to_us(now), delivery_id),
            ).rowcount == 1

    @_unavailable_on_sqlite_error
    def retry_dead_deliveries(self, now: datetime) -> int:
        with self._write_transaction() as db:
            return db.execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?, lease_until = NULL,"
                " lease_owner = NULL WHERE status = 'dead'", (to_us(now),),
            ).rowcount

    # --- workers ---

    @_unavailable_on_sqlite_error
    def beat(self, worker: WorkerRecord) -> None:
        with self._write_transaction() as db:
            db.execute(
                "INSERT INTO workers (id, host, pid, status, started_at, heartbeat_at, stopped_at,"
                " iterations, totals) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " status = excluded.status, heartbeat_at = excluded.heartbeat_at,"
                " stopped_at = excluded.stopped_at, iterations = excluded.iterations,"
                " totals = excluded.totals",
                (worker.id, worker.host, worker.pid, worker.status, to_us(worker.started_at),
                 to_us(worker.heartbeat_at), to_us(worker.stopped_at), worker.iterations,
                 dumps(dict(worker.totals))),
            )

    @_unavailable_on_sqlite_error
    def workers(self) -> list[WorkerRecord]:
        rows = self._connection().execute(
            "SELECT id, host, pid, status, started_at, heartbeat_at, stopped_at, iterations, totals"
            " FROM workers ORDER BY heartbeat_at DESC"
        ).fetchall()
        return [WorkerRecord(r[0], r[1], r[2], r[3], from_us(r[4]), from_us(r[5]), from_us(r[6]), r[7],
                             read_json(r[8], f"worker {r[0]}")) for r in rows]

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()
        self._gate.close()


class _SnapshotCache:
    """The most recently used snapshots, one per transaction, by (id, version).

    A snapshot is immutable and its version is compare-and-swapped, so a committed
    (id, version) names exactly one Transaction: a load that finds that version here
    skips decoding (and re-validating) the JSON.  Only committed snapshots enter (a
    rolled-back write must not shadow the version another writer commits), and each
    transaction holds one entry, its latest, so the cache covers ``size`` transactions
    however many versions each went through.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: collections.OrderedDict[str, Transaction] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, tx_id: str, version: int) -> Transaction | None:
        with self._lock:
            tx = self._entries.get(tx_id)
            if tx is None or tx.version != version:
                return None
            self._entries.move_to_end(tx_id)
            return tx

    def put(self, tx: Transaction) -> None:
        with self._lock:
            known = self._entries.get(tx.id)
            if known is not None and known.version > tx.version:
                return  # a slower reader must not replace a newer version
            self._entries[tx.id] = tx
            self._entries.move_to_end(tx.id)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)


#: a head's columns, in ``_head``'s order
_HEAD_COLUMNS = "id, provider, state, version, expires_at, refund_deadline, pending, updated_at"
#: the stored snapshot with its head fields set (``_swap_head``)
_SNAPSHOT_HEAD_SET = "json_set(snapshot, " + ", ".join(f"'$.{name}', ?" for name in HEAD_FIELDS) + ")"


_SWAP_SQL = ("UPDATE transactions SET state = ?, version = ?, expires_at = ?, refund_deadline = ?,"
             " pending = ?, snapshot = {snapshot}, updated_at = ? WHERE id = ? AND version = ?")
_JOURNAL_SQL = "INSERT INTO journal (tx_id, seq, kind, at, data) VALUES (?, ?, ?, ?, ?)"
#: a head's swap: json_set refuses text that is not JSON, so the rows are checked first
#: (json_valid), and a damaged one is refused alone instead of failing its whole batch
_HEAD_SWAP_SQL = _SWAP_SQL.format(snapshot=_SNAPSHOT_HEAD_SET)


def _head_swap_values(expected_version: int, head: TransactionHead) -> tuple:
    """``_HEAD_SWAP_SQL``'s values for a head: its columns, and the same fields of the stored
    snapshot set in place (json_set keeps the text's key order and compactness, so the
    row reads exactly as if the whole new snapshot had been encoded, without its body
    being read or rewritten)."""
    return ((head.state, head.version, to_us(head.expires_at), to_us(head.refund_deadline), head.pending)
            + head_snapshot_fields(head) + (to_us(head.updated_at), head.id, expected_version))


def _journal_rows(commit: Commit, texts: _Texts) -> list[tuple]:
    return [(event.tx_id, event.seq, event.kind, to_us(event.at), data)
            for event, data in zip(commit.events, texts.events)]


def _head(row: tuple) -> TransactionHead:
    tx_id, provider, state, version, expires_at, refund_deadline, pending, updated_at = row
    return TransactionHead(id=tx_id, provider=provider, state=state, version=version,
                           expires_at=from_us(expires_at), refund_deadline=from_us(refund_deadline),
                           pending=pending, updated_at=_EPOCH + timedelta(microseconds=updated_at))


def _refused_only_before_writing(commit: Commit) -> bool:
    """True when the compare-and-swap of the snapshot, the commit's first statement, is the
    only way it can be refused (no command record, intent or hold can clash after it): a
    refused one has then written nothing, and needs no savepoint to be rolled back alone."""
    return ((commit.snapshot is not None or commit.head is not None) and commit.command is None
            and commit.intent is None and commit.hold is None)


@attrs.frozen
class _Texts:
    """A commit's JSON columns, encoded before its write transaction takes the lock."""

    snapshot: str | None
    events: list[str]
    intent_params: str | None
    intent_changes: str | None
    hold_request: str | None
    payloads: list[str]

    @classmethod
    def of(cls, commit: Commit) -> _Texts:
        intent = commit.intent.intent if commit.intent is not None else None
        return cls(
            snapshot=dumps(encode_transaction(commit.snapshot)) if commit.snapshot is not None else None,
            events=[dumps(dict(event.data)) for event in commit.events],
            intent_params=dumps(dict(intent.params)) if intent is not None else None,
            intent_changes=dumps(dict(intent.changes)) if intent is not None else None,
            hold_request=dumps(dict(commit.hold.request)) if commit.hold is not None else None,
            payloads=[dumps(dict(delivery.payload)) for delivery in commit.enqueue],
        )


class _WriterGate:
    """Writers of one database file queue on a lock of their own instead of in SQLite's
    busy handler.

    SQLite's busy handler polls: a writer that finds the write lock taken sleeps 1, 2, 5,
    10 ms and more between tries, and the lock is usually free long before it wakes
    (two processes on one file got less done than one).  Every write transaction of this
    store first takes an exclusive ``flock`` on a sidecar file (``<database>-writer``),
    threads of one process first a ``threading.Lock``, polling the flock from 50 µs
    up to 1 ms apart: a writer holds it for a fraction of a millisecond, so the next one
    gets its turn almost as soon as it is free.  The wait is bounded by the busy
    timeout: a writer that keeps the gate (a process stopped by SIGSTOP or a debugger)
    holds the others up no longer than SQLite's own lock would; after it, they go on to
    SQLite, whose lock still decides who writes.  The gate only orders writers: one
    that does not use it (another program, the sqlite3 shell) is served by the busy
    handler as before.  The kernel drops a dead process's flock, so a crash never wedges
    the gate.  Where the sidecar cannot be created (a read-only directory), there is no
    gate and the busy handler serves.
    """

    _FIRST_PAUSE, _LONGEST_PAUSE = 0.00005, 0.001

    def __init__(self, path: str, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._pid = -1  # a forked child opens its own: a shared descriptor would share the lock

    def _descriptor(self) -> int | None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._fd = None
        return self._fd

    def acquire(self) -> bool:
        """Wait for this writer's turn; False if it did not come within the busy timeout
        (the writer then goes on to BEGIN IMMEDIATE, which waits and fails as without a gate)."""
        deadline = time.monotonic() + self._timeout
        if not self._threads.acquire(timeout=self._timeout):
            return False
        fd = self._descriptor()
        pause = self._FIRST_PAUSE
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._threads.release()
                    return False
                time.sleep(pause)
                pause = min(pause * 2, self._LONGEST_PAUSE)
            except OSError:
                break  # a file system without flock: the busy handler serves
        return True

    def release(self) -> None:
        """Hand the turn on; only after ``acquire`` returned True."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._threads.release()

    def close(self) -> None:
        with self._threads:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd, self._pid = None, -1


class _Immediate:
    """``with`` block that is one write transaction, taking the write lock up front."""

    def __init__(self, connection: sqlite3.Connection, gate: _WriterGate) -> None:
        self.connection = connection
        self.gate = gate
        self.turn = False

    def __enter__(self) -> sqlite3.Connection:
        self.turn = self.gate.acquire()
        try:
            self.connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._hand_on()
            raise
        return self.connection

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                try:
                    self.connection.execute("COMMIT")
                except sqlite3.Error:
                    self._roll_back()  # a failed COMMIT (disk full) can leave the transaction open
                    raise
            else:
                self._roll_back()
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        if self.turn:
            self.gate.release()

    def _roll_back(self) -> None:
        # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR); a failing
        # ROLLBACK must not hide the error that caused it.
        if self.connection.in_transaction:
            try:
                self.connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def _placeholders(values: Sequence[object]) -> str:
    if not values:
        raise ValueError("a sweep needs at least one provider")
    return ", ".join("?" * len(values))


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements, buffer = [], []
    for line in script.strip().splitlines():
        buffer.append(line)
        text = "\n".join(buffer).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            buffer = []
    if "\n".join(buffer).strip():
        statements.append("\n".join(buffer))
    return statements
