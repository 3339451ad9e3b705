"""Draining guaranteed deliveries: the engine against plain httpx, in the same run.

    python bench/delivery.py [--n 10000] [--concurrency 8] [--round 100] [--passes 2]

The provider is Rekonect's sandbox served on loopback by uvicorn in its own process (so
the server does not share the benchmark's GIL); every delivery is one purchase submit
(``POST /v1/transaction``) of a distinct non-member purchase.

- engine: ``n`` submits queued in the SQLite outbox (as ``finalize`` leaves them), then
  ``deliver_pending()`` with ``delivery_concurrency`` sends in flight: claim a round
  under a lease, build each request through the driver, send them concurrently, settle
  the round durably (WAL + synchronous=FULL).
- plain httpx: the same requests (same driver-built bodies and headers, fresh
  transaction ids), the same concurrency, no engine: a thread pool over one
  ``httpx.Client`` for the sync engine, ``asyncio.gather`` under a semaphore over one
  ``httpx.AsyncClient`` for the async one.

Each pass (sync, then async) sends half the plain requests before the engine drains its
``n`` and half after, so drift hits both alike; the ratio is engine throughput / plain
throughput over all passes.  Target >= 0.70.
The sandbox's own ledger must hold every purchase exactly once at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from common import emit, row

import httpx  # noqa: E402

from txengine import AsyncEngine, Engine, LineItem, Money  # noqa: E402
from txengine.models import PricedLine, Transaction  # noqa: E402
from txengine.store.base import Commit, NewDelivery  # noqa: E402
from txengine.providers.rekonect import RekonectDriver  # noqa: E402
from txengine.providers.rekonect.sandbox import DEFAULT_API_KEY  # noqa: E402

TARGET = 0.70
DRIVER_OPTIONS = {"api_key": DEFAULT_API_KEY, "source_name": "bench", "pos_id": "POS-1", "branch_id": "BR-1"}
LINES = (PricedLine.unpriced(LineItem("COFFEE", "Flat white", 1, Money(350, "EUR"), 10)),
         PricedLine.unpriced(LineItem(None, "Sparkling water", 2, Money(250, "EUR"), 20)))


# --- the provider, in its own process -----------------------------------------------------------


def _serve_sandbox(ready, commands) -> None:
    from txengine.providers.rekonect import RekonectSandbox
    from txengine.testing.sandbox import serve

    sandbox = RekonectSandbox()
    with serve(sandbox) as served:
        ready.send(served.base_url)
        while True:
            command = commands.recv()
            if command == "stop":
                return
            with sandbox.lock:  # command == "ledger": submissions per recorded purchase
                commands.send({tx_id: p.submissions for tx_id, p in sandbox.purchases.items()})


class ServedSandbox:
    def __enter__(self) -> ServedSandbox:
        context = multiprocessing.get_context("spawn")
        ready, self._ready = context.Pipe()
        self._commands, commands = context.Pipe()
        self.process = context.Process(target=_serve_sandbox, args=(self._ready, commands), daemon=True)
        self.process.start()
        self.base_url = ready.recv()
        return self

    def ledger(self) -> dict[str, int]:
        self._commands.send("ledger")
        return self._commands.recv()

    def __exit__(self, *exc_info) -> None:
        self._commands.send("stop")
        self.process.join(10)


# --- the work: n purchases ----------------------------------------------------------------------


def purchases(prefix: str, n: int) -> list[Transaction]:
    now = datetime.now(timezone.utc)
    return [Transaction(id=f"{prefix}-{i:06d}", provider="rekonect", state="finalized", items=LINES,
                        currency="EUR", created_at=now, updated_at=now, finalized_at=now, version=2)
            for i in range(n)]


def queue(engine: Engine, txs: list[Transaction], chunk: int = 1000) -> None:
    """Put the submits in the outbox exactly as finalize would (payload built by the driver)."""
    driver = engine.drivers["rekonect"]
    now = engine.clock.now()
    for start in range(0, len(txs), chunk):
        enqueue = tuple(NewDelivery(tx.id, "rekonect", "submit", driver.delivery_payload("submit", tx),
                                    f"{tx.id}:submit", now) for tx in txs[start:start + chunk])
        engine.store.write(Commit(f"bench-{start}", 0, enqueue=enqueue))


def plain_requests(base_url: str, txs: list[Transaction]) -> list[tuple[str, dict, dict]]:
    """The same requests the engine sends (URL, headers, JSON body), as a plain sender holds
    them before it sends: the bodies are the driver's own, byte for byte."""
    driver = RekonectDriver(base_url=base_url, **DRIVER_OPTIONS)
    prototype = driver._post("/v1/transaction", {})
    headers = {k: v for k, v in prototype.headers.items() if k.lower().startswith("x-")}
    url = str(prototype.url)
    return [(url, headers, dict(driver.delivery_payload("submit", tx))) for tx in txs]


def check(response: httpx.Response) -> None:
    if response.status_code != 200 or response.json().get("status") != "success":
        raise RuntimeError(f"the sandbox refused a submit: HTTP {response.status_code}")


def plain_sync(requests: list[tuple[str, dict, dict]], concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits, timeout=30) as client, ThreadPoolExecutor(concurrency) as pool:
        def send(request):
            url, headers, body = request
            check(client.send(httpx.Request("POST", url, json=body, headers=headers)))

        started = time.perf_counter()
        list(pool.map(send, requests))
        return time.perf_counter() - started


def plain_async(requests: list[tuple[str, dict, dict]], concurrency: int) -> float:
    async def drain() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            slots = asyncio.Semaphore(concurrency)

            async def send(request):
                url, headers, body = request
                async with slots:
                    check(await client.send(httpx.Request("POST", url, json=body, headers=headers)))

            started = time.perf_counter()
            await asyncio.gather(*(send(request) for request in requests))
            return time.perf_counter() - started

    return asyncio.run(drain())


def engine_sync(db: str, base_url: str, txs: list[Transaction], concurrency: int, round_: int) -> float:
    driver = RekonectDriver(base_url=base_url, **DRIVER_OPTIONS)
    with Engine.open(f"sqlite:///{db}", providers={"rekonect": driver}, delivery_concurrency=concurrency,
                     delivery_round=round_) as engine:
        queue(engine, txs)
        started = time.perf_counter()
        delivered = engine.deliver_pending()
        elapsed = time.perf_counter() - started
        if delivered != len(txs) or engine.store.backlog(engine.clock.now())["pending"]:
            raise RuntimeError(f"the engine delivered {delivered} of {len(txs)}")
    return elapsed


def engine_async(db: str, base_url: str, txs: list[Transaction], concurrency: int, round_: int) -> float:
    async def drain() -> float:
        driver = RekonectDriver(base_url=base_url, **DRIVER_OPTIONS)
        async with AsyncEngine.open(f"sqlite:///{db}", providers={"rekonect": driver},
                                    delivery_concurrency=concurrency, delivery_round=round_) as engine:
            queue(engine, txs)
            started = time.perf_counter()
            delivered = await engine.deliver_pending()
            elapsed = time.perf_counter() - started
            if delivered != len(txs):
                raise RuntimeError(f"the engine delivered {delivered} of {len(txs)}")
            return elapsed

    return asyncio.run(drain())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000, help="deliveries per contender and pass")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--round", type=int, default=100, help="deliveries one engine round claims")
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()
    n, concurrency = args.n, args.concurrency
    totals = {f"{kind} {flavour}": 0.0 for flavour in ("sync", "async") for kind in ("engine", "plain")}
    expected: set[str] = set()
    with tempfile.TemporaryDirectory() as directory, ServedSandbox() as sandbox:
        url = sandbox.base_url
        plain_async(plain_requests(url, purchases("warm-up", 200)), concurrency)  # connections, imports
        expected |= {tx.id for tx in purchases("warm-up", 200)}
        for number in range(args.passes):
            for flavour, plain, engine in (("sync", plain_sync, engine_sync), ("async", plain_async, engine_async)):
                # plain sends half before the engine's drain and half after: drift hits both alike
                batches = {"plain-a": purchases(f"{flavour}-plain-a-{number}", n // 2),
                           "engine": purchases(f"{flavour}-engine-{number}", n),
                           "plain-b": purchases(f"{flavour}-plain-b-{number}", n - n // 2)}
                for name, txs in batches.items():
                    if name.startswith("plain"):
                        elapsed = plain(plain_requests(url, txs), concurrency)
                    else:
                        elapsed = engine(os.path.join(directory, f"{flavour}-{name}-{number}.db"), url, txs,
                                         concurrency, args.round)
                    totals[f"{name.split('-')[0]} {flavour}"] += elapsed
                    expected |= {tx.id for tx in txs}
        ledger = sandbox.ledger()
    if set(ledger) != expected or set(ledger.values()) != {1}:
        raise SystemExit("the sandbox's ledger does not hold every purchase exactly once")

    sent = n * args.passes
    print(f"draining {n} queued deliveries (Rekonect submit, sandbox served on loopback in its own process),"
          f" concurrency {concurrency}, engine rounds of {args.round}, {args.passes} pass(es):")
    rows = []
    for flavour in ("sync", "async"):
        engine_rate = sent / totals[f"engine {flavour}"]
        plain_rate = sent / totals[f"plain {flavour}"]
        ratio = engine_rate / plain_rate
        rows.append(row("delivery", f"delivery drain ({flavour}): engine / plain httpx, throughput", ratio,
                        f">= {TARGET:.1f}", ratio >= TARGET, f"{engine_rate:.0f} vs {plain_rate:.0f} per s"))
    print(f"  sandbox ledger: {len(ledger)} purchases, each recorded exactly once")
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
