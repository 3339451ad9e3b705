"""``Engine``: the blocking facade a POS backend calls.

Every method runs one of ``Core``'s command generators, performing the operations it
yields with blocking calls to the store and the provider drivers.  The lifecycle itself
lives in ``engine.core`` and ``engine.machine``; ``AsyncEngine`` shares all of it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from .clock import Clock, SystemClock
from .core import Command, Core, ProviderOp, StoreOp
from .drivers import ProviderDriver
from .errors import EngineError, ProtocolError
from .machine import TimerPolicy
from .models import Basket, Event, LineItem, Transaction
from .secret import Secret
from .store import Store, open_store
from .store.base import DeliveryRecord


def driver_failure(op: ProviderOp, error: Exception) -> Exception:
    """A driver that crashes leaves the outcome unknown; never echo its message (secrets)."""
    if isinstance(error, EngineError):
        return error
    return ProtocolError(f"the {op.provider} driver failed in {op.operation}: {type(error).__name__}",
                         provider=op.provider)


class _Facade:
    """What both engines share: configuration and the command builders."""

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, ProviderDriver],
        clock: Clock | None = None,
        *,
        timers: Mapping[str, TimerPolicy] | None = None,
        intent_lease: timedelta = timedelta(seconds=60),
        delivery_lease: timedelta = timedelta(seconds=60),
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        self.core = Core(providers, self.clock, timers=timers, intent_lease=intent_lease,
                         delivery_lease=delivery_lease, rng=rng)

    @classmethod
    def open(cls, url: str, providers: Mapping[str, ProviderDriver], clock: Clock | None = None, **options: Any):
        """Open (and migrate) the store at ``url`` and build an engine on it."""
        return cls(open_store(url), providers, clock, **options)

    @property
    def drivers(self) -> Mapping[str, ProviderDriver]:
        return self.core.drivers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store!r}, providers={sorted(self.core.drivers)})"

    # Each public command is a generator from the core; the subclasses run it.
    def _preview(self, provider, basket, customer_token, idempotency_key, payment_type) -> Command:
        return self.core.preview(provider, basket, customer_token, idempotency_key, payment_type)


class Engine(_Facade):
    """The synchronous engine."""

    def _run(self, command: Command) -> Any:
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = command.throw(error) if error is not None else command.send(result)
            except StopIteration as done:
                return done.value
            result, error = None, None
            try:
                result = self._perform(op)
            except Exception as failure:  # handed back to the command to decide
                error = failure

    def _perform(self, op: StoreOp | ProviderOp) -> Any:
        if isinstance(op, StoreOp):
            return getattr(self.store, op.method)(*op.args)
        if not op.needs_io:
            return op.result
        driver = self.core.drivers[op.provider]
        try:
            return driver.run(op.exchange, op.first)
        except Exception as error:
            raise driver_failure(op, error) from None

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

    def allowed_events(self, tx_id: str) -> list[str]:
        return self._run(self.core.allowed_events(tx_id))

    def expire_due(self) -> int:
        return self._run(self.core.expire_due())

    def recover(self) -> int:
        return self._run(self.core.recover())

    def deliver_pending(self) -> int:
        return self._run(self.core.deliver_pending())

    def deliveries(self, tx_id: str | None = None, status: str | None = None) -> list[DeliveryRecord]:
        return self.store.deliveries(tx_id, status)

    def close(self) -> None:
        for driver in self.core.drivers.values():
            close = getattr(driver, "close", None)
            if close is not None:
                close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
