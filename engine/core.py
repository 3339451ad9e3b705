"""What the engine does for each command, decided in pure code.

Every public command is a generator.  It yields the I/O it needs as small operation
objects (``StoreOp``: read or write the store; ``ProviderOp``: run a driver exchange)
and receives their results (or has their exceptions thrown in).  ``Engine`` performs
the operations with blocking calls, ``AsyncEngine`` with awaits; neither knows
anything about the lifecycle.  So the order of operations that keeps money safe is
written exactly once, here:

1. **Validate** the caller's input (``ValidationError`` before anything else).
2. **Replay** an idempotency key already used: the original result, or
   ``IdempotencyConflict`` if the parameters differ.
3. **Load** the snapshot.  A pending side effect blocks every other command
   (``TransactionInDoubt``); its own retry re-sends it under the same key.
4. **Expire lazily**: if the machine would take ``expire`` now, commit that, then raise
   ``PreviewExpired``.
5. **Decide** with the machine (``engine.machine.decide``): guard failures become their
   typed errors; unsupported events become ``UnsupportedOperation``.
6. A **local** event commits at once.  A **remote** one first commits a claim (an
   ``attempt`` event, the intent with its idempotency key and a lease): at most one
   call per transaction is ever in flight.  Then it calls the driver and commits the
   outcome: the transition (with any guaranteed deliveries enqueued in the same
   database transaction), a ``rejected`` note, or an ``unknown`` note that leaves the
   intent in doubt for ``recover()``.

Guaranteed deliveries are drained in rounds: claim a batch of due outbox rows under a
lease, prepare one exchange per provider batch, yield them together as a
``ParallelOp`` (the runner sends them concurrently, at most ``delivery_concurrency`` at
a time, and answers each one's result or exception), then settle the round in one
write.  A runner starts no send once half the lease is spent, so a slow round never
overlaps another worker's re-claim of the same rows.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import time
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, NoReturn, TypedDict, TypeVar

import attrs

from . import journal, machine
from .clock import Clock
from .codec import decode_fields, decode_line, dumps, encode_fields, encode_line
from .drivers import Capabilities, Delivery, PreviewRequest, ProviderDriver
from .errors import (
    ConcurrentModification,
    EngineError,
    IdempotencyConflict,
    OutcomeUnknown,
    ProtocolError,
    ProviderRejected,
    StoreUnavailable,
    TransactionInDoubt,
    TransactionNotFound,
    UnsupportedOperation,
    ValidationError,
)
from .machine import TimerPolicy, TxEvent, decide
from .models import (MAX_LINES, Basket, Event, LineItem, Outcome, PricedLine, Quote, Transaction,
                     TransactionHead, is_text)
from .secret import SEALED_FIELDS, Sealer, Secret, as_secret, has_secrets, open_payload, seal_payload
from .store.base import (
    DEAD,
    DELIVERED,
    DONE,
    DROP,
    IN_FLIGHT,
    PARK,
    PENDING,
    PUT,
    REJECTED,
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
    NewDelivery,
    PreviewHold,
)


@attrs.frozen
class StoreOp:
    """Call the store's ``method`` with ``args``; the runner answers what it returns."""

    method: str
    args: tuple[Any, ...] = ()


@attrs.frozen
class ProviderOp:
    """Run a driver exchange the core already built (and primed: see ``Core._prepare``).

    A lifecycle call is primed before its claim, so input the driver refuses is refused
    before anything is in doubt; a delivery's is left for the runner to start."""

    provider: str
    operation: str
    exchange: Any = None  # the generator, positioned at its first request when ``first`` is set
    first: Any = None  # that first httpx.Request (None: the runner starts the exchange)
    result: Any = None  # the answer, when the exchange needed no request at all

    @property
    def needs_io(self) -> bool:
        return self.exchange is not None


@attrs.frozen
class ParallelOp:
    """Run several prepared exchanges at once, at most ``limit`` in flight.

    The runner answers a list aligned with ``calls``: each call's result, or the
    exception it raised (mapped as for a single ``ProviderOp``), or ``NotStarted()`` for
    a call it did not begin because ``start_by`` had passed on the engine's clock or the
    engine was told to stop sending.  It never raises for a single call's failure.
    """

    calls: tuple[ProviderOp, ...]
    limit: int
    start_by: datetime | None = None


class NotStarted(Exception):
    """A call of a ``ParallelOp`` that was never sent: nothing happened at the provider."""


T = TypeVar("T")
Op = StoreOp | ProviderOp | ParallelOp
#: A command's generator: yields operations, is sent their results (``Any``: each
#: operation's own), returns the command's value of type ``T``.
Command = Generator[Op, Any, T]


class Steps(Generic[T]):
    """Iterates a command's operations; the runner answers each with its outcome.

    ``for op in steps: steps.answer(perform(op))`` (or ``steps.fail(error)``) drives a
    command to its end; its return value is then ``steps.value``.  The sync and async
    runners differ only in how they perform an operation.
    """

    value: T  #: the command's return value, set when it ends

    def __init__(self, command: Command[T]) -> None:
        self._command = command
        self._result: Any = None
        self._error: BaseException | None = None

    def __iter__(self) -> Steps[T]:
        return self

    def __next__(self) -> Op:
        result, error = self._result, self._error
        self._result = self._error = None
        try:
            return self._command.throw(error) if error is not None else self._command.send(result)
        except StopIteration as done:
            self.value = done.value
            raise

    def answer(self, result: Any) -> None:
        self._result = result

    def fail(self, error: BaseException) -> None:
        """Hand the failure back to the command: it decides what it means."""
        self._error = error

#: How long recover() waits before re-sending an intent whose last attempt's outcome was
#: unknown, by the number of attempts made: the first re-send is immediate, then it
#: backs off so a provider outage is not hammered.  A POS retrying the command itself
#: is never held back.
RECOVERY_BACKOFF: tuple[timedelta, ...] = (
    timedelta(0), timedelta(seconds=5), timedelta(seconds=30), timedelta(minutes=2), timedelta(minutes=10),
)

#: How much longer than its driver's call deadline an intent lease lasts: the claim's
#: commit before the call and the outcome's commit after it.  A lease always outlives
#: the call it covers, so a live call is never taken over.
LEASE_MARGIN = timedelta(seconds=15)
#: The deadline assumed for a driver that declares none (not an ``HttpDriver``).
DEFAULT_CALL_DEADLINE = 30.0

#: How long a caller's idempotency key is remembered after its command began: replays
#: within it return the original result; ``expire_due`` forgets older settled records,
#: so the database grows with the journal only (Stripe keeps keys 24 hours, too).
IDEMPOTENCY_RETENTION = timedelta(hours=24)

MAX_KEY_LENGTH = 255
MAX_COMMENT_LENGTH = 500
DEFAULT_PAYMENT_TYPE = "SPLIT_PAYMENT"
#: The code a preview's key replays once recover() gave the lost preview up.
PREVIEW_ABANDONED = "PREVIEW_ABANDONED"


def _hold_binding(key: str, tx_id: str) -> str:
    """What a sealed customer key is bound to: it opens only in its own preview's hold."""
    return f"{key}\n{tx_id}"


def _write(commit: Commit) -> StoreOp:
    return StoreOp("write", (commit,))


def _load(tx_id: str) -> StoreOp:
    return StoreOp("load", (tx_id,))


def _check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationError(f"idempotency_key must be 1-{MAX_KEY_LENGTH} printable characters")
    return key


def _check_tx_id(tx_id: str) -> str:
    if not isinstance(tx_id, str) or not tx_id or not is_text(tx_id):
        raise ValidationError("a transaction id is a non-empty string of valid Unicode text")
    return tx_id


def _in_context(error: EngineError, tx: Transaction | None, event: str, tx_id: str | None = None) -> EngineError:
    """The same error, re-raised with the transaction, its state and the event named."""
    return error.located(tx_id=tx.id if tx else tx_id, state=tx.state if tx else None, event=event)


def _steps(*ops: StoreOp) -> Command[None]:
    for op in ops:
        yield op


def _unknown_if_unstored(settling: Command[T], tx: Transaction | None, event: str, tx_id: str | None = None,
                         idempotency_key: str | None = None) -> Command[T]:
    """Run the writes that follow a provider call, where a store failure means OutcomeUnknown.

    The provider may have acted and we could not record what it answered: the intent
    claimed before the call (already committed) stays in doubt for ``recover()``.
    """
    try:
        return (yield from settling)
    except StoreUnavailable as failure:
        raise OutcomeUnknown(
            f"the provider was called but its answer could not be stored ({failure.detail});"
            " recover() settles it once the store is back", tx_id=tx.id if tx else tx_id,
            state=tx.state if tx else None, event=event, idempotency_key=idempotency_key) from failure


class EngineOptions(TypedDict, total=False):
    """What ``Engine.open(url, providers, clock, **options)`` accepts (see ``Core``)."""

    timers: Mapping[str, TimerPolicy] | None
    intent_lease: timedelta | None
    delivery_lease: timedelta
    delivery_concurrency: int
    delivery_round: int
    rng: random.Random | None
    secret_key: str | bytes | None
    idempotency_retention: timedelta


class Core:
    """The engine's pure decision layer, configured once per engine."""

    def __init__(
        self,
        drivers: Mapping[str, ProviderDriver],
        clock: Clock,
        *,
        timers: Mapping[str, TimerPolicy] | None = None,
        intent_lease: timedelta | None = None,
        delivery_lease: timedelta = timedelta(seconds=60),
        delivery_concurrency: int = 8,
        delivery_round: int = 100,
        rng: random.Random | None = None,
        secret_key: str | bytes | None = None,
        idempotency_retention: timedelta = IDEMPOTENCY_RETENTION,
    ) -> None:
        """``secret_key``: what a lost preview's customer key is sealed under while
        ``recover()`` may need it (None: a random key kept in the store)."""
        if not drivers:
            raise ValidationError("an engine needs at least one provider driver")
        unknown = set(timers or ()) - set(drivers)
        if unknown:
            raise ValidationError(f"timer policies for unknown providers: {sorted(unknown)}")
        self.drivers = dict(drivers)
        self._providers = tuple(sorted(self.drivers))
        self.capabilities: dict[str, Capabilities] = {
            name: driver.capabilities.with_timers((timers or {}).get(name))
            for name, driver in drivers.items()
        }
        self.clock = clock
        if not isinstance(delivery_concurrency, int) or delivery_concurrency < 1:
            raise ValidationError("delivery_concurrency must be a positive integer")
        if not isinstance(delivery_round, int) or delivery_round < 1:
            raise ValidationError("delivery_round must be a positive integer")
        self.intent_leases = {name: _intent_lease(name, driver, intent_lease) for name, driver in drivers.items()}
        self.delivery_lease = delivery_lease
        self.delivery_concurrency = delivery_concurrency
        self.delivery_round = delivery_round
        self.rng = rng or random.Random()
        if not isinstance(idempotency_retention, timedelta) or idempotency_retention <= timedelta(0):
            raise ValidationError("idempotency_retention must be a positive timedelta")
        self.idempotency_retention = idempotency_retention
        self._hash_key: bytes | None = None
        if secret_key is not None and not isinstance(secret_key, (str, bytes)):
            raise ValidationError("secret_key must be a str or bytes")
        self._secret_key = secret_key
        self._sealer_cache: Sealer | None = Sealer(secret_key) if secret_key is not None else None

    @property
    def providers(self) -> tuple[str, ...]:
        """The configured providers' names, sorted."""
        return self._providers

    # --- small helpers -------------------------------------------------------------------

    def _capabilities(self, provider: str) -> Capabilities:
        try:
            return self.capabilities[provider]
        except KeyError:
            raise ValidationError(
                f"unknown provider {provider!r}; configured: {', '.join(sorted(self.drivers))}"
            ) from None

    def _keyed_hash_key(self) -> Command[bytes]:
        if self._hash_key is None:
            self._hash_key = yield StoreOp("keyed_hash_key")
        return self._hash_key

    def _fingerprint(self, *parts: Any) -> Command[str]:
        """A keyed hash of a command's parameters: what an idempotency key is bound to."""
        key = yield from self._keyed_hash_key()
        return hmac.new(key, dumps(list(parts)).encode(), hashlib.sha256).hexdigest()

    def _prepare(self, provider: str, operation: str, *args: Any) -> ProviderOp:
        """Build a driver exchange up to its first request, in pure code.

        Drivers validate while building (amounts their wire cannot carry, malformed
        customer keys), so a ``ValidationError`` surfaces here, before anything is
        claimed or sent, and leaves nothing in doubt.
        """
        exchange = getattr(self.drivers[provider], operation)(*args)
        try:
            first = next(exchange)
        except StopIteration as done:
            return ProviderOp(provider, operation, result=done.value)
        return ProviderOp(provider, operation, exchange=exchange, first=first)

    def _load(self, tx_id: str) -> Command[Transaction]:
        tx: Transaction | None = yield _load(_check_tx_id(tx_id))
        if tx is None:
            lost = yield StoreOp("preview_in_doubt", (tx_id,))
            if lost is not None:  # the id an OutcomeUnknown of a preview named
                raise TransactionInDoubt(
                    f"its preview's outcome is unknown; retry the preview with idempotency key {lost.key!r}",
                    tx_id=tx_id, event="preview")
            raise TransactionNotFound("no such transaction", tx_id=tx_id)
        return tx

    def _replay(self, record: CommandRecord, command: str,
                fingerprint: str | None) -> Command[Transaction | None]:
        """The original result of a key already used, or the reason it cannot be reused."""
        if record.command != command or record.fingerprint != fingerprint:
            raise IdempotencyConflict(
                f"idempotency key {record.key!r} was already used for {record.command}"
                f" on {record.tx_id} with other parameters", event=command,
            )
        if record.status == DONE:
            events = yield StoreOp("journal", (record.tx_id,))
            return journal.replay(events[: record.version])
        if record.status == REJECTED:
            raise ProviderRejected(record.message or "", code=record.code or "", tx_id=record.tx_id,
                                   event=command)
        return None  # in flight: the caller resumes it

    # --- preview: the command that creates a transaction ------------------------------------

    def preview(
        self,
        provider: str,
        basket: Basket | Iterable[LineItem],
        customer_token: str | Secret | None,
        idempotency_key: str | None,
        payment_type: str | None,
    ) -> Command[Transaction]:
        capabilities = self._capabilities(provider)
        basket = basket if isinstance(basket, Basket) else Basket(basket)
        payment_type = payment_type or DEFAULT_PAYMENT_TYPE
        if payment_type not in capabilities.payment_types:
            raise ValidationError(
                f"{provider} accepts payment types {sorted(capabilities.payment_types)}, not {payment_type!r}"
            )
        if customer_token is not None and not isinstance(customer_token, (str, Secret)):
            raise ValidationError("customer_token must be a string")
        token = as_secret(customer_token)
        key = _check_key(idempotency_key) or f"auto:{uuid.uuid4().hex}"
        # A generated key's record is the claim a lost preview is resumed by; once the
        # preview settles nobody can ask for it again, so it goes in that same commit.
        generated = idempotency_key is None
        hash_key = yield from self._keyed_hash_key()
        fingerprint = yield from self._fingerprint(
            "preview", provider, payment_type, [encode_line(PricedLine.unpriced(i)) for i in basket.items],
            token.fingerprint(hash_key) if token else None,
        )
        now = self.clock.now()
        lease_until = now + self.intent_leases[provider]
        record = None if generated else (yield StoreOp("load_command", (key,)))
        hold = None
        if record is None:
            record = CommandRecord(key, "preview", fingerprint, _new_tx_id(), IN_FLIGHT, lease_until=lease_until,
                                   started_at=now)
            claim = CommandOp(record, insert=True)
            # Kept until the preview settles, so recover() can settle it if the answer is lost.
            hold = yield from self._hold(record, provider, basket, token, payment_type, capabilities)
        else:
            replayed = yield from self._replay(record, "preview", fingerprint)
            if replayed is not None:
                return replayed
            record = attrs.evolve(record, lease_until=lease_until)
            claim = CommandOp(record, take_lease_at=now)
        return (yield from self._send_preview(record, claim, hold, provider, basket, token, payment_type,
                                              forget_key=generated))

    def _send_preview(self, record: CommandRecord, claim: CommandOp, hold: PreviewHold | None, provider: str,
                      basket: Basket, token: Secret | None, payment_type: str, *,
                      forget_key: bool = False) -> Command[Transaction]:
        """Claim the preview's key, call the provider and store what it answers.

        The POS's first call, its retry with the same key and ``recover()`` completing a
        lost preview all run this; each settlement deletes the preview's hold.
        ``forget_key``: the key was generated for this very call, so once the preview
        settles nobody can ask for it again and its record goes in that same commit (a
        key handed out in an OutcomeUnknown is kept: the POS may retry with it)."""
        capabilities = self._capabilities(provider)
        key = record.key
        # The provider's clock started at the first attempt: a retry keeps that time for
        # every deadline, or allowed_events would offer what the provider then refuses.
        started = record.started_at or self.clock.now()
        step = decide(None, "preview", started, capabilities.timers)
        call = self._prepare(provider, "preview",
                             PreviewRequest(record.tx_id, basket, token, payment_type, key, started))
        yield _write(Commit(record.tx_id, 0, command=claim, hold=hold))
        try:
            quote = yield call
            _check_quote(quote, basket.gross.amount_minor, provider)
        except ProviderRejected as refusal:
            settled = attrs.evolve(record, status=REJECTED, code=refusal.code,
                                   message=refusal.provider_message, lease_until=None)
            yield _write(Commit(record.tx_id, 0, command=CommandOp(settled, forget=forget_key), release_hold=key))
            raise _in_context(refusal, None, "preview", record.tx_id) from None
        except OutcomeUnknown as unknown:
            yield _write(Commit(record.tx_id, 0, command=CommandOp(attrs.evolve(record, lease_until=None))))
            raise OutcomeUnknown(unknown.detail, provider=unknown.provider, idempotency_key=key,
                                 tx_id=record.tx_id, event="preview") from None

        fields = {
            "id": record.tx_id, "provider": provider, "currency": basket.currency,
            "payment_type": payment_type, "items": quote.lines, "provider_ref": quote.provider_ref,
            "receipt": quote.receipt, "details": dict(quote.details), **step.changes,
        }
        # created at its first attempt, like its deadlines
        event = journal.transition_event(None, started, event=step.event, source=step.source,
                                         target=step.target, fields=fields)
        tx = journal.apply(None, event)
        done = attrs.evolve(record, status=DONE, version=tx.version, lease_until=None)
        stored = _write(Commit(tx.id, 0, events=(event,), snapshot=tx, command=CommandOp(done, forget=forget_key),
                               release_hold=key))
        yield from _unknown_if_unstored(_steps(stored), None, "preview", tx.id, idempotency_key=key)
        return tx

    # --- lost previews: held while in doubt, settled by recover() ---------------------------------

    def _sealer(self) -> Command[Sealer]:
        if self._sealer_cache is None:
            secret_key = self._secret_key or (yield StoreOp("sealing_key"))
            self._sealer_cache = Sealer(secret_key)
        return self._sealer_cache

    def _hold(self, record: CommandRecord, provider: str, basket: Basket, token: Secret | None,
              payment_type: str, capabilities: Capabilities) -> Command[PreviewHold]:
        """What ``recover()`` needs to send this preview again: never the key in plain text."""
        sealed = None
        if token is not None:
            sealer = yield from self._sealer()
            sealed = sealer.seal(token, _hold_binding(record.key, record.tx_id))
        started = record.started_at or self.clock.now()  # set by the claim: the first attempt's time
        deadline = decide(None, "preview", started, capabilities.timers).changes["expires_at"]
        request = {"currency": basket.currency, "payment_type": payment_type,
                   "lines": [encode_line(PricedLine.unpriced(item)) for item in basket.items]}
        return PreviewHold(record.key, record.tx_id, provider, request, sealed, deadline)

    def _settle_lost_preview(self, hold: PreviewHold, now: datetime) -> Command[Transaction | None]:
        """Complete a preview whose answer was lost, or give it up.

        Before its deadline it is re-sent under its own idempotency key (the provider
        replays the first answer) and stored like any preview; the POS then finds it
        with ``get()``.  After the deadline the provider has expired it itself, and a
        provider whose preview is not idempotent would make a second one: those are
        abandoned (the key's record says so; nothing was stored).  Either way the
        hold, and the sealed customer key in it, is deleted.
        """
        record = yield StoreOp("load_command", (hold.key,))
        if record is None or record.status != IN_FLIGHT:  # settled by its own retry meanwhile
            yield _write(Commit(hold.tx_id, 0, release_hold=hold.key))
            return None
        capabilities = self._capabilities(hold.provider)
        if now >= hold.expires_at or "preview" in capabilities.not_idempotent:
            why = ("its deadline passed: the provider expires it" if now >= hold.expires_at
                   else f"{hold.provider} makes a new preview on every send; the lost one expires there")
            abandoned = attrs.evolve(record, status=REJECTED, code=PREVIEW_ABANDONED, lease_until=None,
                                     message=f"the preview's answer was lost and recover() gave it up: {why}")
            yield _write(Commit(hold.tx_id, 0, command=CommandOp(abandoned, take_lease_at=now),
                                release_hold=hold.key))
            return None
        token = None
        if hold.sealed_token is not None:
            sealer = yield from self._sealer()
            token = sealer.unseal(hold.sealed_token, _hold_binding(hold.key, hold.tx_id))
            if token is None:
                raise TransactionInDoubt("its preview's customer key was sealed under another secret_key;"
                                         " an engine with that key, or its deadline, settles it",
                                         tx_id=hold.tx_id, event="preview")
        request = hold.request
        basket = Basket(decode_line(line, request["currency"]).item for line in request["lines"])
        claim = CommandOp(attrs.evolve(record, lease_until=now + self.intent_leases[hold.provider]),
                          take_lease_at=now)
        return (yield from self._send_preview(record, claim, None, hold.provider, basket, token,
                                              request["payment_type"]))

    # --- commands on an existing transaction ---------------------------------------------------

    def command(
        self,
        tx_id: str,
        event: str,
        *,
        items: Iterable[LineItem] | None = None,
        comment: str | None = None,
        idempotency_key: str | None = None,
    ) -> Command[Transaction]:
        key = _check_key(idempotency_key)
        items = _read_once(items)
        params = command_params(event, items, comment)
        tx = yield from self._load(tx_id)
        if items is not None:
            _check_currency(items, tx)
            if len(tx.items) + len(params["items"]) > MAX_LINES:
                raise ValidationError(f"a transaction holds at most {MAX_LINES} lines",
                                      tx_id=tx.id, state=tx.state, event=event)
        capabilities = self._capabilities(tx.provider)
        remote = event in capabilities.remote
        # Only a key (the caller's, or an in-doubt intent's own) is bound to the parameters.
        bound = key is not None or (remote and tx.pending is not None)
        fingerprint = (yield from self._fingerprint(event, tx.id, params)) if bound else None
        if key is not None:
            record = yield StoreOp("load_command", (key,))
            if record is not None:
                if record.tx_id != tx.id:
                    raise IdempotencyConflict(
                        f"idempotency key {key!r} belongs to transaction {record.tx_id}",
                        tx_id=tx.id, state=tx.state, event=event)
                replayed = yield from self._replay(record, event, fingerprint)
                if replayed is not None:
                    return replayed

        now = self.clock.now()
        if tx.pending is not None:
            if event == "cancel" and tx.pending == "update" and "cancel" in capabilities.remote:
                assert fingerprint is not None  # cancel is remote here: fingerprinted above
                return (yield from self._cancel_over_update(tx, key, fingerprint, now))
            return (yield from self._resume(tx, event, key, fingerprint, now))
        if machine.is_overdue(tx, now):
            expired = yield from self._expire(tx, now, capabilities)
            raise machine.preview_expired(expired, event, now)
        if (tx.state, event) not in machine.TABLE:
            decide(tx, event, now, capabilities.timers)  # the lifecycle refuses first: IllegalTransition
        if event not in capabilities.supported:
            raise UnsupportedOperation(
                f"{tx.provider} does not support {event}", tx_id=tx.id, state=tx.state, event=event)
        step = decide(tx, event, now, capabilities.timers)

        if event in capabilities.local:
            fields = {**step.changes, **_local_effect(tx, event, params)}
            keyed = (CommandOp(CommandRecord(key, event, fingerprint, tx.id, DONE, version=tx.version + 1,
                                             started_at=now), insert=True) if key and fingerprint is not None else None)
            return (yield from self._commit_transition(tx, step.event, step.target, fields, now,
                                                      capabilities, command=keyed))

        intent = Intent(
            tx_id=tx.id, event=event, idempotency_key=key or f"auto:{tx.id}:{event}:{tx.version + 1}",
            params=params, changes=encode_fields(step.changes),
        )
        call = self._prepare(tx.provider, event, *_driver_args(tx, intent))
        attempt = journal.note_event(tx, now, journal.ATTEMPT, event=event, attempt=1)
        claimed = journal.apply(tx, attempt)
        owner = _owner_token()
        yield _write(Commit(
            tx.id, tx.version, events=(attempt,), snapshot=claimed,
            intent=IntentOp(PUT, intent, now=now, lease=self.intent_leases[tx.provider], owner=owner),
            command=_keyed_claim(key, event, fingerprint, tx.id, now),
        ))
        settling = self._settle(claimed, intent, call, attempt=1, owner=owner, recorded=key is not None)
        return (yield from _unknown_if_unstored(settling, tx, event))

    def _resume(self, tx: Transaction, event: str, key: str | None, fingerprint: str | None,
                now: datetime) -> Command[Transaction]:
        """Re-send the in-doubt side effect, only if this command is exactly its retry: the
        same event with the same parameters (an update with other lines, a refund with
        another comment is another command, and must wait)."""
        intent = yield StoreOp("load_intent", (tx.id,))
        same = intent is not None and intent.event == event and key in (None, intent.idempotency_key)
        if same:  # the intent keeps the parameters it was claimed with (a keyless one has no record)
            same = fingerprint == (yield from self._fingerprint(intent.event, tx.id, intent.params))
        if not same:
            raise TransactionInDoubt(
                f"the outcome of its {tx.pending} is unknown; retry {tx.pending} or run recover()",
                tx_id=tx.id, state=tx.state, event=event)
        return (yield from self._take_over(tx, intent, now))

    def _take_over(self, tx: Transaction, intent: Intent, now: datetime) -> Command[Transaction]:
        if intent.attention is not None:
            raise TransactionInDoubt(
                f"its {intent.event} needs an operator: {intent.attention}", tx_id=tx.id, state=tx.state,
                event=intent.event)
        guarded = intent.event in self._capabilities(tx.provider).not_idempotent
        call = self._prepare(tx.provider, intent.event, *_driver_args(tx, intent))
        attempt = journal.note_event(tx, now, journal.ATTEMPT, event=intent.event,
                                     attempt=intent.attempts + 1)
        claimed = journal.apply(tx, attempt)
        owner = _owner_token()
        yield _write(Commit(tx.id, tx.version, events=(attempt,), snapshot=claimed,
                            intent=IntentOp(TAKE, now=now, lease=self.intent_leases[tx.provider], owner=owner)))
        if guarded:
            found = yield from self._reconcile(tx, intent)
            if found is not None or intent.attempts >= 2:
                if call.exchange is not None:
                    call.exchange.close()  # built, never sent
            if found is not None:  # the provider shows it applied: commit that, send nothing
                call = ProviderOp(tx.provider, intent.event, result=found)
            elif intent.attempts >= 2:  # its one blind re-send is spent: never a third
                yield from self._park(claimed, intent, owner)
        return (yield from _unknown_if_unstored(
            self._settle(claimed, intent, call, attempt=intent.attempts + 1, owner=owner), tx, intent.event))

    def _reconcile(self, tx: Transaction, intent: Intent) -> Command[Quote | Outcome | None]:
        """The driver's reading of whether the in-doubt call applied; None if it cannot tell."""
        items = _new_items(tx, intent.params) if intent.event == "update" else ()
        try:
            found: Quote | Outcome | None = yield self._prepare(
                tx.provider, "reconcile", tx, intent.event, intent.idempotency_key, items)
            return found
        except EngineError:
            return None  # no reading: treat as "cannot tell"

    def _park(self, tx: Transaction, intent: Intent, owner: str) -> Command[NoReturn]:
        """Stop re-sending a call the provider may apply twice: an operator decides now."""
        reason = (f"{intent.event} was sent {intent.attempts} times without a usable answer and is not"
                  " idempotent at the provider; resolve it or cancel the transaction")
        note = journal.note_event(tx, self.clock.now(), journal.ATTENTION, event=intent.event, reason=reason)
        yield _write(Commit(tx.id, tx.version, events=(note,), snapshot=journal.apply(tx, note),
                            intent=IntentOp(PARK, owner=owner, error=reason)))
        raise TransactionInDoubt(f"its {intent.event} needs an operator: {reason}",
                                 tx_id=tx.id, state=tx.state, event=intent.event)

    def _cancel_over_update(self, tx: Transaction, key: str | None, fingerprint: str,
                            now: datetime) -> Command[Transaction]:
        """Cancel a transaction whose only doubt is a basket update.

        Whatever became of the update, cancelling releases the whole preview at the
        provider, so the customer's credits are never held hostage by a lost answer.
        The cancel's intent replaces the update's (only when no call is live), and runs
        like any other call: an unknown outcome leaves the cancel in doubt for a retry.
        """
        capabilities = self._capabilities(tx.provider)
        step = decide(tx, "cancel", now, capabilities.timers)
        abandoned = yield StoreOp("load_intent", (tx.id,))
        intent = Intent(tx_id=tx.id, event="cancel", idempotency_key=key or f"auto:{tx.id}:cancel:{tx.version + 1}",
                        params={}, changes=encode_fields(step.changes))
        call = self._prepare(tx.provider, "cancel", *_driver_args(tx, intent))
        attempt = journal.note_event(tx, now, journal.ATTEMPT, event="cancel", attempt=1,
                                     abandons=abandoned.event if abandoned else None)
        claimed = journal.apply(tx, attempt)
        owner = _owner_token()
        yield _write(Commit(
            tx.id, tx.version, events=(attempt,), snapshot=claimed,
            intent=IntentOp(REPLACE, intent, now=now, lease=self.intent_leases[tx.provider], owner=owner),
            command=_keyed_claim(key, "cancel", fingerprint, tx.id, now),
        ))
        settling = self._settle(claimed, intent, call, attempt=1, owner=owner, recorded=key is not None)
        return (yield from _unknown_if_unstored(settling, tx, "cancel"))

    # --- an operator settles what the engine will not -------------------------------------------

    def resolve(self, tx_id: str, *, applied: bool) -> Command[Transaction]:
        """Settle a transaction's in-doubt call by an operator's word, after checking with
        the provider: ``applied=True`` commits the transition decided when it was claimed
        (an update's lines are stored as sent, without the provider's discount, which
        was never learned); ``applied=False`` records it as not applied.  Refused while a
        call is live (``TransactionInDoubt``)."""
        if not isinstance(applied, bool):
            raise ValidationError("applied must be True or False")
        tx = yield from self._load(tx_id)
        intent = yield StoreOp("load_intent", (tx.id,))
        if tx.pending is None or intent is None or intent.event != tx.pending:
            raise ValidationError("the transaction has no call in doubt", tx_id=tx.id, state=tx.state)
        now = self.clock.now()
        event = intent.event
        note = journal.note_event(tx, now, journal.RESOLVED, event=event, applied=applied, by="operator")
        noted = journal.apply(tx, note)
        record = CommandRecord(intent.idempotency_key, event, "", tx.id, IN_FLIGHT)
        release = IntentOp(RESOLVE, now=now)
        if not applied:
            refused = journal.note_event(noted, now, journal.REJECTED, event=event, code="RESOLVED_NOT_APPLIED",
                                         message="an operator found it was not applied")
            settled = attrs.evolve(record, status=REJECTED, code="RESOLVED_NOT_APPLIED",
                                   message="an operator found it was not applied")
            after = journal.apply(noted, refused)
            yield _write(Commit(tx.id, tx.version, events=(note, refused), snapshot=after, intent=release,
                                command=CommandOp(settled)))
            return after
        fields = {**decode_fields(intent.changes, tx.currency), **_local_effect(tx, event, intent.params)}
        target = machine.TABLE[(tx.state, event)].target
        entry = journal.transition_event(noted, now, event=event, source=tx.state, target=target, fields=fields)
        after = journal.apply(noted, entry)
        done = attrs.evolve(record, status=DONE, version=after.version)
        yield _write(Commit(tx.id, tx.version, events=(note, entry), snapshot=after, intent=release,
                            command=CommandOp(done)))
        return after

    def _settle(self, tx: Transaction, intent: Intent, call: ProviderOp, *, attempt: int, owner: str,
                recorded: bool = True) -> Command[Transaction]:
        """Run the provider call of a claimed intent and commit whatever it answers.

        Every write here is fenced by ``owner``: if the lease was taken over meanwhile,
        the answer is not committed (the intent stays in doubt for whoever holds it now,
        or ``recover()``), and the caller is told the outcome is unknown.  ``recorded``:
        whether the command keeps an idempotency record to settle (False: a keyless first
        attempt, which wrote none; a take-over settles one if it exists).
        """
        event = intent.event
        # Settling updates the record the claim inserted; its fingerprint is not rewritten.
        record = CommandRecord(intent.idempotency_key, event, "", tx.id, IN_FLIGHT)
        try:
            try:
                result = yield call
                fields = _remote_effect(tx, event, result, intent.params)
            except ProviderRejected as refusal:
                note = journal.note_event(tx, self.clock.now(), journal.REJECTED, event=event,
                                          code=refusal.code, message=refusal.provider_message)
                rejected = attrs.evolve(record, status=REJECTED, code=refusal.code,
                                        message=refusal.provider_message)
                yield _write(Commit(tx.id, tx.version, events=(note,), snapshot=journal.apply(tx, note),
                                    intent=IntentOp(DROP, owner=owner),
                                    command=CommandOp(rejected) if recorded else None))
                raise _in_context(refusal, tx, event) from None
            except OutcomeUnknown as unknown:
                now = self.clock.now()
                note = journal.note_event(tx, now, journal.UNKNOWN, event=event, error=unknown.detail)
                backoff = RECOVERY_BACKOFF[min(attempt, len(RECOVERY_BACKOFF)) - 1]
                yield _write(Commit(tx.id, tx.version, events=(note,), snapshot=journal.apply(tx, note),
                                    intent=IntentOp(RELEASE, error=unknown.detail, retry_at=now + backoff,
                                                    owner=owner)))
                raise OutcomeUnknown(unknown.detail, provider=unknown.provider,
                                     idempotency_key=intent.idempotency_key,
                                     tx_id=tx.id, state=tx.state, event=event) from None
            fields = {**decode_fields(intent.changes, tx.currency), **fields}
            target = machine.TABLE[(tx.state, event)].target
            done = CommandOp(attrs.evolve(record, status=DONE, version=tx.version + 1)) if recorded else None
            return (yield from self._commit_transition(tx, event, target, fields, self.clock.now(),
                                                      self._capabilities(tx.provider), command=done,
                                                      intent=IntentOp(DROP, owner=owner)))
        except ConcurrentModification:
            # While an intent is pending only its lease holder writes: a moved version or
            # a lost fence both mean another attempt took this one over.
            raise OutcomeUnknown(
                f"the {event} answer came after this attempt's lease was taken over; it was not"
                " recorded, and the intent stays in doubt for its new holder or recover()",
                provider=tx.provider, tx_id=tx.id, state=tx.state, event=event) from None

    def _commit_transition(
        self, tx: Transaction, event: str, target: str, fields: Mapping[str, Any], now: datetime,
        capabilities: Capabilities, *, command: CommandOp | None = None, intent: IntentOp | None = None,
    ) -> Command[Transaction]:
        commit = self._transition(tx, event, target, fields, now, capabilities, command=command, intent=intent)
        return (yield from _committed((yield from self._sealed(commit))))

    def _transition(
        self, tx: Transaction, event: str, target: str, fields: Mapping[str, Any], now: datetime,
        capabilities: Capabilities, *, command: CommandOp | None = None, intent: IntentOp | None = None,
    ) -> Commit:
        """The commit of one transition: its event, the new snapshot, the deliveries it queues."""
        entry = journal.transition_event(tx, now, event=event, source=tx.state, target=target, fields=fields)
        new = journal.apply(tx, entry)
        enqueue = tuple(
            NewDelivery(new.id, new.provider, kind, self.drivers[new.provider].delivery_payload(kind, new),
                        f"{new.id}:{kind}", now)
            for kind in capabilities.deferred.get(event, ())
        )
        return Commit(tx.id, tx.version, events=(entry,), snapshot=new, intent=intent, command=command,
                      enqueue=enqueue)

    def _sealed(self, commit: Commit) -> Command[Commit]:
        """The commit with the secrets its deliveries carry sealed: a store-and-forward
        record that needs the customer's key (Forloy's offline sync) survives a restart,
        and the key never reaches the outbox in plain text."""
        if not any(has_secrets(delivery.payload) for delivery in commit.enqueue):
            return commit
        sealer = yield from self._sealer()
        return attrs.evolve(commit, enqueue=tuple(
            attrs.evolve(delivery, payload=seal_payload(sealer, delivery.payload, delivery.idempotency_key))
            for delivery in commit.enqueue))

    def _opened(self, claimed: Sequence[Delivery]) -> Command[list[Delivery]]:
        """Claimed deliveries with their sealed secrets opened for the driver."""
        if not any(SEALED_FIELDS in delivery.payload for delivery in claimed):
            return list(claimed)
        sealer = yield from self._sealer()
        return [attrs.evolve(delivery, payload=open_payload(sealer, delivery.payload, delivery.idempotency_key))
                if SEALED_FIELDS in delivery.payload else delivery for delivery in claimed]

    def _expiry(self, tx: Transaction, now: datetime, capabilities: Capabilities) -> Commit:
        step = decide(tx, "expire", now, capabilities.timers)
        return self._transition(tx, step.event, step.target, step.changes, now, capabilities)

    def _expiries(self, due: Sequence[TransactionHead], now: datetime,
                  damaged: dict[str, StoreUnavailable]) -> Command[list[Commit]]:
        """The commits expiring the overdue of ``due``.

        An expiry sets head fields only (state, version, time), so it is decided on the
        head and written as one (``Commit.head``): the snapshot's body is never read.
        Where the provider is told of an expiry (a release delivery built from the whole
        transaction: Cheers, secuconnect), the snapshot is loaded and expired whole; one
        that no longer reads is left out, into ``damaged``."""
        commits, whole = [], []
        for head in due:
            capabilities = self._capabilities(head.provider)
            if capabilities.deferred.get(TxEvent.expire):
                whole.append(head.id)
            elif machine.is_overdue(head, now):
                step = decide(head, TxEvent.expire, now, capabilities.timers)
                entry = journal.transition_event(head, now, event=step.event, source=head.state,
                                                 target=step.target, fields=step.changes)
                new = journal.apply_to_head(head, entry)
                if new is None:  # the machine's expiry came to set more than a head holds
                    whole.append(head.id)
                else:
                    commits.append(Commit(head.id, head.version, events=(entry,), head=new))
        for tx in (yield from self._readable(whole, damaged)):
            if machine.is_overdue(tx, now):
                commits.append((yield from self._sealed(self._expiry(tx, now, self._capabilities(tx.provider)))))
        return commits

    def _readable(self, tx_ids: list[str], damaged: dict[str, StoreUnavailable]) -> Command[list[Transaction]]:
        """The snapshots of ``tx_ids`` (``load_many``), without those damaged outside the
        engine: each is left out, into ``damaged``, and the others read again."""
        while tx_ids:
            try:
                found: list[Transaction] = yield StoreOp("load_many", (tx_ids,))
                return found
            except StoreUnavailable as unreadable:
                if unreadable.tx_id not in tx_ids:
                    raise  # the store failed, not one row
                damaged[unreadable.tx_id] = unreadable
                tx_ids = [tx_id for tx_id in tx_ids if tx_id != unreadable.tx_id]
        return []

    def _expire(self, tx: Transaction, now: datetime, capabilities: Capabilities) -> Command[Transaction]:
        return (yield from _committed((yield from self._sealed(self._expiry(tx, now, capabilities)))))

    # --- reads ---------------------------------------------------------------------------------

    def get(self, tx_id: str) -> Command[Transaction]:
        """The snapshot, with its guaranteed deliveries' progress read from the outbox and,
        when its pending call waits for an operator, why (``attention``)."""
        tx = yield from self._load(tx_id)
        deliveries = yield StoreOp("deliveries", (tx.id,))
        if deliveries:
            tx = attrs.evolve(tx, deliveries=deliveries)
        if tx.pending is not None:
            intent = yield StoreOp("load_intent", (tx.id,))
            if intent is not None and intent.attention is not None:
                tx = attrs.evolve(tx, attention=intent.attention)
        return tx

    def history(self, tx_id: str) -> Command[list[Event]]:
        yield from self._load(tx_id)
        events: list[Event] = yield StoreOp("journal", (tx_id,))
        return events

    def allowed_events(self, tx_id: str) -> Command[list[TxEvent]]:
        """The POS commands that would succeed now, judged exactly as ``command`` judges."""
        tx = yield from self._load(tx_id)
        if tx.pending is not None:  # only its retry (or recover) may act; cancel ends a doubtful update
            intent = yield StoreOp("load_intent", (tx.id,))
            retry = [tx.pending] if intent is None or intent.attention is None else []
            cancel = tx.pending == "update" and "cancel" in self._capabilities(tx.provider).remote
            return retry + [TxEvent.cancel] if cancel else retry
        now = self.clock.now()
        if machine.is_overdue(tx, now):
            return []  # every command would expire it first and raise PreviewExpired
        supported = self._capabilities(tx.provider).supported
        return [event for event in machine.allowed_events(tx, now)
                if event in supported and event != "expire"]  # expire is the engine's, not the POS's

    # --- sweeps ----------------------------------------------------------------------------------

    def expire_due(self, batch: int = 500) -> Command[int]:
        """Expire every overdue transaction; safe to run in several processes at once.

        Each batch is one read of the due transactions' heads (``_expiries``: the body of
        a snapshot is read only where the provider is told of the expiry) and one database
        transaction (one flush) holding every expiry of the batch, each its own
        compare-and-swap and journal event: an expiry that lost a race to a command or
        another sweeper is rolled back alone.  Settled idempotency records older than the
        retention are forgotten on the way (a read when there are none).

        A transaction whose stored snapshot was damaged outside the engine (a failing
        disk, an edit by hand) cannot be expired: it is left as it is, every other due
        transaction is expired, and then ``StoreUnavailable`` names the damaged ones, so
        one bad row neither stops the sweep nor goes unnoticed."""
        yield StoreOp("forget_commands", (self.clock.now() - self.idempotency_retention,))
        expired = 0
        damaged: dict[str, StoreUnavailable] = {}
        while True:
            now = self.clock.now()
            due = yield StoreOp("due_for_expiry", (now, batch, self._providers))
            commits = yield from self._expiries([head for head in due if head.id not in damaged], now, damaged)
            progress = expired
            if commits:
                outcomes = yield StoreOp("write_each", (commits,))
                for commit, outcome in zip(commits, outcomes):
                    if outcome is None:
                        expired += 1
                    elif isinstance(outcome, StoreUnavailable):
                        damaged[commit.tx_id] = outcome
                    # else someone got there first
            if len(due) < batch or expired == progress:
                break  # drained, or a full pass moved nothing: never spin on it
        if damaged:
            raise _unexpirable(damaged, expired)
        return expired

    def recover(self, batch: int = 100) -> Command[int]:
        """Re-drive every in-doubt side effect whose lease is free, then settle the previews
        whose answer was lost (``_settle_lost_preview``); returns how many settled.

        Each is re-sent under its original idempotency key, through the driver's own
        operation (a driver whose provider has a status query reads it first), and the
        transaction lands where the provider's answer puts it.  One whose provider is not
        configured in this engine is not even read: it is left for an engine that has it.
        """
        settled = 0
        now = self.clock.now()
        for tx_id in (yield StoreOp("intents_to_recover", (now, batch, self._providers))):
            tx = yield _load(tx_id)
            intent = yield StoreOp("load_intent", (tx_id,))
            if tx is None or intent is None or tx.pending != intent.event:
                continue
            try:
                yield from self._take_over(tx, intent, now)
                settled += 1
            except ProviderRejected:
                settled += 1  # definitely refused: no longer in doubt
            except EngineError:
                pass  # still in doubt, or taken by another process: a later sweep retries
        for hold in (yield StoreOp("previews_to_settle", (now, batch, self._providers))):
            try:
                yield from self._settle_lost_preview(hold, now)
                settled += 1
            except ProviderRejected:
                settled += 1  # refused: no longer in doubt (and its hold is deleted)
            except EngineError:
                pass  # still in doubt, or its POS is retrying it right now: a later sweep retries
        return settled

    def deliver_pending(self, batch: int | None = None, max_rounds: int | None = None) -> Command[int]:
        """Send due deliveries; reschedule failures with backoff; park the hopeless as dead.

        Works in rounds of up to ``batch`` deliveries (default ``delivery_round``) until
        nothing is due or ``max_rounds`` ran; returns how many were delivered.
        """
        size = batch or self.delivery_round
        delivered, rounds = 0, 0
        while max_rounds is None or rounds < max_rounds:
            rounds += 1
            now = self.clock.now()
            owner = secrets.token_hex(8)  # this round's lease: only its holder settles
            claimed = yield StoreOp("claim_deliveries", (now, now + self.delivery_lease, size, owner,
                                                         self._providers))
            if not claimed:
                break
            settlements = yield from self._deliver_round((yield from self._opened(claimed)), now)
            yield StoreOp("settle_deliveries", (settlements, self.clock.now(), owner))
            delivered += sum(1 for settlement in settlements if settlement.status == DELIVERED)
            if len(claimed) < size or not all(settlement.attempted for settlement in settlements):
                break  # drained, or the runner stopped starting sends: leave the rest for later
        return delivered

    def _deliver_round(self, claimed: Sequence[Delivery], now: datetime) -> Command[list[DeliverySettlement]]:
        """Send one round of claimed deliveries concurrently; what to settle for each."""
        settlements: list[DeliverySettlement] = []
        calls: list[ProviderOp] = []
        sent: list[list[Delivery]] = []
        for group in _batches(claimed, self.capabilities):
            try:
                calls.append(self._prepare_delivery(group))
                sent.append(group)
            except EngineError as refusal:
                settlements += [DeliverySettlement(d.id, DEAD, error=str(refusal)) for d in group]
        if calls:
            # Start nothing once half the lease is spent: a send begun later could still
            # be in flight when another worker re-claims the rows after the lease.
            results = yield ParallelOp(tuple(calls), self.delivery_concurrency,
                                       start_by=now + self.delivery_lease / 2)
            settled_at = self.clock.now()
            for group, result in zip(sent, results):
                settlements += self._settlements(group, result, settled_at)
        return settlements

    def _prepare_delivery(self, group: list[Delivery]) -> ProviderOp:
        """The delivery's exchange, not yet primed: its first request is built by the runner,
        concurrently with the other sends (the rows are claimed already, so a refusal while
        building parks them exactly as one while sending would)."""
        provider = group[0].provider  # claimed for this engine's providers only
        try:
            return ProviderOp(provider, "deliver", exchange=self.drivers[provider].deliver(tuple(group)))
        except EngineError:
            raise
        except Exception as bug:  # a driver that cannot build the request will not next time
            raise ProtocolError(f"the {provider} driver failed building deliver: {type(bug).__name__}",
                                provider=provider) from None

    def _settlements(self, group: list[Delivery], result: Any, now: datetime) -> list[DeliverySettlement]:
        if isinstance(result, NotStarted):
            return [DeliverySettlement(d.id, PENDING, attempted=False) for d in group]
        if isinstance(result, (ProviderRejected, ValidationError, UnsupportedOperation)):
            return [DeliverySettlement(d.id, DEAD, error=str(result)) for d in group]
        if isinstance(result, Exception):  # unknown outcome: send again later (same key)
            capabilities = self.capabilities[group[0].provider]
            return [self._retry_later(d, capabilities, now, str(result)) for d in group]
        # A batch may be refused in part: the driver names the refused deliveries.
        refused = result or {}
        return [DeliverySettlement(d.id, DEAD, error=str(refused[d.id])) if d.id in refused
                else DeliverySettlement(d.id, DELIVERED) for d in group]

    def _retry_later(self, delivery: Delivery, capabilities: Capabilities, now: datetime,
                     error: str) -> DeliverySettlement:
        schedule = capabilities.delivery_schedule
        if delivery.attempts >= len(schedule):
            return DeliverySettlement(delivery.id, DEAD, error=error)
        delay = schedule[delivery.attempts] * (1 + self.rng.uniform(0, 0.2))  # jitter spreads retries
        return DeliverySettlement(delivery.id, PENDING, next_attempt_at=now + delay, error=error)


# --- pure helpers ----------------------------------------------------------------------------------


def _unexpirable(damaged: Mapping[str, StoreUnavailable], expired: int) -> StoreUnavailable:
    """The error of a sweep that expired ``expired`` but had to leave ``damaged`` as they are."""
    named = ", ".join(sorted(damaged)[:10]) + (f" and {len(damaged) - 10} more" if len(damaged) > 10 else "")
    return StoreUnavailable(f"expired {expired}; {len(damaged)} due transaction(s) could not be expired because"
                            f" their stored snapshots are damaged and cannot be read: {named} (each is left as it"
                            f" is; every other due transaction was expired)",
                            tx_id=next(iter(damaged)) if len(damaged) == 1 else None)


def _new_tx_id() -> str:
    """Time-ordered, like UUIDv7: 48 bits of milliseconds, then 80 random bits.

    Ordered keys keep the B-tree inserts of the snapshot and journal tables on the same
    few pages; random UUIDs scatter every commit over the file (measured: about a third
    more time per durable transition here).
    """
    millis = time.time_ns() // 1_000_000
    return f"tx_{millis:012x}{secrets.token_hex(10)}"


def _committed(commit: Commit) -> Command[Transaction]:
    """Write a transition's commit; its new snapshot, with what it queued (read back only then)."""
    new = commit.snapshot
    assert new is not None  # a transition always carries the snapshot it produces
    yield _write(commit)
    if commit.enqueue:  # show the caller what it just queued (one indexed read, only then)
        return attrs.evolve(new, deliveries=(yield StoreOp("deliveries", (new.id,))))
    return new


def _keyed_claim(key: str | None, event: str, fingerprint: str | None, tx_id: str,
                 now: datetime) -> CommandOp | None:
    """The idempotency record a command claims, inserted with its intent; None without a
    caller's key: nothing could replay it, and the intent carries the provider's key."""
    if key is None or fingerprint is None:  # a keyed command is always fingerprinted
        return None
    return CommandOp(CommandRecord(key, event, fingerprint, tx_id, IN_FLIGHT, started_at=now), insert=True)


def _owner_token() -> str:
    """Who holds an intent's lease for one attempt: the fence its outcome's write checks."""
    return secrets.token_hex(8)


def _intent_lease(provider: str, driver: ProviderDriver, configured: timedelta | None) -> timedelta:
    """The intent lease for ``provider``: its call deadline plus ``LEASE_MARGIN``, or the
    POS's ``intent_lease`` if that is at least as long (a shorter one could expire under a
    live call, and another engine would send the call a second time)."""
    deadline = getattr(driver, "call_deadline", None) or DEFAULT_CALL_DEADLINE
    shortest = timedelta(seconds=deadline) + LEASE_MARGIN
    if configured is None:
        return shortest
    if not isinstance(configured, timedelta) or configured < shortest:
        raise ValidationError(
            f"intent_lease must be a timedelta of at least {shortest.total_seconds():g} s for {provider}"
            f" (its {deadline:g} s call deadline plus a {LEASE_MARGIN.total_seconds():g} s margin)")
    return configured


def _read_once(items: Iterable[LineItem] | None) -> Sequence[LineItem] | None:
    """The caller's lines as a list: a generator must not be used up by validation before
    the currency check reads it (an unchecked USD line would be re-read as EUR)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        return items  # refused by command_params with a clear message
    return list(items)


def command_params(event: str, items: Iterable[LineItem] | None, comment: str | None) -> dict[str, Any]:
    """A command's parameters as the engine stores and fingerprints them (validated)."""
    params: dict[str, Any] = {}
    if event == "update":
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ValidationError("update needs a sequence of LineItem")
        items = list(items)
        if not items or not all(isinstance(item, LineItem) for item in items):
            raise ValidationError("update needs at least one LineItem, and only LineItems")
        params["items"] = [encode_line(PricedLine.unpriced(item)) for item in items]
    elif items is not None:
        raise ValidationError(f"{event} takes no items")
    if comment is not None:
        if event != "refund":
            raise ValidationError(f"{event} takes no comment")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT_LENGTH or not is_text(comment):
            raise ValidationError(f"comment must be a string of at most {MAX_COMMENT_LENGTH} characters")
        params["comment"] = comment
    return params


def _check_currency(items: Sequence[LineItem], tx: Transaction) -> None:
    for item in items:
        if item.currency != tx.currency:
            raise ValidationError(f"item {item.name!r} is in {item.currency}, the transaction in {tx.currency}",
                                  tx_id=tx.id, state=tx.state, event="update")
    try:  # the new total must stay within Money's bound, like any basket
        sum((item.gross for item in items), tx.gross)
    except ValidationError as too_large:
        raise ValidationError(f"the basket total would be {too_large.detail}",
                              tx_id=tx.id, state=tx.state, event="update") from None


def _new_items(tx: Transaction, params: Mapping[str, Any]) -> tuple[LineItem, ...]:
    return tuple(decode_line(line, tx.currency).item for line in params["items"])


def _driver_args(tx: Transaction, intent: Intent) -> tuple[Any, ...]:
    if intent.event == "update":
        return (tx, _new_items(tx, intent.params), intent.idempotency_key)
    if intent.event == "refund":
        return (tx, intent.idempotency_key, intent.params.get("comment"))
    return (tx, intent.idempotency_key)


def _local_effect(tx: Transaction, event: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if event == "update":  # no provider call: the new lines carry no discount and no credits
        return {"items": tx.items + tuple(PricedLine.unpriced(item) for item in _new_items(tx, params))}
    return {}


def _check_quote(quote: Any, gross_minor: int, provider: str) -> None:
    if not isinstance(quote, Quote):
        raise ProtocolError(f"the driver returned {type(quote).__name__}, not a Quote", provider=provider)
    priced = sum(line.gross.amount_minor for line in quote.lines)
    if priced != gross_minor:
        raise ProtocolError(f"the provider priced a basket of {priced}, not the {gross_minor} sent",
                            provider=provider)


def _remote_effect(tx: Transaction, event: str, result: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot fields a provider's answer sets."""
    if event == "update":
        added = sum(line["unit_price"] * line["quantity"] for line in params["items"])
        _check_quote(result, tx.gross.amount_minor + added, tx.provider)
    elif not isinstance(result, Outcome):
        raise ProtocolError(f"the driver returned {type(result).__name__}, not an Outcome", provider=tx.provider)
    fields: dict[str, Any] = {}
    if isinstance(result, Quote):
        fields["items"] = result.lines
    if result.provider_ref is not None and result.provider_ref != tx.provider_ref:
        fields["provider_ref"] = result.provider_ref
    if result.receipt:
        fields["receipt"] = result.receipt
    if result.details:
        fields["details"] = {**tx.details, **result.details}
    return fields


def _batches(deliveries: Sequence[Delivery], capabilities: Mapping[str, Capabilities]) -> list[list[Delivery]]:
    groups: dict[tuple[str, str], list[list[Delivery]]] = {}
    for delivery in deliveries:
        size = capabilities[delivery.provider].delivery_batch  # claimed for configured providers only
        chunks = groups.setdefault((delivery.provider, delivery.kind), [[]])
        if len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].append(delivery)
    return [chunk for chunks in groups.values() for chunk in chunks if chunk]
