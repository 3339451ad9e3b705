"""The journal fold: how an event changes a snapshot.

The engine computes every new snapshot with ``apply``, the same function ``replay``
uses, so rebuilding a transaction from its journal gives exactly the stored snapshot
by construction; the tests check it against the database anyway.

Event kinds:

- ``transition``: the machine moved ``source -> target``; ``set`` holds the fields it
  changed (deadlines, the priced basket, the provider's reference, the receipt);
- ``attempt``: a provider call for ``event`` was claimed; the transaction is pending;
- ``rejected``: the provider definitively refused ``event``; pending is cleared and the
  state is unchanged;
- ``unknown``: the call's outcome could not be learned; still pending, in doubt;
- ``attention``: the engine will not re-send the pending call again (it is not
  idempotent at the provider); still pending, waiting for an operator or ``cancel``;
- ``resolved``: an operator settled the pending call (``applied`` true or false); the
  transition or the ``rejected`` note that follows records the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs

from .codec import decode_fields, decode_time, encode_fields
from .models import Event, Transaction, TransactionHead

TRANSITION = "transition"
ATTEMPT = "attempt"
REJECTED = "rejected"
UNKNOWN = "unknown"
ATTENTION = "attention"
RESOLVED = "resolved"


def transition_event(
    tx: Transaction | TransactionHead | None, at: datetime, *, event: str, source: str, target: str,
    fields: Mapping[str, Any],
) -> Event:
    seq = tx.version + 1 if tx is not None else 1
    tx_id = tx.id if tx is not None else fields["id"]
    return Event(
        tx_id=tx_id, seq=seq, kind=TRANSITION, at=monotonic_at(tx, at),
        data={"event": event, "source": source, "target": target, "set": encode_fields(fields)},
    )


def note_event(tx: Transaction, at: datetime, kind: str, **data: Any) -> Event:
    return Event(tx_id=tx.id, seq=tx.version + 1, kind=kind, at=monotonic_at(tx, at), data=data)


def monotonic_at(tx: Transaction | TransactionHead | None, now: datetime) -> datetime:
    """The time of the transaction's next journal entry: ``now``, but never earlier than
    its last entry, whatever the wall clock did (NTP stepping back, a host with another
    clock).  Only journal times use it: deadline checks compare the real ``now``."""
    return now if tx is None or now >= tx.updated_at else tx.updated_at


def apply(tx: Transaction | None, event: Event) -> Transaction:
    """The snapshot after ``event``."""
    data = event.data
    common: dict[str, Any] = {"version": event.seq, "updated_at": event.at}
    if event.kind == TRANSITION:
        currency = tx.currency if tx is not None else data["set"]["currency"]
        fields = decode_fields(data["set"], currency)
        if tx is None:
            return Transaction(state=data["target"], created_at=event.at, **fields, **common)
        return attrs.evolve(tx, state=data["target"], pending=None, **fields, **common)
    if tx is None:
        raise ValueError(f"journal of {event.tx_id} does not start with a transition")
    if event.kind == ATTEMPT:
        return attrs.evolve(tx, pending=data["event"], **common)
    if event.kind == REJECTED:
        return attrs.evolve(tx, pending=None, **common)
    if event.kind in (UNKNOWN, ATTENTION, RESOLVED):
        return attrs.evolve(tx, **common)
    raise ValueError(f"unknown journal event kind {event.kind!r}")


#: the fields a transition may set that a head holds (``TransactionHead``): an event that
#: sets only these changes nothing in the rest of the snapshot
HEAD_DEADLINES = frozenset({"expires_at", "refund_deadline"})


def apply_to_head(head: TransactionHead, event: Event) -> TransactionHead | None:
    """``apply`` for a head alone: the head after ``event``, or None when the event changes
    more than a head holds (a basket, a receipt, the provider's reference) and the whole
    snapshot must be rebuilt.  A transition sets the same head fields here as in ``apply``,
    so a store that patches those fields of the stored snapshot ends with what ``apply``
    would have encoded (tests/test_head_commits.py checks it field by field)."""
    if event.kind != TRANSITION or not set(event.data["set"]) <= HEAD_DEADLINES:
        return None
    deadlines = {name: decode_time(value) for name, value in event.data["set"].items()}
    return TransactionHead(id=head.id, provider=head.provider, state=event.data["target"], version=event.seq,
                           expires_at=deadlines.get("expires_at", head.expires_at),
                           refund_deadline=deadlines.get("refund_deadline", head.refund_deadline),
                           pending=None, updated_at=event.at)


def replay(events: Iterable[Event]) -> Transaction | None:
    tx: Transaction | None = None
    for event in events:
        if tx is not None and event.seq != tx.version + 1:
            raise ValueError(f"journal of {event.tx_id} skips from {tx.version} to {event.seq}")
        tx = apply(tx, event)
    return tx
