"""Conformance checks for a driver: does it tell the truth, and is it safe to retry?

``check_driver(harness)`` runs short, deterministic scenarios against the harness's
sandbox through a real engine and returns what it found (``[]``: conformant);
``assert_conformant(harness)`` fails a test with the list.  Three families:

``capabilities``
    every event the driver declares remote works on the happy path (a declared event
    the driver cannot do is a lie the POS finds at the till); every event it declares
    local makes no provider call through the engine, and the driver's own method for
    it, if any, sends nothing (else the engine would skip a call the provider needs);
    every deferred delivery it declares is delivered.
``exactly-once``
    each remote event (and each deferred delivery) is hit by a fault before the provider
    acts and after it (answer lost, 5xx, dropped, and the garbage set: empty, ``{}``,
    error-shaped 2xx, wrong types, wrong ids, wrong totals, truncated, HTML, huge), then
    retried as a POS would (the same command, then ``recover()``).  Judged against the
    sandbox's ledger: one commit, not two; none reported as a failure; no success reported
    without one; and what the engine records equals what a clean run records (a driver
    that takes a spoiled answer for a success records wrong money).
``double-send``
    counted at the transport: no attempt sends the same non-GET request twice (a
    provider that replays by key hides it from the ledger, not from the wire), and an
    event declared remote sends at least one request.
``idempotency-key``
    the retry must carry the same idempotency key as the first attempt, request by
    request (a driver that mints a fresh key per attempt turns every retry into a new
    charge at a provider that de-duplicates by key).

Errors that are not the contract's (a bare ``NotImplementedError`` reaching the POS)
are reported under ``errors``.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta
from typing import Any

import attrs
import httpx

from ..clock import FakeClock
from ..engine import Engine
from ..errors import EngineError
from ..models import Transaction
from .harness import ProviderHarness, SandboxTransport, StoreFactory, StoreOption, as_store_factory
from .oracle import TARGETS

from .sandbox import GARBAGE_FAULTS, Fault

AFTER_COMMIT_FAULTS: tuple[Fault, ...] = (
    Fault.TIMEOUT_AFTER_COMMIT, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT)
#: what ``check_driver`` injects by default: every way an answer is lost, refused or spoiled,
#: before the provider acts and after.  Not ``ERROR_SHAPED_AFTER_COMMIT``: a provider's own
#: error answer is trusted as a refusal by contract, so "committed, then said error" is a
#: provider lying, not a driver's fault; before the commit it still must not pass for a success.
DEFAULT_FAULTS: tuple[Fault, ...] = (
    Fault.TIMEOUT_BEFORE_COMMIT, Fault.SERVER_ERROR, Fault.DROP_CONNECTION,
    Fault.TIMEOUT_AFTER_COMMIT, Fault.SERVER_ERROR_AFTER_COMMIT,
    *(fault for fault in GARBAGE_FAULTS if fault is not Fault.ERROR_SHAPED_AFTER_COMMIT),
)

CONFORMANCE_KEY = "conformance-key"
#: retries of a command, then rounds of recover(), before a scenario gives up
RETRIES = 4


@attrs.frozen
class Finding:
    """One way the driver breaks the contract."""

    check: str  # capabilities, exactly-once, idempotency-key, errors
    event: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.event}: {self.detail}"


class _Failed(Exception):
    def __init__(self, *findings: Finding) -> None:
        super().__init__("; ".join(map(str, findings)))
        self.findings = findings
        self.finding = findings[0]


class _World:
    """A sandbox, its driver and an engine on a fresh store: one scenario's universe."""

    def __init__(self, harness: ProviderHarness, store: StoreFactory) -> None:
        self.harness, self.store = harness, store
        self.clock = FakeClock()
        self.sandbox = harness.make_sandbox(self.clock)
        self.transport = SandboxTransport(self.sandbox)
        self.driver = harness.make_driver(self.sandbox, transport=self.transport, clock=self.clock)
        self.capabilities = self.driver.capabilities
        self.url = store.new_url()
        self._preview_token: str | None = None  # one customer key for a preview and its retries
        self.engine = Engine.open(self.url, providers={harness.provider: self.driver}, clock=self.clock,
                                  rng=random.Random(0), delivery_concurrency=1, **harness.engine_options())

    def close(self) -> None:
        self.engine.close()
        self.store.dispose(self.url)

    # --- running events -------------------------------------------------------------------------

    def attempt(self, event: str, action) -> Any:
        """Run an engine call: its result or its EngineError; anything else is a finding."""
        try:
            return action()
        except EngineError as error:
            return error
        except Exception as error:
            raise _Failed(Finding("errors", event, f"the engine raised a bare {type(error).__name__}"
                                                   f" (every error must be an EngineError): {error!r}")) from error

    def preview(self, *, want_outstanding: bool = False) -> Any:
        """A happy-path preview: the first customer whose preview succeeds (and, if asked,
        leaves something outstanding, which begin_payment needs)."""
        wallets: list[str | None] = list(self.harness.wallet_labels)
        if self.harness.anonymous:
            wallets.append(None)
        result: Any = None
        for label in wallets:
            token = self.harness.customer_token(self.sandbox, label) if label is not None else None
            result = self.attempt("preview", lambda: self.engine.preview(
                self.harness.provider, self.harness.example_basket(), customer_token=token,
                idempotency_key=f"{CONFORMANCE_KEY}-{label}-{len(self.sandbox.requests)}"))
            if isinstance(result, Transaction) and (result.outstanding.amount_minor > 0 or not want_outstanding):
                return result
        return result

    def command(self, event: str, tx: Transaction) -> Any:
        if event == "update":
            return self.attempt(event, lambda: self.engine.update(tx.id, self.harness.example_items()))
        if event == "refund":
            return self.attempt(event, lambda: self.engine.refund(tx.id, comment="conformance check"))
        return self.attempt(event, lambda: getattr(self.engine, event)(tx.id))

    def ready_for(self, event: str) -> Transaction | None:
        """A transaction ``event`` is legal on (None for preview itself); findings if the way there fails."""
        if event == "preview":
            return None
        tx = self.preview(want_outstanding=event == "begin_payment")
        if not isinstance(tx, Transaction):
            raise _Failed(Finding("capabilities", "preview", f"the happy-path preview failed: {tx!r}"))
        if event == "refund":
            tx = self.command("finalize", tx)
            if not isinstance(tx, Transaction):
                raise _Failed(Finding("capabilities", "finalize", f"the happy-path finalize failed: {tx!r}"))
        return tx

    def run(self, event: str, tx: Transaction | None, *, key: str = CONFORMANCE_KEY) -> Any:
        if event == "preview":
            wallet = self.harness.wallet_labels[0] if self.harness.wallet_labels else None
            if self._preview_token is None and wallet is not None:
                self._preview_token = self.harness.customer_token(self.sandbox, wallet)
            token = self._preview_token
            return self.attempt(event, lambda: self.engine.preview(
                self.harness.provider, self.harness.example_basket(), customer_token=token, idempotency_key=key))
        return self.command(event, tx)

    def load(self, tx_id: str) -> Transaction:
        return self.engine.store.load(tx_id)


def _scenario(harness: ProviderHarness, store: StoreFactory, findings: list[Finding], body) -> None:
    """Run one scenario in a fresh world; add what it finds (one finding per check and event)."""
    world = _World(harness, store)
    try:
        body(world)
    except _Failed as failed:
        seen = {(finding.check, finding.event) for finding in findings}
        findings.extend(finding for finding in failed.findings if (finding.check, finding.event) not in seen)
    finally:
        world.close()


# --- capabilities ----------------------------------------------------------------------------------


def _check_remote(event: str):
    def body(world: _World) -> None:
        tx = world.ready_for(event)
        start = len(world.transport.sent)
        try:
            result = world.run(event, tx)
        except _Failed as failed:  # a bare error: the driver cannot do what it declares
            raise _Failed(Finding("capabilities", event, f"declared remote, but {failed.finding.detail}")) from None
        sent = world.transport.sent[start:]
        target = TARGETS[event]["new" if tx is None else tx.state]
        if not isinstance(result, Transaction) or result.state != target:
            raise _Failed(Finding("capabilities", event, f"declared remote, but on the happy path it answered"
                                                         f" {result!r}"))
        if not sent:
            raise _Failed(Finding("double-send", event, "declared remote, but it sent no request: the engine"
                                                        " records a provider step that never happened"))
        twice = _sent_twice(world.harness, sent, world.transport.statuses)
        if twice:
            raise _Failed(Finding("double-send", event, f"one attempt sent {twice} twice"))

    return body


def _local_call(driver: Any, event: str, tx: Transaction, items: list) -> httpx.Request | None:
    """The first request the driver's own method for ``event`` would send, if it has one."""
    method = getattr(driver, event, None)
    if method is None:
        return None
    args = {"update": (tx, tuple(items), CONFORMANCE_KEY), "refund": (tx, CONFORMANCE_KEY, None)}.get(
        event, (tx, CONFORMANCE_KEY))
    try:
        exchange = method(*args)
        first = next(exchange) if hasattr(exchange, "__next__") else None
    except Exception:  # NotImplementedError, ValidationError, StopIteration: it sends nothing
        return None
    return first if isinstance(first, httpx.Request) else None


def _check_local(event: str):
    def body(world: _World) -> None:
        tx = world.ready_for(event)
        # A local event whose provider call goes out later as a declared delivery (Forloy
        # offline) is honest; one with no delivery would never reach the provider.
        deferred = world.capabilities.deferred.get(event)
        request = None if deferred else _local_call(world.driver, event, tx, world.harness.example_items())
        if request is not None:
            raise _Failed(Finding("capabilities", event, f"declared local, but the driver's {event} sends"
                                                         f" {request.method} {request.url.path}: the engine"
                                                         " will never send it"))
        calls = len(world.sandbox.requests)
        result = world.command(event, tx)
        made = world.sandbox.requests[calls:]
        if made:
            raise _Failed(Finding("capabilities", event, "declared local, but the engine's " + event + " made"
                                  f" provider calls: {', '.join(f'{r.method} {r.path}' for r in made)}"))
        if not isinstance(result, Transaction):
            raise _Failed(Finding("capabilities", event, f"declared local, but on the happy path it answered"
                                                         f" {result!r}"))

    return body


def _reach_deferred(world: _World, event: str) -> Transaction:
    if event == "expire":
        tx = world.ready_for("cancel")
        world.clock.set(tx.expires_at)
        world.attempt("expire", world.engine.expire_due)
        return world.load(tx.id)
    tx = world.ready_for(event)
    result = world.command(event, tx)
    if not isinstance(result, Transaction):
        raise _Failed(Finding("capabilities", event, f"the happy-path {event} failed: {result!r}"))
    return result


def _check_deferred(event: str, kinds: tuple[str, ...]):
    def body(world: _World) -> None:
        tx = _reach_deferred(world, event)
        world.attempt("deliver", world.engine.deliver_pending)
        records = world.engine.store.deliveries(tx.id)
        undelivered = [f"{record.kind}: {record.status} ({record.last_error})" for record in records
                       if record.status != "delivered"]
        missing = set(kinds) - {record.kind for record in records}
        if undelivered or missing:
            raise _Failed(Finding("capabilities", event, f"declares deliveries {list(kinds)} after {event};"
                                                         f" not delivered: {undelivered or sorted(missing)}"))

    return body


# --- retries: exactly-once and idempotency keys -------------------------------------------------------


def _requests_since(world: _World, start: int) -> list[Any]:
    return list(world.sandbox.requests[start:])


def _sent_twice(harness: ProviderHarness, sent: list[httpx.Request], statuses: dict[int, int]) -> str | None:
    """The first non-GET request sent again, byte for byte, in one attempt after a 2xx answer
    to it ("POST /x"), if any.  Re-sending after a lost answer or a 5xx is a retry, not this."""
    succeeded: set[tuple[str, str, bytes]] = set()
    for request in sent:
        if harness.repeatable(request):
            continue  # reads may poll, logins may repeat
        identity = (request.method, str(request.url), request.content)
        if identity in succeeded:
            return f"{request.method} {request.url.path}"
        if 200 <= statuses.get(id(request), 0) < 300:
            succeeded.add(identity)
    return None


def _money(result: Any) -> str | None:
    """What a POS would read off a settled transaction: state and amounts."""
    if not isinstance(result, Transaction):
        return None
    return (f"{result.state}: gross {result.gross}, discount {result.total_discount},"
            f" credits {result.total_credits}, outstanding {result.outstanding}")


def _compare_keys(harness: ProviderHarness, event: str, first: list[Any], retry: list[Any]) -> Finding | None:
    """Request by request ((method, path, n-th time in the attempt)), the retry's key must be the first's."""

    def keyed(requests: list[Any]) -> dict[tuple[str, str, int], str | None]:
        seen: Counter = Counter()
        keys = {}
        for request in requests:
            where = (request.method, request.path)
            keys[(*where, seen[where])] = harness.idempotency_key_of(request)
            seen[where] += 1
        return keys

    original, again = keyed(first), keyed(retry)
    for where, key in original.items():
        if key is not None and where in again and again[where] != key:
            return Finding("idempotency-key", event, f"{where[0]} {where[1]} was first sent with key {key!r},"
                                                     f" its retry with {again[where]!r}")
    return None


def _retry_until_settled(world: _World, event: str, tx: Transaction | None, attempts: list[list[Any]],
                         sends: list[list[Any]]) -> Any:
    """Retry as a POS would: the same command while it stays in doubt, then recover()."""
    result: Any = None
    for round_ in range(RETRIES):
        if tx is not None:
            current = world.load(tx.id)
            if current.pending is None:
                return current
        start, sent = len(world.sandbox.requests), len(world.transport.sent)
        if round_ < 2:
            result = world.run(event, tx)
        else:
            world.clock.advance(timedelta(minutes=15))  # past any recovery backoff
            world.attempt("recover", world.engine.recover)
        attempts.append(_requests_since(world, start))
        sends.append(world.transport.sent[sent:])
        if tx is None and isinstance(result, Transaction):
            return result
    return world.load(tx.id) if tx is not None else result


def _clean_run(harness: ProviderHarness, store: StoreFactory, event: str) -> str | None:
    """What the engine records for ``event`` with no fault: the yardstick of a faulted run."""
    world = _World(harness, store)
    try:
        result = world.run(event, world.ready_for(event))
        return _money(result)
    except _Failed:
        return None
    finally:
        world.close()


def _check_retry(event: str, operation: str, fault: Any, clean: str | None):
    def body(world: _World) -> None:
        tx = world.ready_for(event)
        before = world.harness.commits(world.sandbox)
        world.sandbox.faults.inject(operation, fault)
        start, sent = len(world.sandbox.requests), len(world.transport.sent)
        first = world.run(event, tx)
        attempts, sends = [_requests_since(world, start)], [world.transport.sent[sent:]]
        final = first if isinstance(first, Transaction) else _retry_until_settled(world, event, tx, attempts, sends)
        world.sandbox.faults.clear()
        target = TARGETS[event]["new" if tx is None else tx.state]
        done = isinstance(final, Transaction) and (final.state, final.pending) == (target, None)
        settled = done or (isinstance(final, Transaction) and final.pending is None) or (
            tx is None and not isinstance(final, Transaction))
        what = f"{fault.name} on {operation!r}"
        found = _judged(world, event, what, before, done, settled, attempts)
        twice = next(filter(None, (_sent_twice(world.harness, attempt, world.transport.statuses) for attempt in sends)), None)
        if twice:
            found.append(Finding("double-send", event, f"after {what}, one attempt sent {twice} twice"))
        if done and clean is not None and _money(final) != clean and not found:
            found.append(Finding("exactly-once", event, f"after {what} the engine recorded ({_money(final)}),"
                                                        f" a clean run ({clean}): a spoiled answer taken for a success"))
        if found:
            raise _Failed(*found)

    return body


def _judged(world: _World, event: str, what: str, before: Counter, done: bool, settled: bool,
            attempts: list[list[Any]]) -> list[Finding]:
    """No commit twice; one new commit of the event's kind when it is done, none when it failed;
    the same keys on retry."""
    harness = world.harness
    found: list[Finding] = []
    for retry in attempts[1:]:
        mismatch = _compare_keys(harness, event, attempts[0], retry)
        if mismatch is not None:
            found.append(mismatch)
            break
    after = harness.commits(world.sandbox)
    twice = {key: count for key, count in after.items() if count > 1}
    kind = harness.commit_kinds.get(event)
    new = sum(count for (commit_kind, _), count in (after - before).items() if commit_kind == kind)
    if twice:
        found.append(Finding("exactly-once", event, f"after {what} and a retry the provider committed"
                                                    f" twice: {twice}"))
    elif kind is not None and done and new == 0:
        found.append(Finding("exactly-once", event, f"after {what} the engine reports {event} done, but the"
                                                    f" provider holds no new {kind!r} commit: a success"
                                                    " reported without a commit"))
    elif kind is not None and done and new != 1:
        found.append(Finding("exactly-once", event, f"after {what} and a retry the provider holds {new}"
                                                    f" new {kind!r} commits for one {event}"))
    elif kind is not None and settled and not done and new:
        found.append(Finding("exactly-once", event, f"after {what} the engine reports {event} failed, but the"
                                                    f" provider committed it ({new} new {kind!r}): a commit"
                                                    " reported as a failure"))
    return found


def _judge_retry(world: _World, event: str, what: str, before: Counter, done: bool,
                 attempts: list[list[Any]]) -> None:
    found = _judged(world, event, what, before, done, done, attempts)
    if found:
        raise _Failed(*found)


def _check_delivery_retry(event: str, operation: str, fault: Any):
    def body(world: _World) -> None:
        tx = _reach_deferred(world, event)
        before = world.harness.commits(world.sandbox)
        world.sandbox.faults.inject(operation, fault)
        attempts: list[list[Any]] = []
        for _ in range(RETRIES):
            start = len(world.sandbox.requests)
            world.attempt("deliver", world.engine.deliver_pending)
            attempts.append(_requests_since(world, start))
            world.clock.advance(timedelta(hours=7))  # past the next retry of any schedule
        world.sandbox.faults.clear()
        done = all(record.status == "delivered" for record in world.engine.store.deliveries(tx.id))
        _judge_retry(world, "deliver", f"{fault.name} on {operation!r}", before, done,
                     [attempt for attempt in attempts if attempt])

    return body


# --- the entry points ------------------------------------------------------------------------------------


def check_driver(harness: ProviderHarness, *, store: StoreOption | None = None,
                 faults: tuple[Any, ...] = DEFAULT_FAULTS) -> list[Finding]:
    """Run every conformance scenario for ``harness``'s driver; what it breaks, or ``[]``.
    ``store``: where the engines keep their data (see ``as_store_factory``), SQLite by default."""
    store = as_store_factory(store)
    findings: list[Finding] = []
    probe = _World(harness, store)
    capabilities = probe.capabilities
    probe.close()

    for event in sorted(capabilities.remote):
        _scenario(harness, store, findings, _check_remote(event))
    for event in sorted(capabilities.local):
        _scenario(harness, store, findings, _check_local(event))
    for event, kinds in sorted(capabilities.deferred.items()):
        _scenario(harness, store, findings, _check_deferred(event, kinds))
    for event in sorted(capabilities.remote):
        clean = _clean_run(harness, store, event)
        for operation in harness.fault_operations.get(event, ()):
            for fault in faults:
                if fault is Fault.WRONG_TOTALS_AFTER_COMMIT and operation in harness.unconfirmable_amounts:
                    continue
                _scenario(harness, store, findings, _check_retry(event, operation, fault, clean))
    for event in sorted(capabilities.deferred):
        for operation in harness.fault_operations.get("deliver", ()):
            for fault in faults:
                _scenario(harness, store, findings, _check_delivery_retry(event, operation, fault))
    return findings


def assert_conformant(harness: ProviderHarness, **options: Any) -> None:
    """Fail (AssertionError) with every finding of ``check_driver``."""
    findings = check_driver(harness, **options)
    if findings:
        raise AssertionError(f"{harness!r}'s driver does not conform:\n" + "\n".join(f"- {f}" for f in findings))
