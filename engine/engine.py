"""``Engine``: the blocking facade a POS backend calls.

Every method runs one of ``Core``'s command generators, performing the operations it
yields with blocking calls to the store and the provider drivers.  The lifecycle itself
lives in ``engine.core`` and ``engine.machine``; ``AsyncEngine`` shares all of it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar, Unpack

from .clock import Clock, SystemClock
from .core import Command, Core, EngineOptions, NotStarted, ParallelOp, ProviderOp, StoreOp, Steps
from .drivers import ProviderDriver
from .errors import EngineError, ProtocolError
from .machine import TxEvent
from .models import Basket, DeliveryRecord, Event, LineItem, Transaction
from . import telemetry
from .secret import Secret
from .store import Store, open_store
from .store.base import Intent

#: The environment variable a deployment may set instead of passing ``secret_key``.
SECRET_KEY_ENV = "TXENGINE_SECRET_KEY"

T = TypeVar("T")  # what a command returns


def driver_failure(op: ProviderOp, error: Exception) -> Exception:
    """A driver that crashes leaves the outcome unknown; never echo its message (secrets)."""
    if isinstance(error, EngineError):
        return error
    return ProtocolError(f"the {op.provider} driver failed in {op.operation}: {type(error).__name__}",
                         provider=op.provider)


def store_call(store: Store, op: StoreOp) -> Any:
    """Perform a store operation (blocking); what it commits is reported to telemetry."""
    return report_commits(op, getattr(store, op.method)(*op.args))


def report_commits(op: StoreOp, result: Any) -> Any:
    """Tell telemetry what a performed store operation committed; its result."""
    if op.method == "write":
        telemetry.committed((op.args[0],))
    elif op.method == "write_each":  # a batch: only the commits that were written
        telemetry.committed([commit for commit, refused in zip(op.args[0], result) if refused is None])
    return result


class _Facade:
    """What both engines share: configuration and the command builders."""

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, ProviderDriver],
        clock: Clock | None = None,
        **options: Unpack[EngineOptions],
    ) -> None:
        """``options`` configure the core: ``timers``, ``intent_lease``, ``delivery_lease``,
        ``delivery_concurrency``, ``delivery_round``, ``rng``, ``secret_key`` (see
        ``engine.core.Core``).  Without ``secret_key``, ``TXENGINE_SECRET_KEY`` is used if set."""
        if options.get("secret_key") is None and os.environ.get(SECRET_KEY_ENV):
            options["secret_key"] = os.environ[SECRET_KEY_ENV]
        self.store = store
        self.clock = clock or SystemClock()
        self.core = Core(providers, self.clock, **options)
        self._stop_sending = threading.Event()
        self._pool: ThreadPoolExecutor | None = None  # the sync engine's delivery senders
        self._pool_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, providers: Mapping[str, ProviderDriver], clock: Clock | None = None,
             **options: Unpack[EngineOptions]) -> Self:
        """Open (and migrate) the store at ``url`` and build an engine on it."""
        store = open_store(url)
        try:
            return cls(store, providers, clock, **options)
        except BaseException:
            store.close()  # refused options (a lease shorter than a deadline) leave no open file
            raise

    @property
    def drivers(self) -> Mapping[str, ProviderDriver]:
        return self.core.drivers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store!r}, providers={sorted(self.core.drivers)})"

    def stop_sending(self) -> None:
        """Start no further delivery sends (a worker shutting down): a round in progress
        lets its in-flight sends finish and releases what it claimed but had not sent."""
        self._stop_sending.set()

    def _may_start(self, op: ParallelOp) -> bool:
        return not self._stop_sending.is_set() and (op.start_by is None or self.clock.now() < op.start_by)

    # Each public command is a generator from the core; the subclasses run it.
    def _preview(self, provider: str, basket: Basket | Iterable[LineItem], customer_token: str | Secret | None,
                 idempotency_key: str | None, payment_type: str | None) -> Command[Transaction]:
        return self.core.preview(provider, basket, customer_token, idempotency_key, payment_type)


class Engine(_Facade):
    """The synchronous engine."""

    def _run(self, command: Command[T]) -> T:
        steps = Steps(command)
        with telemetry.command_span(command):
            for op in steps:
                try:
                    steps.answer(self._perform(op))
                except Exception as failure:
                    steps.fail(failure)
        return steps.value

    def _perform(self, op: StoreOp | ProviderOp | ParallelOp) -> Any:
        if isinstance(op, StoreOp):
            return store_call(self.store, op)
        if isinstance(op, ParallelOp):
            return self._perform_parallel(op)
        if not op.needs_io:
            return op.result
        driver = self.core.drivers[op.provider]
        try:
            with telemetry.provider_call(op.provider, op.operation):
                return driver.run(op.exchange, op.first)
        except Exception as error:
            raise driver_failure(op, error) from None

    def _perform_parallel(self, op: ParallelOp) -> list[Any]:
        """Each call on a bounded thread pool; every outcome returned, none raised."""

        def attempt(call: ProviderOp) -> Any:
            if not self._may_start(op):
                return NotStarted()
            try:
                return self._perform(call)
            except Exception as failure:
                return failure

        if op.limit == 1 or len(op.calls) == 1:
            return [attempt(call) for call in op.calls]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.core.delivery_concurrency, thread_name_prefix="txengine-send")
        return list(self._pool.map(attempt, op.calls))

    def preview(self, provider: str, basket: Basket | Iterable[LineItem], *,
                customer_token: str | Secret | None = None, idempotency_key: str | None = None,
                payment_type: str | None = None) -> Transaction:
        return self._run(self._preview(provider, basket, customer_token, idempotency_key, payment_type))

    def update(self, tx_id: str, items: Iterable[LineItem], *, idempotency_key: str | None = None) -> Transaction:
        return self._run(self.core.command(tx_id, "update", items=items, idempotency_key=idempotency_key))

    def begin_payment(self, tx_id: str, *, idempotency_key: str | None = None) -> Transaction:
        return self._run(self.core.command(tx_id, "begin_payment", idempotency_key=idempotency_key))

    def finalize(self, tx_id: str, *, idempotency_key: str | None = None) -> Transaction:
        return self._run(self.core.command(tx_id, "finalize", idempotency_key=idempotency_key))

    def cancel(self, tx_id: str, *, idempotency_key: str | None = None) -> Transaction:
        return self._run(self.core.command(tx_id, "cancel", idempotency_key=idempotency_key))

    def refund(self, tx_id: str, *, comment: str | None = None, idempotency_key: str | None = None) -> Transaction:
        return self._run(self.core.command(tx_id, "refund", comment=comment, idempotency_key=idempotency_key))

    def get(self, tx_id: str) -> Transaction:
        return self._run(self.core.get(tx_id))

    def history(self, tx_id: str) -> list[Event]:
        return self._run(self.core.history(tx_id))

    def allowed_events(self, tx_id: str) -> list[TxEvent]:
        return self._run(self.core.allowed_events(tx_id))

    def expire_due(self) -> int:
        return self._run(self.core.expire_due())

    def recover(self, *, limit: int = 100) -> int:
        """Re-drive up to ``limit`` in-doubt side effects; returns how many settled."""
        return self._run(self.core.recover(batch=limit))

    def resolve(self, tx_id: str, *, applied: bool) -> Transaction:
        """An operator settles a transaction's in-doubt call after checking with the provider:
        ``applied=True`` commits it, ``applied=False`` records it as not applied."""
        return self._run(self.core.resolve(tx_id, applied=applied))

    def needing_attention(self, *, limit: int = 100) -> list[Intent]:
        """In-doubt calls the engine will not re-send: they wait for ``resolve`` or ``cancel``."""
        return self.store.needing_attention(limit, self.core.providers)

    def deliver_pending(self, *, max_rounds: int | None = None) -> int:
        return self._run(self.core.deliver_pending(max_rounds=max_rounds))

    def deliveries(self, tx_id: str | None = None, status: str | None = None) -> list[DeliveryRecord]:
        return self.store.deliveries(tx_id, status)

    def retry_delivery(self, delivery_id: int) -> bool:
        """Re-queue a dead delivery now (an operator's decision); False if it is not dead."""
        return self.store.retry_delivery(delivery_id, self.clock.now())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for driver in self.core.drivers.values():
            close = getattr(driver, "close", None)
            if close is not None:
                close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
