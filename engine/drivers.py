"""Provider drivers: the side effects of the lifecycle, written once, sans-IO.

A driver maps one lifecycle event onto its provider's HTTP API.  Every operation is a
generator (an ``Exchange``): it yields ``httpx.Request`` objects, receives the
``httpx.Response`` for each, and finally returns a ``Quote`` or ``Outcome``, or raises
``ProviderRejected`` (a definite "no") or ``ProtocolError`` (an answer we cannot trust,
so the outcome is unknown).  ``HttpDriver.run`` drives an exchange with a sync
``httpx.Client``, ``HttpDriver.arun`` with an ``httpx.AsyncClient``; the protocol code
is the same generator either way.  Transport failures (timeouts, refused or dropped
connections) are thrown into the generator, so a driver may retry a request it knows to
be safe; if it does not handle them they become ``OutcomeUnknown``.

The engine owns the lifecycle: it decides, claims the side effect durably, calls the
driver, and records the outcome.  A driver never touches the store or the clock, and
declares what it can do in ``Capabilities``:

- ``remote``: events that call the provider before the transition commits;
- ``local``: events the engine performs without a call (``begin_payment`` everywhere);
- ``deferred``: events whose commit enqueues deliveries (Rekonect's purchase submit)
  sent later by ``engine.deliver_pending()`` with ``delivery_schedule``;
- ``timers``: the provider's ``TimerPolicy`` (the POS may override it).

An event in neither ``remote`` nor ``local`` is unsupported: the engine raises
``UnsupportedOperation`` before any call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Generator, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import httpx

from .errors import OutcomeUnknown, ProtocolError, ProviderRejected, ValidationError
from .machine import EVENTS, TimerPolicy, TxEvent
from .models import Basket, LineItem, Outcome, Quote, Transaction
from .secret import Secret

T = TypeVar("T")
Exchange = Generator[httpx.Request, httpx.Response, T]

#: Retry delays for deferred deliveries: two quick retries near the purchase time,
#: then later in the day (Rekonect's guidance; a sane default for everyone).
DEFAULT_DELIVERY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(seconds=30),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=4),
)


def _events(value: Iterable[str]) -> frozenset[TxEvent]:
    names = frozenset(value)
    unknown = names - set(EVENTS)
    if unknown:
        raise ValueError(f"unknown lifecycle events: {sorted(unknown)}")
    return frozenset(TxEvent(name) for name in names)


def _payment_types(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _deferred(value: Mapping[str, Any]) -> Mapping[str, tuple[str, ...]]:
    return {event: tuple(kinds) for event, kinds in dict(value).items()}


@attrs.frozen
class Capabilities:
    remote: frozenset[TxEvent] = attrs.field(converter=_events)
    local: frozenset[TxEvent] = attrs.field(converter=_events, default=frozenset({"begin_payment"}))
    deferred: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_deferred)
    timers: TimerPolicy = attrs.field(factory=TimerPolicy)
    payment_types: frozenset[str] = attrs.field(
        default=frozenset({"SPLIT_PAYMENT"}), converter=_payment_types
    )
    delivery_schedule: tuple[timedelta, ...] = DEFAULT_DELIVERY_SCHEDULE
    #: how many queued deliveries one ``deliver`` exchange may carry (Forloy sync: 100)
    delivery_batch: int = 1
    #: remote events the provider does not make idempotent (a re-send may act twice:
    #: Cheers adds an update's lines again).  After a lost answer the engine asks the
    #: driver's ``reconcile`` first, re-sends blindly at most once, then parks the
    #: intent as needing attention instead of re-sending again.
    not_idempotent: frozenset[TxEvent] = attrs.field(default=frozenset(), converter=_events)

    def __attrs_post_init__(self) -> None:
        both = self.remote & self.local
        if both:
            raise ValueError(f"events both remote and local: {sorted(both)}")
        if not self.not_idempotent <= self.remote:
            raise ValueError(f"not_idempotent names events that are not remote: "
                             f"{sorted(self.not_idempotent - self.remote)}")
        stray = set(self.deferred) - self.supported
        if stray:
            raise ValueError(f"deferred deliveries for unsupported events: {sorted(stray)}")

    @property
    def supported(self) -> frozenset[TxEvent]:
        # ``expire`` is decided by the engine's clock; every provider supports it.
        return self.remote | self.local | {TxEvent.expire}

    def with_timers(self, timers: TimerPolicy | None) -> Capabilities:
        return self if timers is None else attrs.evolve(self, timers=timers)


@attrs.frozen
class PreviewRequest:
    """Everything a driver may need to price a basket.  The customer key is a Secret."""

    tx_id: str
    basket: Basket
    customer_token: Secret | None
    payment_type: str
    idempotency_key: str
    now: datetime


@attrs.frozen
class Delivery:
    """A queued, guaranteed delivery: the payload was built when the transition committed."""

    id: int
    tx_id: str
    provider: str
    kind: str
    payload: Mapping[str, Any]
    idempotency_key: str
    attempts: int = 0


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def choose_base_url(
    driver: str, environments: Mapping[str, str], base_url: str | None, environment: str | None
) -> str:
    """Where a driver talks: an explicit ``base_url``, or a named environment's documented host.

    There is no default: a till configured without either must not reach the provider's
    development host from production (or the reverse).
    """
    if environment is not None and environment not in environments:
        known = ", ".join(repr(name) for name in environments) or "none published"
        raise ValidationError(
            f"{driver}: unknown environment {environment!r} (documented: {known}); pass base_url= instead"
        )
    if base_url is None and environment is None:
        known = " or ".join(repr(name) for name in environments)
        hint = f" or environment={known}" if known else ""
        raise ValidationError(f"{driver} needs base_url={hint}: there is no default host")
    return check_base_url(base_url if base_url is not None else environments[environment])  # type: ignore[index]


def check_base_url(url: str) -> str:
    """TLS always, except towards this machine (sandboxes served on loopback)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return url.rstrip("/")
    raise ValidationError(f"base_url must be https:// (plain http only on loopback): {url!r}")


class ProviderDriver:
    """The interface the engine calls.  Subclass ``HttpDriver`` for an HTTP provider."""

    name: str
    capabilities: Capabilities
    #: the provider call behind each remote event and delivery kind, as the diagrams label
    #: it ("POST /v1/.../refund"); documentation only, never used to build requests
    calls: Mapping[str, str] = {}

    def preview(self, request: PreviewRequest) -> Exchange[Quote]:
        raise NotImplementedError

    def update(self, tx: Transaction, items: tuple[LineItem, ...], key: str) -> Exchange[Quote]:
        """Price ``items`` added to ``tx``; return the whole basket's new quote."""
        raise NotImplementedError

    def finalize(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        raise NotImplementedError

    def cancel(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        raise NotImplementedError

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        raise NotImplementedError

    def reconcile(self, tx: Transaction, event: str, key: str,
                  items: tuple[LineItem, ...]) -> Exchange[Quote | Outcome | None]:
        """Learn, without acting, whether an in-doubt call of ``event`` took effect.

        The engine calls it before it would re-send an event in
        ``capabilities.not_idempotent`` (``tx`` is the snapshot before that call,
        ``key`` its idempotency key, ``items`` the lines an update added).  Return what
        the call itself would have returned (a ``Quote`` of the whole basket for an
        update) when the provider's answer shows the call was applied exactly once: the
        engine commits it.  Return None when it cannot tell: the engine then re-sends
        at most once, and after that parks the transaction for an operator.  It must
        not change anything at the provider.  The default asks nothing and returns None.
        """
        return None
        yield  # a generator that makes no request

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        """Build a deferred delivery's payload at commit time (JSON-safe, no secrets)."""
        raise NotImplementedError

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[Mapping[int, ProviderRejected] | None]:
        """Send up to ``capabilities.delivery_batch`` queued deliveries of one kind.

        Return None when all were accepted; a batch the provider accepts in part returns
        ``{delivery.id: ProviderRejected}`` for the refused ones (they are parked as dead,
        the rest marked delivered).  Raise to fail the whole batch.
        """
        raise NotImplementedError

    def run(self, exchange: Exchange[T], first: httpx.Request | None = None) -> T:
        """Drive ``exchange`` to its result; ``first`` is its first request if already built."""
        raise NotImplementedError

    async def arun(self, exchange: Exchange[T], first: httpx.Request | None = None) -> T:
        raise NotImplementedError


class HttpDriver(ProviderDriver):
    """Runs exchanges over httpx.  Subclasses write the protocol as generators.

    ``transport`` / ``async_transport`` let tests (and the demo) plug a sandbox in
    without a network: ``sandbox.transport()`` serves both clients in-process.
    """

    #: The provider's documented hosts by environment ("sandbox", "production").
    environments: Mapping[str, str] = {}
    timeout = httpx.Timeout(10.0, connect=5.0)
    #: One overall deadline per provider call, in seconds: connect, writes, reads, the
    #: body and the driver's own retries together.  httpx's timeouts are per read, so a
    #: body dribbled a byte at a time would otherwise never end.  A provider's policy is
    #: this class attribute; the POS overrides it with ``deadline=``.  The engine derives
    #: the intent lease from it (always longer), so a live call is never taken over.
    call_deadline: float = 30.0

    def __init__(
        self,
        *,
        base_url: str | None = None,
        environment: str | None = None,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | httpx.Timeout | None = None,
        deadline: float | None = None,
    ) -> None:
        if deadline is not None:
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline <= 3600:
                raise ValidationError("deadline is a number of seconds, more than 0 and at most 3600")
            self.call_deadline = float(deadline)
        self.base_url = choose_base_url(type(self).__name__, self.environments, base_url, environment)
        self.environment = environment
        if timeout is not None:
            self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._transport = transport
        # A MockTransport serves both kinds of client; use it for async too by default.
        self._async_transport = async_transport or (
            transport if isinstance(transport, httpx.AsyncBaseTransport) else None
        )
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        where = f"environment={self.environment!r}, " if self.environment else ""
        return f"{type(self).__name__}({where}base_url={self.base_url!r})"

    # --- helpers for subclasses ---

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Request:
        return httpx.Request(
            method, f"{self.base_url}{path}", json=json, headers=headers, params=params
        )

    def unknown(self, message: str) -> ProtocolError:
        return ProtocolError(message, provider=self.name)

    def rejected(self, code: str, message: str, retry_after: float | None = None) -> ProviderRejected:
        return ProviderRejected(message, code=str(code), retry_after=retry_after, provider=self.name)

    def json_of(self, response: httpx.Response) -> Any:
        """The body as JSON, or ``ProtocolError``: HTML error pages, truncated JSON."""
        try:
            return response.json()
        except ValueError:
            raise self.unknown(
                f"HTTP {response.status_code} with a body that is not JSON"
                f" ({response.headers.get('content-type', 'no content type')})"
            ) from None

    # --- running exchanges ---

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(transport=self._transport, timeout=self.timeout)
        return self._client

    def _async_client(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(transport=self._async_transport, timeout=self.timeout)
        return self._aclient

    def _transport_failure(self, request: httpx.Request, error: httpx.TransportError) -> OutcomeUnknown:
        # The path only: queries and headers may carry credentials.
        return OutcomeUnknown(
            f"{request.method} {request.url.path} failed: {type(error).__name__}",
            provider=self.name,
        )

    def _advance(self, exchange: Exchange[T], answer: httpx.Response | OutcomeUnknown) -> httpx.Request:
        """Feed one answer (or transport failure) to the exchange; get its next request."""
        try:
            if isinstance(answer, OutcomeUnknown):
                return exchange.throw(answer)
            return exchange.send(answer)
        except ValidationError as late:
            # A request already went out: refusing now cannot undo what the provider did.
            raise self.unknown(f"the driver gave up after sending a request: {late.detail}") from None

    def _past_deadline(self, request: httpx.Request) -> OutcomeUnknown:
        return OutcomeUnknown(
            f"{request.method} {request.url.path} ran past the {self.call_deadline:g} s call deadline",
            provider=self.name,
        )

    def _bounded(self, request: httpx.Request, remaining: float) -> httpx.Request:
        """No single connect, write or read may outlast what is left of the deadline."""
        per_call = self.timeout if isinstance(self.timeout, httpx.Timeout) else httpx.Timeout(self.timeout)
        def cap(value: float | None) -> float:
            return remaining if value is None else min(value, remaining)
        request.extensions["timeout"] = httpx.Timeout(
            connect=cap(per_call.connect), read=cap(per_call.read), write=cap(per_call.write),
            pool=cap(per_call.pool),
        ).as_dict()
        return request

    def _read_within(self, response: httpx.Response, deadline: float, request: httpx.Request) -> httpx.Response:
        """The whole body, chunk by chunk, checking the deadline after each one."""
        try:
            response.content  # noqa: B018 - already read (an in-process transport)
            return response
        except httpx.ResponseNotRead:
            pass
        body = bytearray()
        try:
            for chunk in response.iter_raw():
                body += chunk
                if time.monotonic() >= deadline:
                    raise self._past_deadline(request)
        finally:
            response.close()
        return _complete(response, bytes(body))

    def run(self, exchange: Exchange[T], first: httpx.Request | None = None) -> T:
        """Drive ``exchange`` within ``call_deadline`` (monotonic time).

        The body is streamed and the deadline checked after every chunk, and each blocking
        read is capped at what was left when the request went out, so a dribbled answer
        ends within one such read of the deadline.  Past it: ``OutcomeUnknown``.
        """
        client = self._sync_client()
        deadline = time.monotonic() + self.call_deadline
        try:
            request = first if first is not None else next(exchange)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._past_deadline(request)
                try:
                    response = self._read_within(
                        client.send(self._bounded(request, remaining), stream=True), deadline, request)
                except httpx.TransportError as error:
                    if time.monotonic() >= deadline:
                        raise self._past_deadline(request) from None
                    request = self._advance(exchange, self._transport_failure(request, error))
                else:
                    request = self._advance(exchange, response)
        except StopIteration as stop:
            result: T = stop.value  # what the exchange returned
            return result
        finally:
            exchange.close()

    async def arun(self, exchange: Exchange[T], first: httpx.Request | None = None) -> T:
        """Drive ``exchange`` within ``call_deadline``: the whole call, retries included,
        runs under one ``asyncio.timeout``, which cancels even a read in progress."""
        client = self._async_client()
        request = first
        try:
            async with asyncio.timeout(self.call_deadline):
                request = first if first is not None else next(exchange)
                while True:
                    try:
                        response = await client.send(request)
                    except httpx.TransportError as error:
                        request = self._advance(exchange, self._transport_failure(request, error))
                    else:
                        request = self._advance(exchange, response)
        except StopIteration as stop:
            result: T = stop.value  # what the exchange returned
            return result
        except TimeoutError:
            if request is None:
                raise
            raise self._past_deadline(request) from None
        finally:
            exchange.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None


def _complete(streamed: httpx.Response, body: bytes) -> httpx.Response:
    """A streamed response, rebuilt with its body read (decoded as httpx would)."""
    return httpx.Response(
        streamed.status_code, headers=streamed.headers, content=body,
        request=streamed.request, extensions=streamed.extensions,
    )
