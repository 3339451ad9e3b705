"""Every error txengine raises, under one root.

A POS catches ``EngineError`` for "anything txengine refused" and the subclasses for
what it can act on.  Messages name the transaction, its state and what was attempted,
and never carry a secret: drivers hand us provider messages, never request headers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Self


class EngineError(Exception):
    """Root of every txengine error.

    ``tx_id``, ``state`` and ``event`` are kept as attributes so a POS can log them as
    structured fields without parsing the message.
    """

    def __init__(
        self,
        message: str,
        *,
        tx_id: str | None = None,
        state: str | None = None,
        event: str | None = None,
    ) -> None:
        self.detail = message
        self.tx_id = tx_id
        self.state = state
        self.event = event
        super().__init__(_with_context(message, tx_id, state, event))

    def located(self, *, tx_id: str | None, state: str | None, event: str | None) -> Self:
        """The same error (same class, same fields: a provider's code, a driver's own
        details) naming the transaction, its state and the event it happened in."""
        located = type(self).__new__(type(self))  # no __init__: subclasses take their own arguments
        located.__dict__.update(self.__dict__)
        located.tx_id, located.state, located.event = tx_id, state, event
        located.args = (_with_context(self.detail, tx_id, state, event),)
        return located


def _with_context(message: str, tx_id: str | None, state: str | None, event: str | None) -> str:
    where = []
    if event is not None:
        where.append(f"{event}")
    if tx_id is not None:
        where.append(f"on transaction {tx_id}")
    if state is not None:
        where.append(f"in state {state!r}")
    return f"{' '.join(where)}: {message}" if where else message


class ValidationError(EngineError, ValueError):
    """Caller input is invalid; nothing was sent to a provider and nothing was stored."""


class TransactionNotFound(EngineError, LookupError):
    """No transaction with that id exists in the store."""


class IllegalTransition(EngineError):
    """The lifecycle does not allow this event from the transaction's current state."""


class PreviewExpired(IllegalTransition):
    """The preview deadline passed; the transaction has been moved to ``expired``."""

    def __init__(self, message: str, *, expires_at: datetime | None = None, **context: str | None) -> None:
        self.expires_at = expires_at
        super().__init__(message, **context)


class RefundWindowClosed(IllegalTransition):
    """The refund deadline passed; nothing was sent to the provider."""

    def __init__(self, message: str, *, refund_deadline: datetime | None = None, **context: str | None) -> None:
        self.refund_deadline = refund_deadline
        super().__init__(message, **context)


class UnsupportedOperation(EngineError):
    """The transaction's provider does not support this event (for example Forloy refunds)."""


class ConcurrentModification(EngineError):
    """Another caller changed the transaction first; reload it and decide again."""


class LeaseLost(ConcurrentModification):
    """This attempt's lease on an intent was taken over: its answer may not be committed."""


class TransactionInDoubt(EngineError):
    """A side effect's outcome is unknown; only its retry or ``recover()`` may proceed."""


class IdempotencyConflict(EngineError):
    """The idempotency key was already used for a different command or parameters."""


class ProviderError(EngineError):
    """Base for outcomes reported by (or about) a provider."""

    def __init__(self, message: str, *, provider: str | None = None, **context: str | None) -> None:
        self.provider = provider
        super().__init__(message, **context)


class ProviderRejected(ProviderError):
    """The provider definitively refused; the transaction's state is unchanged.

    ``code`` is the provider's own code (``INSUFFICIENT_CREDIT``, ``407``...);
    ``retry_after`` is set when the provider says when to try again (seconds).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retry_after: float | None = None,
        **context: str | None,
    ) -> None:
        self.code = code
        self.retry_after = retry_after
        self.provider_message = message
        super().__init__(f"[{code}] {message}", **context)


class OutcomeUnknown(ProviderError):
    """The provider may or may not have acted (timeout, dropped connection, 5xx, bad body).

    The intent stays in doubt: retry with the same idempotency key, or run ``recover()``.
    ``idempotency_key`` is the key to retry with (for a keyless preview, the one the
    engine generated; None when the command needs none).
    """

    def __init__(self, message: str, *, idempotency_key: str | None = None, **context: str | None) -> None:
        self.idempotency_key = idempotency_key
        super().__init__(message, **context)


class StoreUnavailable(EngineError):
    """The database cannot be used (down, full, read-only, replaced); nothing was changed."""


class ProtocolError(OutcomeUnknown):
    """The provider answered something that breaks its own contract.

    Treated as an unknown outcome: we cannot tell what the provider committed.
    """
