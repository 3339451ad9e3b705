"""What LIFECYCLE.md says must happen when a command arrives: the suites' oracle.

Written from the contract, not from ``engine.machine``: the suites judge the engine
against this table, so a mistake in the engine's compiled table cannot hide behind the
same mistake here (``tests/test_property_lifecycle.py`` checks the two agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from ..core import command_params
from ..drivers import Capabilities
from ..errors import (
    IdempotencyConflict,
    IllegalTransition,
    PreviewExpired,
    ProviderRejected,
    RefundWindowClosed,
    TransactionInDoubt,
    TransactionNotFound,
    UnsupportedOperation,
    ValidationError,
)
from ..models import MAX_LINES, Transaction

#: states whose preview clock runs (``expire`` leaves them)
ACTIVE = frozenset({"previewed", "updated", "payment_pending"})
#: states nothing leaves
TERMINAL = frozenset({"cancelled", "refunded", "expired"})

#: event -> {source state: target state}, the contract's event table (``expire`` aside)
TARGETS: Mapping[str, Mapping[str, str]] = {
    "preview": {"new": "previewed"},
    "update": {"previewed": "updated", "updated": "updated"},
    "begin_payment": {"previewed": "payment_pending", "updated": "payment_pending"},
    "finalize": {state: "finalized" for state in ACTIVE},
    "cancel": {state: "cancelled" for state in ACTIVE},
    "refund": {"finalized": "refunded"},
    "expire": {state: "expired" for state in ACTIVE},
}

# What the engine must do, one of:
REFUSED = "refused"  # raise ``error``; no provider call; nothing changes
EXPIRES = "expires"  # the preview is over: persist ``expired``, raise PreviewExpired, no call
REPLAYED = "replayed"  # a key already used: the original result, no call
LOCAL = "local"  # commit the transition at once, no call
REMOTE = "remote"  # claim, call the provider, commit what it answers
RESUME = "resume"  # re-send the in-doubt call under its key


@attrs.frozen
class Expectation:
    outcome: str
    error: type[Exception] | None = None  # REFUSED: the error class (IllegalTransition exactly)
    target: str | None = None  # LOCAL, REMOTE, RESUME: the state on success
    version: int | None = None  # REPLAYED: the snapshot version the key produced
    tx_id: str | None = None  # REPLAYED: the transaction the key belongs to
    why: str = ""

    def __str__(self) -> str:
        name = self.error.__name__ if self.error else (self.target or "")
        return f"{self.outcome} {name} ({self.why})"


def refused(error: type[Exception], why: str) -> Expectation:
    return Expectation(REFUSED, error=error, why=why)


def expect_command(
    tx: Transaction | None,
    event: str,
    now: datetime,
    capabilities: Capabilities,
    *,
    key: str | None,
    record: Any,
    intent: Any,
    params: Mapping[str, Any],
    key_use: tuple | None,
) -> Expectation:
    """The contract's verdict on ``event`` for ``tx`` at ``now``.

    ``record`` is the store's idempotency record for ``key`` (if any), ``key_use`` what
    the key was first used for (``(command, tx_id, params)``), ``intent`` the in-doubt
    side effect of ``tx`` (if any).
    """
    if tx is None:
        return refused(TransactionNotFound, "no such transaction")
    items = params.get("items")
    if items is not None and any(item.currency != tx.currency for item in items):
        return refused(ValidationError, "items in another currency")
    if items is not None and len(tx.items) + len(items) > MAX_LINES:
        return refused(ValidationError, f"more than {MAX_LINES} lines")
    if record is not None:
        if key_use is None:
            raise AssertionError(f"the store holds a record for key {key!r} the suite never saw used")
        if key_use != (event, tx.id, dict(params)):
            return refused(IdempotencyConflict, f"key {key!r} was used for {key_use[0]}")
        if record.status == "done":
            return Expectation(REPLAYED, version=record.version, tx_id=record.tx_id, why=f"key {key!r} done")
        if record.status == "rejected":
            return refused(ProviderRejected, f"key {key!r} was rejected")
    if tx.pending is not None:
        if (event == tx.pending and intent is not None and key in (None, intent.idempotency_key)
                and dict(intent.params) == command_params(event, params.get("items"), params.get("comment"))):
            return Expectation(RESUME, target=TARGETS[event][tx.state], why="its own retry")
        if event == "cancel" and tx.pending == "update" and "cancel" in capabilities.remote:
            # cancel replaces an in-doubt update (unless a live call holds its lease)
            return Expectation(RESUME, target=TARGETS[event][tx.state], why="cancel ends an update in doubt")
        return refused(TransactionInDoubt, f"its {tx.pending} is in doubt")
    if tx.state in TERMINAL:
        return refused(IllegalTransition, f"{tx.state} is final")
    if tx.state in ACTIVE and now >= tx.expires_at:
        return Expectation(EXPIRES, error=PreviewExpired, why="at or after expires_at")
    # The lifecycle refuses first; only an event it allows can be unsupported by a driver.
    target = TARGETS[event].get(tx.state)
    if target is None:
        return refused(IllegalTransition, f"no {event} from {tx.state}")
    if event not in capabilities.remote | capabilities.local:
        return refused(UnsupportedOperation, "the driver does not declare it")
    if event == "begin_payment" and tx.outstanding.amount_minor <= 0:
        return refused(IllegalTransition, "nothing outstanding")
    if event == "refund" and now >= tx.refund_deadline:
        return refused(RefundWindowClosed, "at or after refund_deadline")
    if event in capabilities.local:
        return Expectation(LOCAL, target=target, why="a local event")
    return Expectation(REMOTE, target=target, why="a remote event")


def expect_preview(
    capabilities: Capabilities, payment_type: str | None, *, key: str | None, record: Any,
    key_use: tuple | None, params: Mapping[str, Any],
) -> Expectation:
    if payment_type is not None and payment_type not in capabilities.payment_types:
        return refused(ValidationError, f"payment type {payment_type!r}")
    if record is not None:
        if key_use is None:
            raise AssertionError(f"the store holds a record for key {key!r} the suite never saw used")
        if key_use != ("preview", None, dict(params)):
            return refused(IdempotencyConflict, f"key {key!r} was used for {key_use[0]}")
        if record.status == "done":
            return Expectation(REPLAYED, version=record.version, tx_id=record.tx_id, why=f"key {key!r} done")
        if record.status == "rejected":
            return refused(ProviderRejected, f"key {key!r} was rejected")
        return Expectation(RESUME, target="previewed", why=f"key {key!r} in doubt")
    return Expectation(REMOTE, target="previewed", why="a new preview")
