"""Guaranteed deliveries: what a transaction shows of them, concurrent rounds with a bound,
leases that keep several workers from sending one delivery twice, and rounds that stop
starting sends (lease half spent, worker shutting down) and release what they held."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import timedelta

import httpx
import pytest

from txengine import AsyncEngine, Engine
from txengine.core import NotStarted, ParallelOp
from txengine.journal import replay
from txengine.store.base import DELIVERED, PENDING, DeliverySettlement
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER, BlockingView
from .pg_server import query_one


def finalized(engine, basket, n=1):
    return [engine.finalize(engine.preview("reference", basket).id) for _ in range(n)]


def receipt_sends(sandbox):
    """How many times each delivery's key reached the provider (replays included)."""
    sends: dict[str, int] = {}
    for request in sandbox.requests:
        if request.path == "/receipts":
            key = request.header("idempotency-key")
            sends[key] = sends.get(key, 0) + 1
    return sends


class TestTheTransactionShowsItsDeliveries:
    def test_finalize_returns_the_queued_delivery_and_get_follows_it(self, pos, basket, sandbox, clock):
        tx = pos.finalize(pos.preview("reference", basket, customer_token=CUSTOMER).id)
        [queued] = tx.deliveries
        assert (queued.kind, queued.status, queued.attempts, queued.last_error) == ("receipt", "pending", 0, None)
        assert queued.next_attempt_at == clock.now()

        sandbox.faults.inject("receipt", Fault.SERVER_ERROR)
        assert pos.deliver_pending() == 0
        [failed] = pos.get(tx.id).deliveries
        assert (failed.status, failed.attempts) == ("pending", 1)
        assert "503" in failed.last_error and failed.next_attempt_at > clock.now()

        clock.set(failed.next_attempt_at)
        assert pos.deliver_pending() == 1
        [done] = pos.get(tx.id).deliveries
        assert (done.status, done.attempts, done.delivered_at) == ("delivered", 2, clock.now())

    def test_deliveries_are_read_not_stored_and_do_not_change_equality(self, engine, basket, db_url):
        tx = engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id)
        engine.deliver_pending()
        served = engine.get(tx.id)
        assert served.deliveries and served == replay(engine.history(tx.id)) == tx
        snapshot = json.loads(query_one(db_url, "SELECT snapshot FROM transactions WHERE id = ?", (tx.id,))[0])
        assert "deliveries" not in snapshot

    def test_a_transaction_without_deliveries_shows_none(self, pos, basket):
        tx = pos.cancel(pos.preview("reference", basket, customer_token=CUSTOMER).id)
        assert tx.deliveries == () and pos.get(tx.id).deliveries == ()


class _Gate(httpx.BaseTransport):
    """Hold every request until ``width`` are in flight together: proves the concurrency
    reaches its bound (a narrower round breaks the barrier) and never exceeds it."""

    def __init__(self, inner: httpx.BaseTransport, width: int) -> None:
        self.inner, self.width = inner, width
        self.barrier = threading.Barrier(width)
        self.lock = threading.Lock()
        self.in_flight = self.most = 0

    def handle_request(self, request):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            self.barrier.wait(timeout=10)
            return self.inner.handle_request(request)
        finally:
            with self.lock:
                self.in_flight -= 1


class _AsyncGate(httpx.AsyncBaseTransport):
    def __init__(self, sandbox, width: int) -> None:
        self.sandbox, self.width = sandbox, width
        self.barrier = asyncio.Barrier(width)
        self.in_flight = self.most = 0

    async def handle_async_request(self, request):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.wait_for(self.barrier.wait(), timeout=10)
            await request.aread()
            return self.sandbox._handle_httpx(request)
        finally:
            self.in_flight -= 1


class TestBoundedConcurrency:
    def test_the_sync_engine_sends_a_round_on_a_bounded_thread_pool(self, db_url, basket, sandbox, clock):
        width = 4
        gate = _Gate(sandbox.transport(), width)
        setup = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
        with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
            txs = finalized(engine, basket, 3 * width)
        driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=gate)
        with Engine.open(db_url, providers={"reference": driver}, clock=clock,
                         delivery_concurrency=width) as engine:
            assert engine.deliver_pending() == 3 * width
            assert gate.most == width
            assert {d.status for tx in txs for d in engine.get(tx.id).deliveries} == {"delivered"}
        assert set(receipt_sends(sandbox).values()) == {1}

    def test_the_async_engine_runs_the_same_round_as_bounded_tasks(self, db_url, basket, sandbox, clock):
        width = 3
        setup = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
        with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
            finalized(engine, basket, 2 * width)

        async def drain():
            gate = _AsyncGate(sandbox, width)
            driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, async_transport=gate)
            async with AsyncEngine.open(db_url, providers={"reference": driver}, clock=clock,
                                        delivery_concurrency=width) as engine:
                return await engine.deliver_pending(), gate.most

        assert asyncio.run(drain()) == (2 * width, width)
        assert set(receipt_sends(sandbox).values()) == {1}

    def test_rounds_continue_until_nothing_is_due_or_max_rounds(self, db_url, driver, basket, clock, sandbox):
        with Engine.open(db_url, providers={"reference": driver}, clock=clock, delivery_round=3) as engine:
            finalized(engine, basket, 7)
            assert engine.deliver_pending(max_rounds=2) == 6
            assert engine.deliver_pending() == 1
            assert engine.deliver_pending() == 0

    def test_one_failing_call_does_not_fail_the_round(self, engine, basket, sandbox, clock):
        txs = finalized(engine, basket, 4)
        sandbox.faults.inject("receipt", Fault.DROP_CONNECTION)
        assert engine.deliver_pending() == 3
        statuses = sorted((d.status, d.attempts) for tx in txs for d in engine.get(tx.id).deliveries)
        assert statuses == [("delivered", 1)] * 3 + [("pending", 1)]

    def test_the_runner_answers_results_exceptions_and_not_started(self, engine, basket, sandbox):
        [tx] = finalized(engine, basket)
        core = engine.core
        good = core._prepare("reference", "finalize", tx, "k")  # already finalized: idempotent answer
        sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
        bad = core._prepare("reference", "finalize", tx, "k")
        results = engine._perform(ParallelOp((bad, good), limit=2))
        assert type(results[0]).__name__ == "ProtocolError" and results[1].provider_ref == tx.provider_ref
        engine.stop_sending()
        late = core._prepare("reference", "finalize", tx, "k")
        assert isinstance(engine._perform(ParallelOp((late,), limit=2))[0], NotStarted)


class TestRoundsThatStopStarting:
    def test_nothing_starts_once_half_the_lease_is_spent(self, db_url, basket, sandbox, clock):
        """A round slower than half its lease releases the rest instead of racing a re-claim."""
        lease = timedelta(seconds=60)

        def slow_provider(request):
            clock.advance(lease / 2)  # this one send took half the lease
            return sandbox._handle_httpx(request)

        setup = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
        slow = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=httpx.MockTransport(slow_provider))
        with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
            txs = finalized(engine, basket, 3)
        with Engine.open(db_url, providers={"reference": slow}, clock=clock, delivery_lease=lease,
                         delivery_concurrency=1) as engine:
            assert engine.deliver_pending() == 1
            rows = [engine.get(tx.id).deliveries[0] for tx in txs]
            assert [(r.status, r.attempts) for r in rows] == [("delivered", 1), ("pending", 0), ("pending", 0)]
            assert rows[1].next_attempt_at < clock.now(), "released, due at once: no attempt counted"
            assert _leased(db_url) == 0
        with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
            assert engine.deliver_pending() == 2
        assert set(receipt_sends(sandbox).values()) == {1}

    def test_stop_sending_lets_in_flight_finish_and_releases_the_unsent(self, db_url, basket, sandbox, clock):
        engines = []

        def stop_after_this_one(request):
            engines[0].stop_sending()  # a SIGTERM arriving while the first send is in flight
            return sandbox._handle_httpx(request)

        setup = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
        with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
            txs = finalized(engine, basket, 4)
        driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key,
                                 transport=httpx.MockTransport(stop_after_this_one))
        with Engine.open(db_url, providers={"reference": driver}, clock=clock, delivery_concurrency=1,
                         delivery_round=2) as engine:
            engines.append(engine)
            assert engine.deliver_pending() == 1, "the drain ends with the round that stopped"
            assert sorted(engine.get(tx.id).deliveries[0].status for tx in txs) == [
                "delivered", "pending", "pending", "pending"]
            assert _leased(db_url) == 0
            assert engine.deliver_pending() == 0, "a stopped engine sends nothing, and returns"
        assert sum(receipt_sends(sandbox).values()) == 1


def _leased(db_url: str) -> int:
    return query_one(db_url, "SELECT count(*) FROM outbox WHERE lease_until IS NOT NULL"
                     " OR lease_owner IS NOT NULL")[0]


class TestLeases:
    def test_a_stale_holder_cannot_settle_what_another_reclaimed(self, engine, basket, clock):
        [tx] = finalized(engine, basket)
        store = engine.store
        [first] = store.claim_deliveries(clock.now(), clock.now() + timedelta(seconds=60), 10, "worker-a")
        assert store.claim_deliveries(clock.now(), clock.now() + timedelta(seconds=60), 10, "worker-b") == []
        clock.advance(seconds=61)
        [again] = store.claim_deliveries(clock.now(), clock.now() + timedelta(seconds=60), 10, "worker-b")
        assert again.id == first.id
        assert store.settle_deliveries([DeliverySettlement(first.id, PENDING, clock.now())], clock.now(),
                                       "worker-a") == 0
        assert store.settle_deliveries([DeliverySettlement(first.id, DELIVERED)], clock.now(), "worker-b") == 1
        [row] = engine.get(tx.id).deliveries
        assert (row.status, row.attempts) == ("delivered", 1)

    def test_engines_on_one_store_in_threads_send_each_delivery_exactly_once(
            self, db_url, basket, sandbox, clock):
        """Four engines (each its own connections and sender pool) drain one outbox at once."""
        setup = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
        with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
            txs = finalized(engine, basket, 80)
        in_flight: set[str] = set()
        overlaps: list[str] = []
        guard = threading.Lock()

        def watching(request):
            key = request.headers["idempotency-key"]
            with guard:
                if key in in_flight:
                    overlaps.append(key)
                in_flight.add(key)
            try:
                return sandbox._handle_httpx(request)
            finally:
                with guard:
                    in_flight.discard(key)

        start, delivered = threading.Barrier(4), []

        def worker():
            driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=httpx.MockTransport(watching))
            with Engine.open(db_url, providers={"reference": driver}, clock=clock, delivery_round=7,
                             delivery_concurrency=3) as engine:
                start.wait(timeout=10)
                delivered.append(engine.deliver_pending())

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(delivered) == 80 and not overlaps
        assert len([d for d in delivered if d]) > 1, "the work was shared"
        sends = receipt_sends(sandbox)
        assert len(sends) == 80 and set(sends.values()) == {1}
        assert sandbox.receipts == {tx.provider_ref: 1 for tx in txs}


class TestOperators:
    def test_a_dead_delivery_is_parked_visible_and_requeued_by_an_operator(self, pos, basket, sandbox, clock):
        tx = pos.finalize(pos.preview("reference", basket, customer_token=CUSTOMER).id)
        sandbox.faults.inject("receipt", Fault.SERVER_ERROR, times=100)
        for _ in range(10):
            pos.deliver_pending()
            clock.advance(hours=5)
        [dead] = pos.get(tx.id).deliveries
        assert dead.status == "dead" and dead.attempts == 6
        assert pos.deliveries(status="dead") == [dead]
        sandbox.faults.clear()
        assert pos.retry_delivery(dead.id) and not pos.retry_delivery(dead.id)
        assert pos.deliver_pending() == 1
        assert pos.get(tx.id).deliveries[0].status == "delivered"
        assert sandbox.receipts == {tx.provider_ref: 1}

    def test_the_backlog_counts_pending_dead_and_in_doubt(self, engine, basket, sandbox, clock):
        finalized(engine, basket, 2)
        doubtful = engine.preview("reference", basket)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(Exception):
            engine.finalize(doubtful.id)
        assert engine.store.backlog(clock.now()) == {"pending": 2, "dead": 0, "in_doubt": 1, "stuck": 1}
        assert engine.store.retry_dead_deliveries(clock.now()) == 0


def test_the_async_facade_shows_and_requeues_deliveries_too(db_url, driver, basket, sandbox, clock):
    view = BlockingView(AsyncEngine.open(db_url, providers={"reference": driver}, clock=clock))
    try:
        tx = view.finalize(view.preview("reference", basket).id)
        assert [d.status for d in view.get(tx.id).deliveries] == ["pending"]
        assert view.deliver_pending() == 1
        assert not view.retry_delivery(tx.deliveries[0].id), "only a dead delivery is re-queued"
    finally:
        view.close()


def test_an_engine_never_claims_deliveries_of_a_provider_it_has_no_driver_for(db_url, clock, sandbox, basket):
    """Engines for different providers on one database: each drains only its own outbox rows
    (claiming the others' would park them as dead for want of a driver)."""
    other = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    mine = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"other": other}, clock=clock) as theirs, \
            Engine.open(db_url, providers={"reference": mine}, clock=clock) as ours:
        foreign = theirs.finalize(theirs.preview("other", basket).id)
        own = ours.finalize(ours.preview("reference", basket).id)
        assert ours.deliver_pending() == 1
        assert ours.get(own.id).deliveries[0].status == "delivered"
        assert theirs.get(foreign.id).deliveries[0].status == "pending", "untouched, not dead"
        assert theirs.deliver_pending() == 1
