"""Throughput as work is added: processes on one SQLite file, concurrent async lifecycles,
and one engine's memory over many lifecycles.

    python bench/scaling.py [--seconds 8] [--lifecycles 10000,100000]

- processes: 1, 2 and 4 POS processes, each with its own engine and in-process reference
  sandbox, run full lifecycles (preview, begin_payment, finalize) on ONE SQLite file for
  the same wall time.  Target: 2 processes at least 1.3x one.
- async: ``AsyncEngine`` at 1, 8 and 64 concurrent lifecycles in one process, against a
  sandbox that answers in 20 ms (the provider's latency dominates, as at a real till).
  Targets: concurrency helps (64 well above 1); and one async lifecycle with an instant
  sandbox at least 0.9x the sync engine's speed.
- memory: one engine's resident memory after the first and the last of ``--lifecycles``
  lifecycles (target flat: within 1.2x).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time

from common import current_rss_mib, emit, row

import httpx

from txengine import AsyncEngine, Basket, Engine, FakeClock, LineItem, Money
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox

BASKET = Basket([LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27)])


def _driver(sandbox: ReferenceSandbox, transport: httpx.AsyncBaseTransport | None = None) -> ReferenceDriver:
    return ReferenceDriver(api_key=ReferenceSandbox.api_key, environment="sandbox",
                           transport=sandbox.transport(), async_transport=transport)


def lifecycle(engine: Engine) -> None:
    tx = engine.preview("reference", BASKET)
    engine.begin_payment(tx.id)
    engine.finalize(tx.id)


# --- processes on one file -------------------------------------------------------------------------


def _pos_process(path: str, seconds: float, start, results) -> None:
    clock = FakeClock()
    with Engine.open(f"sqlite:///{path}", providers={"reference": _driver(ReferenceSandbox(clock))},
                     clock=clock) as engine:
        start.wait()
        done, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            lifecycle(engine)
            done += 1
    results.put(done)


def processes(directory: str, count: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    path = os.path.join(directory, f"shared-{count}.db")
    Engine.open(f"sqlite:///{path}", providers={"reference": _driver(ReferenceSandbox())}).close()
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_pos_process, args=(path, seconds, start, results)) for _ in range(count)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let every process import and open before the clock starts
    start.set()
    total = sum(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


# --- async concurrency ------------------------------------------------------------------------------


class Latency(httpx.AsyncBaseTransport):
    """The sandbox, answering after ``delay`` seconds (without holding the event loop)."""

    def __init__(self, sandbox: ReferenceSandbox, delay: float) -> None:
        self.inner, self.delay = sandbox.transport(), delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(self.delay)
        return await self.inner.handle_async_request(request)


async def _async_rate(path: str, concurrency: int, seconds: float, delay: float) -> float:
    sandbox = ReferenceSandbox(FakeClock())
    engine = AsyncEngine.open(f"sqlite:///{path}", providers={"reference": _driver(sandbox, Latency(sandbox, delay))},
                              clock=sandbox.clock)
    done = 0
    deadline = time.perf_counter() + seconds

    async def lane() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            tx = await engine.preview("reference", BASKET)
            await engine.begin_payment(tx.id)
            await engine.finalize(tx.id)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await engine.aclose()
    return done / elapsed


def sync_rate(path: str, seconds: float) -> float:
    clock = FakeClock()
    with Engine.open(f"sqlite:///{path}", providers={"reference": _driver(ReferenceSandbox(clock))},
                     clock=clock) as engine:
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            lifecycle(engine)
            done += 1
        return done / (time.perf_counter() - began)


# --- memory -----------------------------------------------------------------------------------------


def forget(sandbox: ReferenceSandbox) -> None:
    """The in-process sandbox keeps every request, preview and commit it saw (the tests
    read them); a real provider's memory is not the POS's.  Cleared after each
    lifecycle, so the process's memory is the engine's."""
    for record in (sandbox.requests, sandbox.previews, sandbox.commits, sandbox._replays):
        record.clear()


def memory(path: str, checkpoints: list[int]) -> dict[int, float]:
    clock = FakeClock()
    seen: dict[int, float] = {}
    sandbox = ReferenceSandbox(clock)
    with Engine.open(f"sqlite:///{path}", providers={"reference": _driver(sandbox)}, clock=clock) as engine:
        for done in range(1, checkpoints[-1] + 1):
            lifecycle(engine)
            forget(sandbox)
            if done in checkpoints:
                seen[done] = current_rss_mib()
                print(f"  after {done:,} lifecycles: RSS {seen[done]:.1f} MiB", flush=True)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="wall time per throughput measurement")
    parser.add_argument("--lifecycles", default="10000,100000", help="memory checkpoints")
    parser.add_argument("--parts", default="processes,async,memory",
                        help="which measurements to run (comma-separated), e.g. only processes while tuning")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        if "processes" in parts:
            rows += measure_processes(directory, args.seconds)
        if "async" in parts:
            rows += measure_async(directory, args.seconds)
        if "memory" in parts:
            rows += measure_memory(directory, [int(count) for count in args.lifecycles.split(",")])
    emit(rows)
    return 0


def measure_processes(directory: str, seconds: float) -> list[dict]:
    rows = []
    print("POS processes on one SQLite file (lifecycles per second, all processes together):")
    rates = {}
    for count in (1, 2, 4):
        rates[count] = processes(directory, count, seconds)
        print(f"  {count} process(es): {rates[count]:.0f}/s", flush=True)
    for count in (2, 4):
        target = ">= 1.3" if count == 2 else "-"
        rows.append(row("scaling", f"lifecycles/s, {count} processes / 1 process on one SQLite file",
                        rates[count] / rates[1], target,
                        rates[count] / rates[1] >= 1.3 if count == 2 else None,
                        f"{rates[count]:.0f} vs {rates[1]:.0f} per s"))
    return rows


def measure_async(directory: str, seconds: float) -> list[dict]:
    rows = []
    print("AsyncEngine, one process, a 20 ms provider (lifecycles per second):")
    async_rates = {}
    for concurrency in (1, 8, 64):
        path = os.path.join(directory, f"async-{concurrency}.db")
        async_rates[concurrency] = asyncio.run(_async_rate(path, concurrency, seconds, 0.020))
        print(f"  {concurrency} concurrent: {async_rates[concurrency]:.0f}/s", flush=True)
    for concurrency in (8, 64):
        gain = async_rates[concurrency] / async_rates[1]
        rows.append(row("scaling", f"AsyncEngine, 20 ms provider: {concurrency} concurrent / 1", gain, "> 1",
                        gain > 1, f"{async_rates[concurrency]:.0f} vs {async_rates[1]:.0f} per s"))
    one_async = asyncio.run(_async_rate(os.path.join(directory, "async-instant.db"), 1, seconds, 0.0))
    one_sync = sync_rate(os.path.join(directory, "sync-instant.db"), seconds)
    rows.append(row("scaling", "one lifecycle: AsyncEngine / Engine (instant provider)", one_async / one_sync,
                    ">= 0.9", one_async / one_sync >= 0.9, f"{one_async:.0f} vs {one_sync:.0f} per s"))
    return rows


def measure_memory(directory: str, checkpoints: list[int]) -> list[dict]:
    rows = []
    print(f"one engine's memory over {checkpoints[-1]:,} lifecycles:")
    seen = memory(os.path.join(directory, "memory.db"), checkpoints)
    growth = seen[checkpoints[-1]] / seen[checkpoints[0]]
    rows.append(row("memory", f"engine RSS after {checkpoints[-1]:,} / after {checkpoints[0]:,} lifecycles",
                    growth, "<= 1.2", growth <= 1.2,
                    f"{seen[checkpoints[0]]:.0f} vs {seen[checkpoints[-1]]:.0f} MiB"))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
