"""What the engine asks of a store, and the records it writes.

A store does no deciding.  The core hands it a ``Commit``: everything one transition
(or one claim, or one outcome) changes, to be written in ONE database transaction:

- the snapshot, compare-and-swapped on ``version`` (``ConcurrentModification`` if it
  moved), plus the journal events that produce it (append-only);
- the side-effect intent: put (claimed, leased), taken over (a retry claims a free
  lease), released (outcome unknown, lease freed for a retry), or dropped (settled);
- deliveries to enqueue in the outbox (guaranteed delivery);
- the idempotency record of the command that caused it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import attrs

from ..drivers import Delivery
from ..codec import decode_transaction, loads
from ..errors import ConcurrentModification, EngineError, StoreUnavailable, ValidationError
from ..machine import ACTIVE
from ..models import DeliveryRecord, Event, Transaction, TransactionHead

# intent operations
PUT, TAKE, RELEASE, DROP = "put", "take", "release", "drop"
#: PARK: the lease holder sets ``attention`` (recover() stops re-sending); REPLACE: a
#: new intent replaces one whose lease is free (cancel over an in-doubt update);
#: RESOLVE: drop an intent whose lease is free (an operator settled it)
PARK, REPLACE, RESOLVE = "park", "replace", "resolve"

# command record statuses
IN_FLIGHT, DONE, REJECTED = "in_flight", "done", "rejected"

# delivery statuses
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"


@attrs.frozen
class Intent:
    """A side effect claimed durably before its provider call.

    ``changes`` are the transition's effects decided at claim time (encoded), so a
    recovery commits exactly what was decided, whenever it learns the outcome.
    """

    tx_id: str
    event: str
    idempotency_key: str
    params: Mapping[str, Any]
    changes: Mapping[str, Any]
    attempts: int = 1
    lease_until: datetime | None = None
    last_error: str | None = None
    retry_at: datetime | None = None  # when recover() may re-send it (a retry by the POS may at once)
    attention: str | None = None  # why it waits for an operator: recover() no longer re-sends it


@attrs.frozen
class IntentOp:
    """One change to a transaction's intent.

    Leases are fenced by an owner token: PUT and TAKE hand the lease to ``owner``;
    RELEASE and DROP with an ``owner`` succeed only while that owner still holds the
    intent (else ``LeaseLost``, and nothing in the commit is written), so an answer
    that arrives after its lease was taken over never commits.

    A lease is a duration, not a time: the store starts it on its own clock
    (``Store.lease_now``), so whether it ran out never depends on two engines' clocks
    agreeing (PostgreSQL: the server's ``now()``).
    """

    op: str  # PUT, TAKE, RELEASE, DROP, PARK, REPLACE, RESOLVE
    intent: Intent | None = None  # for PUT and REPLACE
    now: datetime | None = None  # the engine's time (the store may prefer its own clock)
    lease: timedelta | None = None  # for PUT and TAKE: how long the owner holds it
    owner: str | None = None  # PUT/TAKE: the new holder; RELEASE/DROP: the holder it must be
    error: str | None = None  # for RELEASE; for PARK: why it needs attention
    retry_at: datetime | None = None  # for RELEASE: recover() backs off until then


@attrs.frozen
class CommandRecord:
    """What an idempotency key was used for, and what came of it."""

    key: str
    command: str
    fingerprint: str
    tx_id: str
    status: str
    version: int | None = None
    code: str | None = None
    message: str | None = None
    lease_until: datetime | None = None
    started_at: datetime | None = None  # the first attempt's time: a retry keeps its deadlines


@attrs.frozen
class CommandOp:
    record: CommandRecord
    insert: bool = False  # a new key: conflicts raise instead of overwriting
    take_lease_at: datetime | None = None  # a retry claims an in-flight record's free lease
    forget: bool = False  # remove the record: a keyless command's claim, once settled


@attrs.frozen
class NewDelivery:
    tx_id: str
    provider: str
    kind: str
    payload: Mapping[str, Any]
    idempotency_key: str
    due_at: datetime


@attrs.frozen
class PreviewHold:
    """What a preview needs to be sent again, kept while its outcome may be unknown.

    Written with the preview's claim and deleted in the same database transaction that
    settles it (stored, refused, or abandoned by ``recover()``), so it lives exactly as
    long as the preview is in flight or in doubt.  The customer key is only ever here
    sealed (``engine.secret.Sealer``); ``request`` holds the basket and payment type.
    """

    key: str  # the preview's idempotency key (its command record)
    tx_id: str
    provider: str
    request: Mapping[str, Any]
    sealed_token: str | None = attrs.field(repr=False)
    expires_at: datetime  # the preview's deadline: after it, never completed


def _one_new_snapshot(commit: Commit, attribute: attrs.Attribute[TransactionHead | None],
                      head: TransactionHead | None) -> None:
    if head is not None and commit.snapshot is not None:
        raise ValueError("a commit carries its new snapshot whole or its new head, not both")


@attrs.frozen
class Commit:
    tx_id: str
    expected_version: int  # 0 creates the transaction
    events: tuple[Event, ...] = ()
    snapshot: Transaction | None = None
    #: instead of ``snapshot``, for a transition that sets head fields only (an expiry):
    #: the store compare-and-swaps these columns and sets the same fields of the stored
    #: snapshot in place, leaving its body (basket, receipt, details) as it is
    head: TransactionHead | None = attrs.field(default=None, validator=_one_new_snapshot)
    intent: IntentOp | None = None
    command: CommandOp | None = None
    enqueue: tuple[NewDelivery, ...] = ()
    hold: PreviewHold | None = None  # a preview's claim keeps what recover() needs to settle it
    release_hold: str | None = None  # the key of a preview hold this commit settles (deleted)


def heads_only(commits: Sequence[Commit]) -> bool:
    """True for a batch of head commits of distinct transactions with nothing else to write
    (an expiry sweep's): a store may write it set-wise, its versions read once under lock."""
    return (all(commit.head is not None and commit.command is None and commit.intent is None
                and commit.hold is None and commit.release_hold is None and not commit.enqueue
                for commit in commits)
            and len({commit.tx_id for commit in commits}) == len(commits))


def lost_race(expected_version: int, tx: Transaction | TransactionHead | None) -> ConcurrentModification:
    """The refusal of a compare-and-swap that found another version."""
    assert tx is not None
    return ConcurrentModification(f"expected version {expected_version}; another caller changed it first",
                                  tx_id=tx.id, state=tx.state)


# --- reading what was stored -------------------------------------------------------------
# A row the engine wrote always decodes; one that does not was damaged outside it (a
# flipped bit on a failing disk: SQLite checksums nothing; an edit by hand).  The POS
# gets that as what it is, a storage failure naming the record, never a bare
# JSONDecodeError or KeyError from deep inside the store.


def read_json(text: Any, what: str) -> Any:
    """A JSON column as stored, or ``StoreUnavailable`` naming ``what`` if it is damaged."""
    try:
        return loads(text)
    except (ValueError, TypeError) as damaged:
        raise StoreUnavailable(f"{what} is damaged and cannot be read ({type(damaged).__name__})") from damaged


def read_snapshot(text: Any, tx_id: str) -> Transaction:
    """A stored snapshot, every validator re-run: ``StoreUnavailable`` on ``tx_id`` if the
    row no longer decodes into one; a decoded value a validator refuses (a state the
    lifecycle does not know) stays its ``ValidationError``."""
    try:
        return decode_transaction(loads(text))
    except ValidationError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as damaged:
        raise damaged_snapshot(tx_id, f"{type(damaged).__name__}: {str(damaged)[:200]}") from damaged


def damaged_snapshot(tx_id: str, cause: str) -> StoreUnavailable:
    """The storage failure of a snapshot that no longer reads: on ``tx_id``, saying why."""
    return StoreUnavailable(f"its stored snapshot is damaged and cannot be read ({cause})", tx_id=tx_id)


def head_refusal(expected_version: int, head: TransactionHead | None,
                 stored: tuple[int, bool] | None) -> EngineError | None:
    """Why ``head`` cannot be swapped in over a stored row read as ``(version, its
    snapshot is JSON)``: a lost race, or a snapshot damaged outside the engine (setting
    fields in place needs JSON); None when it can."""
    assert head is not None
    if stored is None or stored[0] != expected_version:
        return lost_race(expected_version, head)
    if not stored[1]:
        return damaged_snapshot(head.id, "it is not JSON")
    return None


@attrs.frozen
class DeliverySettlement:
    """What came of one claimed delivery.

    ``status`` is DELIVERED, PENDING (retry at ``next_attempt_at``) or DEAD.  A delivery
    claimed but never sent (its round ran out of lease, or the worker is shutting down)
    is released with ``attempted=False``: lease freed, attempts and due time unchanged.
    """

    id: int
    status: str
    next_attempt_at: datetime | None = None
    error: str | None = None
    attempted: bool = True


@attrs.frozen
class WorkerRecord:
    """A background worker's heartbeat row: what an operator checks to see it is alive."""

    id: str
    host: str
    pid: int
    status: str  # running or stopped
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None = None
    iterations: int = 0
    totals: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Listing:
    """The transactions an operator asks for (``txengine list``): each filter narrows it,
    newest first (``updated_at``, then id), one page of ``limit`` after ``offset``."""

    states: tuple[str, ...] = ()
    provider: str | None = None
    in_doubt: bool = False  # a provider call in doubt
    attention: bool = False  # parked for an operator
    expiring_before: datetime | None = None  # live (active, not in doubt) and due before it
    limit: int = attrs.field(default=50, validator=attrs.validators.ge(1))
    offset: int = attrs.field(default=0, validator=attrs.validators.ge(0))

    def where(self, mark: str, time: Callable[[datetime], Any]) -> tuple[str, list[Any]]:
        """The SQL condition on ``transactions t`` and its parameters, in a dialect whose
        placeholder is ``mark`` and whose times are ``time(datetime)``."""
        conditions: list[str] = []
        params: list[Any] = []

        def one_of(column: str, values: Sequence[str]) -> None:
            conditions.append(f"{column} IN ({', '.join([mark] * len(values))})")
            params.extend(values)

        if self.states:
            one_of("t.state", self.states)
        if self.provider is not None:
            conditions.append(f"t.provider = {mark}")
            params.append(self.provider)
        if self.in_doubt:
            conditions.append("t.pending IS NOT NULL")
        if self.attention:
            conditions.append("EXISTS (SELECT 1 FROM intents i WHERE i.tx_id = t.id AND i.attention IS NOT NULL)")
        if self.expiring_before is not None:
            one_of("t.state", sorted(ACTIVE))
            conditions.append(f"t.pending IS NULL AND t.expires_at < {mark}")
            params.append(time(self.expiring_before))
        return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


class Store(Protocol):
    """The engine's persistence.  Every method is one database transaction."""

    def load(self, tx_id: str) -> Transaction | None: ...

    def load_intent(self, tx_id: str) -> Intent | None: ...

    def load_command(self, key: str) -> CommandRecord | None: ...

    def preview_in_doubt(self, tx_id: str) -> CommandRecord | None:
        """The in-flight claim of a preview whose answer was lost (there is no snapshot)."""

    def journal(self, tx_id: str) -> list[Event]: ...

    def previews_to_settle(self, now: datetime, limit: int, providers: Sequence[str]) -> list[PreviewHold]:
        """Held previews of ``providers`` whose claim's lease is free at ``now`` (engine
        time, like the preview's own retry): in doubt, and nobody is sending them."""

    def sealing_key(self) -> bytes:
        """The per-database key preview holds are sealed under when the POS gives none."""

    def write(self, commit: Commit) -> None: ...

    def forget_commands(self, started_before: datetime) -> int:
        """Delete settled idempotency records of commands begun before ``started_before``
        (the retention has passed); in-flight records stay.  Returns how many."""

    def load_many(self, tx_ids: Sequence[str]) -> list[Transaction]:
        """The snapshots of those of ``tx_ids`` that exist (an expiry batch), in any order."""

    def write_each(self, commits: Sequence[Commit]) -> list[Any]:
        """Write ``commits`` in one database transaction, each on its own: one that is
        refused (``EngineError``: a lost compare-and-swap) is rolled back alone and its
        error returned in its place; None for each that was written."""

    def due_for_expiry(self, now: datetime, limit: int, providers: Sequence[str]) -> list[TransactionHead]:
        """The heads of up to ``limit`` transactions of ``providers`` whose preview deadline
        has passed at ``now`` and that have no call in flight, earliest deadline first."""

    def intents_to_recover(self, now: datetime, limit: int, providers: Sequence[str]) -> list[str]:
        """In-doubt intents whose lease is free on the store's clock and whose backoff
        (``retry_at``, engine time) has passed."""

    def needing_attention(self, limit: int, providers: Sequence[str] | None = None) -> list[Intent]:
        """Intents parked for an operator (``Intent.attention`` set), oldest first."""

    def lease_now(self, now: datetime) -> datetime:
        """The time leases are measured on: the store's own clock when it has one (one
        database, one clock), else the engine's ``now``."""

    def claim_deliveries(self, now: datetime, lease_until: datetime, limit: int,
                         owner: str | None = None, providers: Sequence[str] | None = None) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries of ``providers`` (None: all) to ``owner``;
        nobody else gets them until ``lease_until`` (``FOR UPDATE SKIP LOCKED`` on
        PostgreSQL, the write lock here)."""

    def settle_deliveries(self, settlements: Sequence[DeliverySettlement], now: datetime,
                          owner: str | None = None) -> int:
        """Record outcomes of deliveries ``owner`` still holds; returns how many it held."""

    def deliveries(self, tx_id: str | None = None, status: str | None = None,
                   limit: int | None = None) -> list[DeliveryRecord]: ...

    def retry_delivery(self, delivery_id: int, now: datetime) -> bool: ...

    def retry_dead_deliveries(self, now: datetime) -> int: ...

    def backlog(self, now: datetime) -> Mapping[str, int]:
        """What waits: deliveries ``pending`` and ``dead``, transactions ``in_doubt``, and
        ``stuck`` (in doubt with no live lease: nobody is working on them right now)."""

    def beat(self, worker: WorkerRecord) -> None:
        """Insert or update a worker's heartbeat row."""

    def workers(self) -> list[WorkerRecord]: ...

    def transaction_ids(self) -> list[str]: ...

    def find_transactions(self, listing: Listing) -> tuple[int, list[str]]:
        """How many transactions ``listing`` matches, and the ids of its page, newest first."""

    def keyed_hash_key(self) -> bytes: ...

    def close(self) -> None: ...
