"""``AsyncEngine``: the same engine for asyncio POS backends.

It runs the very same command generators as ``Engine``; only the I/O differs: provider
exchanges go through each driver's ``httpx.AsyncClient``, and store calls (SQLite is
blocking) run in a worker thread so the event loop never waits on a disk flush: one hop
to the thread for each stretch of store work between provider calls.  A store with its
own asyncio path (PostgreSQL: ``aperform``) runs every operation on the loop directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, TypeVar

from .core import Command, NotStarted, ParallelOp, ProviderOp, Steps, StoreOp
from .engine import _Facade, driver_failure, report_commits, store_call
from .machine import TxEvent
from .models import Basket, DeliveryRecord, Event, LineItem, Transaction
from . import telemetry
from .secret import Secret
from .store.base import Intent

T = TypeVar("T")  # what a command returns


class AsyncEngine(_Facade):
    """The asyncio engine: every command is a coroutine."""

    async def _run(self, command: Command[T]) -> T:
        # One hop to a worker thread per stretch of store work, not one per store call:
        # the thread drives the command through its reads and writes up to its next
        # provider call, which the event loop then awaits.
        steps = Steps(command)
        if getattr(self.store, "aperform", None) is not None:
            with telemetry.command_span(command):
                for step in steps:
                    try:
                        steps.answer(await self._perform(step))
                    except Exception as failure:
                        steps.fail(failure)
            return steps.value
        with telemetry.command_span(command):
            op = await asyncio.to_thread(self._advance, steps)
            while op is not None:
                try:
                    steps.answer(await self._perform(op))
                except Exception as failure:
                    steps.fail(failure)
                op = await asyncio.to_thread(self._advance, steps)
        return steps.value

    def _advance(self, steps: Steps[Any]) -> ProviderOp | ParallelOp | None:
        """Perform the command's store operations (blocking: run in a worker thread) until it
        needs the network; that operation, or None when the command has finished."""
        for op in steps:
            if isinstance(op, ParallelOp) or (isinstance(op, ProviderOp) and op.needs_io):
                return op
            try:
                steps.answer(op.result if isinstance(op, ProviderOp) else store_call(self.store, op))
            except Exception as failure:
                steps.fail(failure)
        return None

    async def _perform(self, op: StoreOp | ProviderOp | ParallelOp) -> Any:
        if isinstance(op, StoreOp):
            perform = getattr(self.store, "aperform", None)  # a store with its own asyncio path
            if perform is None:
                return await asyncio.to_thread(store_call, self.store, op)
            return report_commits(op, await perform(op.method, *op.args))
        if isinstance(op, ParallelOp):
            return await self._perform_parallel(op)
        if not op.needs_io:
            return op.result
        driver = self.core.drivers[op.provider]
        try:
            with telemetry.provider_call(op.provider, op.operation):
                return await driver.arun(op.exchange, op.first)
        except Exception as error:
            raise driver_failure(op, error) from None

    async def _perform_parallel(self, op: ParallelOp) -> list[Any]:
        """Each call as a task, at most ``op.limit`` at once; every outcome returned, none raised."""
        slots = asyncio.Semaphore(op.limit)

        async def attempt(call: ProviderOp) -> Any:
            async with slots:
                if not self._may_start(op):
                    return NotStarted()
                try:
                    return await self._perform(call)
                except Exception as failure:
                    return failure

        return list(await asyncio.gather(*(attempt(call) for call in op.calls)))

    async def preview(self, provider: str, basket: Basket | Iterable[LineItem], *,
                      customer_token: str | Secret | None = None, idempotency_key: str | None = None,
                      payment_type: str | None = None) -> Transaction:
        return await self._run(self._preview(provider, basket, customer_token, idempotency_key, payment_type))

    async def update(self, tx_id: str, items: Iterable[LineItem], *,
                     idempotency_key: str | None = None) -> Transaction:
        return await self._run(self.core.command(tx_id, "update", items=items, idempotency_key=idempotency_key))

    async def begin_payment(self, tx_id: str, *, idempotency_key: str | None = None) -> Transaction:
        return await self._run(self.core.command(tx_id, "begin_payment", idempotency_key=idempotency_key))

    async def finalize(self, tx_id: str, *, idempotency_key: str | None = None) -> Transaction:
        return await self._run(self.core.command(tx_id, "finalize", idempotency_key=idempotency_key))

    async def cancel(self, tx_id: str, *, idempotency_key: str | None = None) -> Transaction:
        return await self._run(self.core.command(tx_id, "cancel", idempotency_key=idempotency_key))

    async def refund(self, tx_id: str, *, comment: str | None = None,
                     idempotency_key: str | None = None) -> Transaction:
        return await self._run(self.core.command(tx_id, "refund", comment=comment,
                                                 idempotency_key=idempotency_key))

    async def get(self, tx_id: str) -> Transaction:
        return await self._run(self.core.get(tx_id))

    async def history(self, tx_id: str) -> list[Event]:
        return await self._run(self.core.history(tx_id))

    async def allowed_events(self, tx_id: str) -> list[TxEvent]:
        return await self._run(self.core.allowed_events(tx_id))

    async def expire_due(self) -> int:
        return await self._run(self.core.expire_due())

    async def recover(self, *, limit: int = 100) -> int:
        """Re-drive up to ``limit`` in-doubt side effects; returns how many settled."""
        return await self._run(self.core.recover(batch=limit))

    async def resolve(self, tx_id: str, *, applied: bool) -> Transaction:
        """An operator settles a transaction's in-doubt call (see ``Core.resolve``)."""
        return await self._run(self.core.resolve(tx_id, applied=applied))

    async def needing_attention(self, *, limit: int = 100) -> list[Intent]:
        """In-doubt calls the engine will not re-send: they wait for ``resolve`` or ``cancel``."""
        return await asyncio.to_thread(self.store.needing_attention, limit, self.core.providers)

    async def deliver_pending(self, *, max_rounds: int | None = None) -> int:
        return await self._run(self.core.deliver_pending(max_rounds=max_rounds))

    async def deliveries(self, tx_id: str | None = None, status: str | None = None) -> list[DeliveryRecord]:
        return await asyncio.to_thread(self.store.deliveries, tx_id, status)

    async def retry_delivery(self, delivery_id: int) -> bool:
        """Re-queue a dead delivery now (an operator's decision); False if it is not dead."""
        return await asyncio.to_thread(self.store.retry_delivery, delivery_id, self.clock.now())

    async def aclose(self) -> None:
        for driver in self.core.drivers.values():
            aclose = getattr(driver, "aclose", None)
            if aclose is not None:
                await aclose()
        aclose = getattr(self.store, "aclose", None)
        await (aclose() if aclose is not None else asyncio.to_thread(self.store.close))

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
