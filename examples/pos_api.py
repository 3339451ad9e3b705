"""What both example POS APIs share: a transaction as JSON, and the HTTP status of each error."""

from __future__ import annotations

from typing import Any

from txengine import Transaction
from txengine.errors import (
    ConcurrentModification,
    EngineError,
    IdempotencyConflict,
    IllegalTransition,
    OutcomeUnknown,
    ProviderRejected,
    StoreUnavailable,
    TransactionInDoubt,
    TransactionNotFound,
    UnsupportedOperation,
    ValidationError,
)

#: Most specific first: PreviewExpired and RefundWindowClosed are IllegalTransitions.
HTTP_STATUS: tuple[tuple[type[EngineError], int], ...] = (
    (ValidationError, 422),          # fix the input; nothing was sent or stored
    (TransactionNotFound, 404),
    (IllegalTransition, 409),        # includes PreviewExpired, RefundWindowClosed
    (UnsupportedOperation, 501),
    (ConcurrentModification, 409),   # reload and decide again
    (IdempotencyConflict, 409),      # the key was used for something else
    (TransactionInDoubt, 409),       # another command's outcome is being settled
    (ProviderRejected, 402),         # a definite "no" from the provider, with its code
    (OutcomeUnknown, 504),           # retry with the same key, or let recover() settle it
    (StoreUnavailable, 503),         # the database is down, full or read-only
)


def http_status(error: EngineError) -> int:
    for kind, status in HTTP_STATUS:
        if isinstance(error, kind):
            return status
    return 500


def as_json(tx: Transaction) -> dict[str, Any]:
    return {
        "id": tx.id,
        "state": str(tx.state),
        "currency": tx.currency,
        "total_discount": str(tx.total_discount.to_decimal()),
        "total_credits": str(tx.total_credits.to_decimal()),
        "outstanding": str(tx.outstanding.to_decimal()),
        "expires_at": tx.expires_at.isoformat() if tx.expires_at else None,
        "refund_deadline": tx.refund_deadline.isoformat() if tx.refund_deadline else None,
        "receipt": [line.render() for line in tx.receipt],
    }
