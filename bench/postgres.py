"""The PostgreSQL store beside SQLite: processes, the expiry sweep at scale, the outbox.

    python bench/postgres.py [--seconds 5] [--stored 1000000,2000000] [--due 10000]
                             [--deliveries 4000] [--only lifecycles,expiry,delivery]

Starts a throwaway PostgreSQL server (tests/pg_server.py: initdb into a temporary
directory, loopback port) and prints three tables as ratios measured in this run:

- lifecycles/s (preview, begin_payment, finalize) with 1, 2, 4 and 8 POS processes on
  one database, PostgreSQL beside one SQLite file; ratios against 1 process on each.
- expire_due() over ``--stored`` previewed transactions of which ``--due`` are past
  their deadline: time and peak memory of the sweeping process (a fresh one per run);
  the 2,000,000 row against the 1,000,000 one (target flat: within 1.2x).
- draining ``--deliveries`` pending outbox rows with 1, 2 and 4 worker processes
  (FOR UPDATE SKIP LOCKED); ratios against 1 worker; every delivery sent once.

The server runs with fsync off (a benchmark cluster need not survive a power cut), so
these numbers measure the engine's and the server's work, not the disk's flushes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

from common import emit, row, timed_sweep

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from txengine import Basket, Engine, FakeClock, LineItem, Money  # noqa: E402
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox  # noqa: E402

BASKET = Basket([LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27)])
SWEEP_AT = timedelta(minutes=30)  # past the due template's deadline, before the open one's


def _engine(url: str, clock: FakeClock) -> Engine:
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, environment="sandbox",
                             transport=ReferenceSandbox(clock).transport())
    return Engine.open(url, providers={"reference": driver}, clock=clock)


# --- lifecycles/s with N processes ---------------------------------------------------------------


def _pos_process(url: str, seconds: float, start, results) -> None:
    clock = FakeClock()
    with _engine(url, clock) as engine:
        start.wait()
        done, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            tx = engine.preview("reference", BASKET)
            engine.begin_payment(tx.id)
            engine.finalize(tx.id)
            done += 1
    results.put(done)


def lifecycles_per_second(url: str, processes: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    children = [context.Process(target=_pos_process, args=(url, seconds, start, results))
                for _ in range(processes)]
    for child in children:
        child.start()
    time.sleep(2)  # let every process import and connect before the clock starts
    start.set()
    done = sum(results.get(timeout=seconds + 120) for _ in children)
    for child in children:
        child.join(30)
    return done / seconds


def bench_lifecycles(server, seconds: float) -> list[dict]:
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as directory:
        for store in ("sqlite", "postgres"):
            for processes in (1, 2, 4, 8):
                url = (server.url(server.new_database()) if store == "postgres"
                       else f"sqlite:///{directory}/lifecycles-{processes}.db")
                rates[store, processes] = lifecycles_per_second(url, processes, seconds)
                print(f"  {store:<8} {processes} processes: {rates[store, processes]:8.1f} lifecycles/s", flush=True)
    for store in ("sqlite", "postgres"):
        for processes in (2, 4, 8):
            ratio = rates[store, processes] / rates[store, 1]
            rows.append(row("postgres", f"{store}: {processes} processes / 1", ratio, "> 1 (scales)", ratio > 1,
                            f"{rates[store, processes]:.0f} vs {rates[store, 1]:.0f} lifecycles/s"))
    for processes in (1, 2, 4, 8):
        ratio = rates["postgres", processes] / rates["sqlite", processes]
        rows.append(row("postgres", f"postgres / sqlite at {processes} processes", ratio, "info", None,
                        f"{rates['postgres', processes]:.0f} vs {rates['sqlite', processes]:.0f} lifecycles/s"))
    return rows


# --- the expiry sweep over millions of stored rows -----------------------------------------------


def fill(url: str, stored: int, due: int) -> None:
    """``stored`` previewed transactions, ``due`` of them past their deadline at SWEEP_AT:
    two real engine rows cloned in SQL under fresh ids (snapshot, journal, indexes)."""
    import psycopg

    clock = FakeClock()
    with _engine(url, clock) as engine:
        due_template = engine.preview("reference", BASKET).id
        clock.advance(timedelta(hours=1))
        open_template = engine.preview("reference", BASKET).id
    with psycopg.connect(url, autocommit=True) as db:
        for template, count in ((due_template, due - 1), (open_template, stored - due - 1)):
            for table, id_column in (("transactions", "id"), ("journal", "tx_id")):
                columns = [c for (c,) in db.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                    " ORDER BY ordinal_position", (table,))]
                chosen = ", ".join(
                    f"replace({c}, %(template)s, 'tx_' || md5(%(template)s || n::text))" if c in (id_column, "snapshot")
                    else c for c in columns)
                db.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {chosen}"
                           f" FROM {table}, generate_series(1, %(count)s) AS n WHERE {id_column} = %(template)s",
                           {"template": template, "count": count})
        db.execute("VACUUM ANALYZE")


def sweep(url: str) -> dict[str, float]:
    """In this process: open the engine at SWEEP_AT and expire everything due."""
    clock = FakeClock()
    clock.advance(SWEEP_AT)
    with _engine(url, clock) as engine:
        return timed_sweep(engine)


def bench_expiry(server, stored_counts: list[int], due: int) -> list[dict]:
    measured = {}
    for stored in stored_counts:
        url = server.url(server.new_database())
        began = time.perf_counter()
        fill(url, stored, due)
        print(f"  filled {stored:,} stored, {due:,} due in {time.perf_counter() - began:.0f} s", flush=True)
        result = subprocess.run([sys.executable, __file__, "--sweep", url], capture_output=True, text=True,
                                check=True)
        measured[stored] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  swept: {measured[stored]['expired']:,} expired in {measured[stored]['seconds']:.2f} s,"
              f" peak +{measured[stored]['peak_mib']:.1f} MiB", flush=True)
    rows = []
    base = stored_counts[0]
    for stored in stored_counts:
        m = measured[stored]
        rows.append(row("postgres", f"expire_due: {due:,} due of {stored:,} stored", None, "info",
                        m["expired"] == due, f"{m['seconds']:.2f} s, peak +{m['peak_mib']:.1f} MiB,"
                        f" {m['expired']:,} expired"))
    for stored in stored_counts[1:]:
        time_ratio = measured[stored]["seconds"] / measured[base]["seconds"]
        memory_ratio = (measured[stored]["peak_mib"] + 1) / (measured[base]["peak_mib"] + 1)
        rows.append(row("postgres", f"expire_due time: {stored:,} / {base:,} stored", time_ratio, "<= 1.2x",
                        time_ratio <= 1.2, "flat in what is stored"))
        rows.append(row("postgres", f"expire_due peak memory: {stored:,} / {base:,} stored", memory_ratio,
                        "<= 1.2x", memory_ratio <= 1.2, "(+1 MiB each side)"))
    return rows


# --- draining one outbox with N workers ----------------------------------------------------------


def _worker(url: str, base_url: str, start, results) -> None:
    clock = FakeClock()
    clock.advance(timedelta(minutes=1))
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=base_url)
    with Engine.open(url, providers={"reference": driver}, clock=clock) as engine:
        start.wait()
        results.put(engine.deliver_pending())


def queue_deliveries(url: str, sandbox: ReferenceSandbox, count: int) -> None:
    """``count`` pending receipts: one real finalized transaction's row cloned in SQL."""
    import psycopg

    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, environment="sandbox", transport=sandbox.transport())
    with Engine.open(url, providers={"reference": driver}, clock=sandbox.clock) as engine:
        tx = engine.finalize(engine.preview("reference", BASKET).id)
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "INSERT INTO outbox (tx_id, provider, kind, payload, idempotency_key, status, attempts,"
            " next_attempt_at, created_at) SELECT tx_id, provider, kind, payload, idempotency_key || ':' || n,"
            " status, attempts, next_attempt_at, created_at FROM outbox, generate_series(1, %s) AS n"
            " WHERE tx_id = %s", (count - 1, tx.id))


def bench_delivery(server, count: int) -> list[dict]:
    """Workers in their own processes, one provider sandbox served on loopback."""
    from txengine.testing.sandbox import serve

    context = multiprocessing.get_context("spawn")
    seconds = {}
    for workers in (1, 2, 4):
        url = server.url(server.new_database())
        sandbox = ReferenceSandbox(FakeClock())
        queue_deliveries(url, sandbox, count)
        with serve(sandbox) as served:
            start, results = context.Event(), context.Queue()
            children = [context.Process(target=_worker, args=(url, served.base_url, start, results))
                        for _ in range(workers)]
            for child in children:
                child.start()
            time.sleep(2)
            began = time.perf_counter()
            start.set()
            delivered = sum(results.get(timeout=600) for _ in children)
            seconds[workers] = time.perf_counter() - began
            for child in children:
                child.join(30)
        keys = [r.header("idempotency-key") for r in sandbox.requests if r.path == "/receipts"]
        assert delivered == count == len(keys) == len(set(keys)), ("not each sent once", delivered, len(keys))
        print(f"  {workers} workers: {count:,} deliveries in {seconds[workers]:.2f} s"
              f" ({count / seconds[workers]:.0f}/s), each sent once", flush=True)
    return [row("postgres", f"delivery drain: {workers} workers / 1", seconds[1] / seconds[workers], "> 1 (scales)",
                seconds[1] / seconds[workers] > 1, f"{count / seconds[workers]:.0f} vs {count / seconds[1]:.0f}/s")
            for workers in (2, 4)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--stored", default="1000000,2000000")
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--deliveries", type=int, default=4_000)
    parser.add_argument("--only", default="lifecycles,expiry,delivery")
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep:
        print(json.dumps(sweep(args.sweep)))
        return 0

    from tests.pg_server import PostgresServer

    server = PostgresServer()
    server.start()
    server.prepare_template()
    rows: list[dict] = []
    try:
        parts = args.only.split(",")
        if "lifecycles" in parts:
            print("lifecycles/s with N processes:", flush=True)
            rows += bench_lifecycles(server, args.seconds)
        if "expiry" in parts:
            print("expire_due at scale:", flush=True)
            rows += bench_expiry(server, [int(n) for n in args.stored.split(",")], args.due)
        if "delivery" in parts:
            print("delivery drain:", flush=True)
            rows += bench_delivery(server, args.deliveries)
    finally:
        server.destroy()
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
