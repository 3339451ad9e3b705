"""The toolkit every provider sandbox is built on.

A sandbox is a faithful simulator of one provider's HTTP API: real wallets, discount
rules, one-time keys, idempotency replay, deadlines on its own clock, and switchable
faults.  Its business logic is written once, as plain handlers over ``SandboxRequest``
and ``SandboxResponse``; three adapters put it on the wire:

- ``sandbox.transport()``: an ``httpx.MockTransport`` for sync and async clients,
  in-process (the handler runs in the caller's thread);
- ``sandbox`` itself is an ASGI application: ``httpx.ASGITransport(app=sandbox)`` in
  process, or ``serve(sandbox)`` for a real uvicorn server on a loopback port;
- ``txengine sandbox serve NAME`` serves one from the command line.

Faults are injected per operation (the route's name) and fire for the next N matching
requests: ``sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)``.

For a newcomer every sandbox also offers ``seed_demo()`` (demo customers),
``credentials()`` (what a driver needs to log in) and ``issue_customer()`` (a new
customer token, also over HTTP: ``POST /_sandbox/customers``), and logs every request to
the stdlib logger ``txengine.sandbox`` (method, path, status, duration; secrets masked).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import time
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
import httpx

from txengine.clock import Clock, SystemClock

__all__ = [
    "ADMIN_CUSTOMERS", "BEFORE_COMMIT_FAULTS", "BadRequest", "FAULT_HEADER", "Fault", "GARBAGE_FAULTS", "Faults", "RecordingTransport", "Sandbox", "SandboxRequest", "SandboxResponse",
    "REQUEST_LOG", "ServedSandbox", "route", "serve",
]


class Fault(enum.Enum):
    """What can go wrong between a POS and its provider.

    ``*_BEFORE_COMMIT``: the provider did nothing; ``*_AFTER_COMMIT``: it acted, and the
    answer is lost or spoiled.  The spoiled answers (``GARBAGE_FAULTS``) are made from the
    sandbox's own answer (``txengine.testing.garbage``), so they fit every provider.
    """

    TIMEOUT_BEFORE_COMMIT = "timeout_before_commit"  # request lost: nothing happened
    TIMEOUT_AFTER_COMMIT = "timeout_after_commit"  # provider committed, answer lost
    SERVER_ERROR = "server_error"  # 503 before doing anything
    SERVER_ERROR_AFTER_COMMIT = "server_error_after_commit"  # committed, then answered 503
    GARBAGE_AFTER_COMMIT = "garbage_after_commit"  # committed, answered an HTML page
    TRUNCATED_AFTER_COMMIT = "truncated_after_commit"  # committed, JSON cut in half
    DROP_CONNECTION = "drop_connection"  # connection closed before any answer
    SLOW = "slow"  # answers correctly, after ``delay`` seconds (over a real socket)
    # 2xx answers that are not the documented success, before the provider acted
    EMPTY_BEFORE_COMMIT = "empty_before_commit"  # HTTP 200, empty body
    EMPTY_OBJECT_BEFORE_COMMIT = "empty_object_before_commit"  # HTTP 200, {}
    ERROR_SHAPED_BEFORE_COMMIT = "error_shaped_before_commit"  # HTTP 200, the provider's error shape
    HTML_BEFORE_COMMIT = "html_before_commit"  # HTTP 200, an HTML page
    # the provider acted; its real answer, spoiled
    EMPTY_AFTER_COMMIT = "empty_after_commit"
    EMPTY_OBJECT_AFTER_COMMIT = "empty_object_after_commit"
    ERROR_SHAPED_AFTER_COMMIT = "error_shaped_after_commit"
    WRONG_TYPES_AFTER_COMMIT = "wrong_types_after_commit"  # numbers sent as strings
    WRONG_IDS_AFTER_COMMIT = "wrong_ids_after_commit"  # another transaction's ids
    WRONG_TOTALS_AFTER_COMMIT = "wrong_totals_after_commit"  # every amount off by one
    HUGE_AFTER_COMMIT = "huge_after_commit"  # the answer padded to several megabytes

    @property
    def before_commit(self) -> bool:
        return self in BEFORE_COMMIT_FAULTS


#: faults where the provider never acts
BEFORE_COMMIT_FAULTS = frozenset({
    Fault.TIMEOUT_BEFORE_COMMIT, Fault.SERVER_ERROR, Fault.DROP_CONNECTION, Fault.EMPTY_BEFORE_COMMIT,
    Fault.EMPTY_OBJECT_BEFORE_COMMIT, Fault.ERROR_SHAPED_BEFORE_COMMIT, Fault.HTML_BEFORE_COMMIT,
})
#: spoiled answers: what the conformance check sends before and after the provider acts
GARBAGE_FAULTS = (
    Fault.EMPTY_BEFORE_COMMIT, Fault.EMPTY_OBJECT_BEFORE_COMMIT, Fault.ERROR_SHAPED_BEFORE_COMMIT,
    Fault.HTML_BEFORE_COMMIT, Fault.EMPTY_AFTER_COMMIT, Fault.EMPTY_OBJECT_AFTER_COMMIT,
    Fault.ERROR_SHAPED_AFTER_COMMIT, Fault.WRONG_TYPES_AFTER_COMMIT, Fault.WRONG_IDS_AFTER_COMMIT,
    Fault.WRONG_TOTALS_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT, Fault.GARBAGE_AFTER_COMMIT,
    Fault.HUGE_AFTER_COMMIT,
)


@attrs.define
class _Armed:
    fault: Fault
    remaining: int
    delay: float


class Faults:
    """Armed faults, keyed by operation name; thread-safe."""

    def __init__(self) -> None:
        self._armed: dict[str, list[_Armed]] = {}
        self._lock = threading.Lock()
        self.fired: list[tuple[str, Fault]] = []

    def inject(self, operation: str, fault: Fault, times: int = 1, delay: float = 0.0) -> None:
        with self._lock:
            self._armed.setdefault(operation, []).append(_Armed(fault, times, delay))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def take(self, operation: str) -> _Armed | None:
        with self._lock:
            queue = self._armed.get(operation) or self._armed.get("*")
            if not queue:
                return None
            armed = queue[0]
            armed.remaining -= 1
            if armed.remaining <= 0:
                queue.pop(0)
            self.fired.append((operation, armed.fault))
            return armed


@attrs.frozen
class SandboxRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    query: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            raise BadRequest("body is not valid JSON") from None


@attrs.frozen
class SandboxResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> SandboxResponse:
        extra = tuple((headers or {}).items())
        return cls(status, json.dumps(payload).encode(), (("content-type", "application/json"),) + extra)


class BadRequest(Exception):
    """Raised by handlers for malformed input; the sandbox answers with its error shape."""

    def __init__(self, message: str, status: int = 400, code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _html(status: int, text: str) -> SandboxResponse:
    return SandboxResponse(status, f"<html><body>{text}</body></html>".encode(), (("content-type", "text/html"),))


_SPOILED_BEFORE = frozenset({Fault.EMPTY_BEFORE_COMMIT, Fault.EMPTY_OBJECT_BEFORE_COMMIT,
                             Fault.ERROR_SHAPED_BEFORE_COMMIT, Fault.HTML_BEFORE_COMMIT})


class _TimeoutFault(Exception):
    pass


class _DropFault(Exception):
    pass


Handler = Callable[..., SandboxResponse]

#: the request log: one INFO line per request (``sandbox METHOD path -> status in N ms``)
REQUEST_LOG = logging.getLogger("txengine.sandbox")
#: the header an in-process answer carries when a fault shaped it (tests read it; drivers must not)
FAULT_HEADER = "x-sandbox-fault"
#: the admin endpoint that enrols a new customer (relative to the sandbox's base URL)
ADMIN_CUSTOMERS = "/_sandbox/customers"
#: names whose values the log never shows (query parameters, issued customer fields)
_SECRET_NAME = re.compile(r"key|token|secret|password|qr|auth|card|pin", re.IGNORECASE)


def route(method: str, pattern: str, name: str):
    """Declare a handler: ``pattern`` uses ``{param}`` placeholders for path segments."""
    regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

    def mark(function: Handler) -> Handler:
        function.route = (method.upper(), regex, name)
        return function

    return mark


class Sandbox:
    """Base class: subclasses declare ``@route`` handlers and an ``error`` shape."""

    name = "sandbox"
    #: the host the real provider uses, for in-process base URLs
    host = "sandbox.invalid"

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.faults = Faults()
        self.lock = threading.RLock()
        self.requests: list[SandboxRequest] = []
        self._issued_secrets: set[str] = set()
        self._routes = [
            getattr(self, attr).route
            + (getattr(self, attr),)
            for attr in dir(type(self))
            if hasattr(getattr(type(self), attr), "route")
        ]

    @property
    def base_url(self) -> str:
        """The URL a driver uses to reach this sandbox in-process."""
        return f"https://{self.host}"

    # --- for a newcomer: demo customers, credentials, new customers on demand ---

    def seed_demo(self) -> list[dict[str, str]]:
        """Enrol the demo customers and describe each (``{"customer": token, ...}``: what a
        till scans or types, plus whatever helps a person pick one, e.g. its balance)."""
        raise NotImplementedError(f"the {self.name} sandbox has no demo customers")

    def credentials(self) -> dict[str, str]:
        """What a driver needs to talk to this sandbox (API key, client id and secret...)."""
        raise NotImplementedError(f"the {self.name} sandbox does not describe its credentials")

    def issue_customer(self) -> dict[str, str]:
        """Enrol one new customer (with a funded wallet where the provider has wallets) and
        return its token as ``{"customer": token, ...}``; ``POST /_sandbox/customers`` calls it."""
        raise NotImplementedError(f"the {self.name} sandbox cannot issue customers on demand")

    def secret_values(self) -> set[str]:
        """Strings the request log must never show (credentials and issued customer tokens)."""
        try:
            values = set(self.credentials().values())
        except NotImplementedError:
            values = set()
        return values | self._issued_secrets

    # --- to be shaped by each provider ---

    def error(self, status: int, code: str, message: str, **extra: Any) -> SandboxResponse:
        return SandboxResponse.json(status, {"error": {"code": code, "message": message}, **extra})

    def not_found(self, request: SandboxRequest) -> SandboxResponse:
        return self.error(404, "NOT_FOUND", f"no route for {request.method} {request.path}")

    def authorize(self, request: SandboxRequest, operation: str) -> SandboxResponse | None:
        """Return an error response when the request's credentials are not accepted."""
        return None

    # --- the pure core: one request in, one response out (or a simulated fault) ---

    def handle(self, request: SandboxRequest) -> tuple[SandboxResponse, _Armed | None]:
        """One request in, one response out, logged to ``txengine.sandbox`` (secrets masked)."""
        started = time.perf_counter()
        outcome = "error"
        try:
            response, armed = self._dispatch(request)
            outcome = str(response.status)
            return response, armed
        except _TimeoutFault:
            outcome = "timeout (simulated)"
            raise
        except _DropFault:
            outcome = "dropped (simulated)"
            raise
        finally:
            REQUEST_LOG.info("%s %s %s %s -> %s in %.1f ms", self.name, request.method,
                             self.masked(request.path), self._masked_query(request.query), outcome,
                             (time.perf_counter() - started) * 1000)

    def masked(self, text: str) -> str:
        """``text`` with every secret this sandbox knows replaced by ``***``."""
        for secret in sorted(self.secret_values(), key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _masked_query(self, query: dict[str, str]) -> str:
        if not query:
            return ""
        shown = {name: "***" if _SECRET_NAME.search(name) else self.masked(value) for name, value in query.items()}
        return "?" + "&".join(f"{name}={value}" for name, value in shown.items())

    def _admin(self, request: SandboxRequest) -> SandboxResponse | None:
        """The sandbox's own admin endpoints (not the provider's API): ``POST /_sandbox/customers``."""
        if not request.path.endswith(ADMIN_CUSTOMERS):
            return None
        if request.method != "POST":
            return SandboxResponse.json(405, {"error": {"code": "METHOD_NOT_ALLOWED",
                                                        "message": f"use POST {ADMIN_CUSTOMERS}"}})
        try:
            with self.lock:
                customer = self.issue_customer()
        except NotImplementedError as missing:
            return SandboxResponse.json(404, {"error": {"code": "NOT_OFFERED", "message": str(missing)}})
        self._issued_secrets.update(value for name, value in customer.items() if _SECRET_NAME.search(name)
                                    or name == "customer")
        return SandboxResponse.json(201, customer)

    def _dispatch(self, request: SandboxRequest) -> tuple[SandboxResponse, _Armed | None]:
        admin = self._admin(request)
        if admin is not None:
            return admin, None
        for method, regex, operation, handler in self._routes:
            match = regex.match(request.path)
            if match and method == request.method:
                break
        else:
            return self.not_found(request), None
        with self.lock:
            self.requests.append(request)
        armed = self.faults.take(operation)
        fault = armed.fault if armed else None
        if fault is Fault.TIMEOUT_BEFORE_COMMIT:
            raise _TimeoutFault(operation)
        if fault is Fault.DROP_CONNECTION:
            raise _DropFault(operation)
        if fault is Fault.SERVER_ERROR:
            return _html(503, "503 Service Unavailable"), armed
        if fault in _SPOILED_BEFORE:
            return self._spoiled(fault, None), armed
        refused = self.authorize(request, operation)
        if refused is not None:
            return refused, armed
        try:
            with self.lock:
                response = handler(request, **match.groupdict())
        except BadRequest as bad:
            response = self.error(bad.status, bad.code, str(bad))
        if fault is Fault.TIMEOUT_AFTER_COMMIT:
            raise _TimeoutFault(operation)
        if fault is Fault.SERVER_ERROR_AFTER_COMMIT:
            return _html(503, "503 Service Unavailable"), armed
        if fault is not None and fault not in (Fault.SLOW,) and not fault.before_commit:
            return self._spoiled(fault, response), armed
        return response, armed

    def _spoiled(self, fault: Fault, real: SandboxResponse | None) -> SandboxResponse:
        """The answer ``fault`` puts in place of ``real`` (None: the provider did not act)."""
        from . import garbage

        if fault in (Fault.EMPTY_BEFORE_COMMIT, Fault.EMPTY_AFTER_COMMIT):
            return SandboxResponse(200, b"", (("content-type", "application/json"),))
        if fault in (Fault.EMPTY_OBJECT_BEFORE_COMMIT, Fault.EMPTY_OBJECT_AFTER_COMMIT):
            return SandboxResponse.json(200, {})
        if fault in (Fault.ERROR_SHAPED_BEFORE_COMMIT, Fault.ERROR_SHAPED_AFTER_COMMIT):
            shaped = self.error(503, "MAINTENANCE", "down for maintenance")
            return SandboxResponse(200, shaped.body, shaped.headers)
        if fault in (Fault.HTML_BEFORE_COMMIT, Fault.GARBAGE_AFTER_COMMIT):
            return _html(200, "Bad Gateway")
        assert real is not None
        if fault is Fault.TRUNCATED_AFTER_COMMIT:
            return SandboxResponse(real.status, real.body[: len(real.body) // 2], real.headers)
        spoil = {Fault.WRONG_TYPES_AFTER_COMMIT: garbage.wrong_types, Fault.WRONG_IDS_AFTER_COMMIT: garbage.wrong_ids,
                 Fault.WRONG_TOTALS_AFTER_COMMIT: garbage.wrong_totals, Fault.HUGE_AFTER_COMMIT: garbage.huge}[fault]
        return SandboxResponse(real.status, garbage.respoil(real.body, spoil), real.headers)

    # --- adapter 1: httpx.MockTransport (sync and async clients, in-process) ---

    def _handle_httpx(self, request: httpx.Request) -> httpx.Response:
        incoming = SandboxRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            query=dict(request.url.params.multi_items()),
            body=request.read(),
        )
        try:
            response, armed = self.handle(incoming)
        except _TimeoutFault:
            raise httpx.ReadTimeout("sandbox: simulated timeout", request=request) from None
        except _DropFault:
            raise httpx.RemoteProtocolError(
                "sandbox: server disconnected without sending a response", request=request
            ) from None
        headers = list(response.headers)
        if armed is not None:  # in-process only: lets the test transport tell a spoiled answer
            headers.append((FAULT_HEADER, armed.fault.value))
        return httpx.Response(response.status, headers=headers, content=response.body)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle_httpx)

    def recording_transport(self) -> RecordingTransport:
        """``transport()``, keeping every request and the answer each one got."""
        return RecordingTransport(self.transport())

    def asgi_transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self)

    # --- adapter 2: ASGI (served by uvicorn, or through httpx.ASGITransport) ---

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        incoming = SandboxRequest(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            query=dict(parse_qsl(scope.get("query_string", b"").decode())),
            body=body,
        )
        try:
            # Handlers are quick and synchronous; a thread keeps the loop responsive.
            response, armed = await asyncio.to_thread(self.handle, incoming)
        except _TimeoutFault:
            # Over a real socket a lost answer is an answer that never comes: hold the
            # request until the client gives up (bounded, so the server can stop).
            await asyncio.sleep(30)
            return
        except _DropFault:
            raise ConnectionAbortedError("sandbox: simulated dropped connection") from None
        if armed is not None and armed.fault is Fault.SLOW:
            await asyncio.sleep(armed.delay)
        await send({
            "type": "http.response.start",
            "status": response.status,
            "headers": [(k.encode(), v.encode()) for k, v in response.headers],
        })
        await send({"type": "http.response.body", "body": response.body})


class RecordingTransport(httpx.MockTransport):
    """An in-process transport that keeps what crossed it, for tests that assert the wire.

    ``requests`` holds every request sent (even one a fault swallowed); ``exchanges``
    the ``(request, response)`` pairs that got an answer.
    """

    def __init__(self, inner: httpx.MockTransport) -> None:
        self.requests: list[httpx.Request] = []
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            response = inner.handle_request(request)
            response.read()
            self.exchanges.append((request, response))
            return response

        super().__init__(handler)

    @property
    def last(self) -> tuple[httpx.Request, httpx.Response]:
        return self.exchanges[-1]

    def sent(self, path_end: str) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path.endswith(path_end)]


# --- adapter 3: a real server on loopback -------------------------------------------------


@attrs.define
class ServedSandbox:
    sandbox: Sandbox
    host: str
    port: int
    server: Any
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        # keep the sandbox's own path prefix (Forloy lives under /api/v1)
        return f"http://{self.host}:{self.port}{urlsplit(self.sandbox.base_url).path.rstrip('/')}"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0) -> Iterator[ServedSandbox]:
    """Serve ``sandbox`` with uvicorn on a loopback port for the duration of the block."""
    import uvicorn

    from txengine.drivers import is_loopback

    if not is_loopback(host):
        raise ValueError("sandboxes are only ever served on loopback")
    port = port or _free_port(host)
    config = uvicorn.Config(sandbox, host=host, port=port, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"sandbox-{sandbox.name}", daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(500):  # up to 5 s for the socket to listen
        if server.started:
            started.set()
            break
        thread.join(0.01)
    if not started.is_set():
        server.should_exit = True
        raise RuntimeError(f"sandbox {sandbox.name} did not start on {host}:{port}")
    try:
        yield ServedSandbox(sandbox, host, port, server, thread)
    finally:
        server.should_exit = True
        thread.join(5)
