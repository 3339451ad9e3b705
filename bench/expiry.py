"""The expiry sweep: flat in what is stored, linear in what is due.

    python bench/expiry.py [--stored 1000000] [--due 10000] [--linear 1000,10000,100000]

A store is filled with real engine rows: one previewed transaction is made through the
engine (reference provider), and its rows (snapshot, journal, indexes) are cloned under
fresh random ids, some with the preview deadline passed, the rest still open.  Each
sweep then runs in a fresh process (``expire_due()`` until nothing is due) so its peak
memory is its own.

Rows: the same number due among ``stored`` and among twice as many (time and peak
memory: target flat, within 1.2x), and 1,000 / 10,000 / 100,000 due (target: linear in
the due count, and 10,000 due in under 0.5 s, each expiry journaled).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

from common import emit, row, timed_sweep

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox

BASKET = Basket([LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27)])
SWEEP_AT = timedelta(minutes=30)  # after the due template's deadline, before the open one's


def _engine(path: str, clock: FakeClock) -> Engine:
    sandbox = ReferenceSandbox(clock)
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, environment="sandbox", transport=sandbox.transport())
    return Engine.open(f"sqlite:///{path}", providers={"reference": driver}, clock=clock)


def fill(path: str, stored: int, due: int, batch: int = 50_000) -> None:
    """``stored`` transactions, ``due`` of them previews past their deadline at SWEEP_AT.

    Rows are cloned under the ids the engine itself gives (``tx_`` + 48 bits of
    milliseconds + 80 random bits, time-ordered like UUIDv7), in the order a till would
    have made them: the due previews interleaved one for one with transactions of the
    same minutes that were finalized (a sweep rewrites rows among others, not a
    contiguous run), then the previews still open.
    """
    clock = FakeClock()
    with _engine(path, clock) as engine:
        due_template = engine.preview("reference", BASKET).id
        finished_template = engine.preview("reference", BASKET).id
        engine.begin_payment(finished_template)
        engine.finalize(finished_template)
        clock.advance(timedelta(hours=1))
        open_template = engine.preview("reference", BASKET).id
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")  # filling only: the sweep runs with the engine's own settings
    tables = {name: [column[1] for column in db.execute(f"PRAGMA table_info({name})")]
              for name in ("transactions", "journal")}
    templates = {
        template: {table: db.execute(f"SELECT * FROM {table} WHERE {column} = ?", (template,)).fetchall()
                   for table, column in (("transactions", "id"), ("journal", "tx_id"))}
        for template in (due_template, finished_template, open_template)
    }

    def clone(template: str, millis: int) -> dict[str, list[tuple]]:
        new_id = f"tx_{millis:012x}{os.urandom(10).hex()}"  # what core._new_tx_id makes at that time
        return {table: [tuple(value.replace(template, new_id) if isinstance(value, str) else value
                              for value in values) for values in rows]
                for table, rows in templates[template].items()}

    # The three templates stay: one due, one finished, one open among the ``stored``.
    finished = max(0, min(due, stored - due) - 1)
    start = int(time.time() * 1000) - 86_400_000
    plan = ([(due_template, finished_template)[i % 2] for i in range(2 * finished)]
            + [due_template] * (due - 1 - finished) + [open_template] * (stored - due - finished - 2))
    pending: dict[str, list[tuple]] = {"transactions": [], "journal": []}
    for offset, template in enumerate(plan):
        for table, rows in clone(template, start + offset).items():
            pending[table].extend(rows)
        if len(pending["transactions"]) >= batch:
            _insert(db, tables, pending)
    _insert(db, tables, pending)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def _insert(db: sqlite3.Connection, tables: dict[str, list[str]], pending: dict[str, list[tuple]]) -> None:
    db.execute("BEGIN")
    for table, rows in pending.items():
        marks = ", ".join("?" * len(tables[table]))
        db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        rows.clear()
    db.execute("COMMIT")


def sweep(path: str) -> dict[str, float]:
    """In this process: open the engine at SWEEP_AT and expire everything due."""
    clock = FakeClock()
    clock.advance(SWEEP_AT)
    with _engine(path, clock) as engine:
        measured = timed_sweep(engine)
    journaled = sqlite3.connect(path).execute(
        "SELECT count(*) FROM journal WHERE data LIKE '%\"expire\"%'").fetchone()[0]
    return {**measured, "journaled": journaled}


def measure(directory: str, stored: int, due: int) -> dict[str, float]:
    path = os.path.join(directory, f"expiry-{stored}-{due}.db")
    began = time.perf_counter()
    fill(path, stored, due)
    print(f"  filled {stored:,} stored, {due:,} due in {time.perf_counter() - began:.0f} s", flush=True)
    result = subprocess.run([sys.executable, __file__, "--sweep", path], capture_output=True, text=True, check=True)
    os.remove(path)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  swept: {measured['expired']:,} expired in {measured['seconds']:.2f} s,"
          f" peak +{measured['peak_mib']:.1f} MiB", flush=True)
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--linear", default="1000,10000,100000", help="due counts for the linearity rows")
    parser.add_argument("--linear-stored", type=int, default=200_000, help="stored rows for the linearity rows")
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep:
        print(json.dumps(sweep(args.sweep)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TXENGINE_BENCH_DIR")) as directory:
        print(f"expire_due: {args.due:,} due among {args.stored:,} and among {2 * args.stored:,} stored")
        small = measure(directory, args.stored, args.due)
        large = measure(directory, 2 * args.stored, args.due)
        for result in (small, large):
            assert result["expired"] == args.due == result["journaled"], result
        time_ratio = large["seconds"] / small["seconds"]
        memory_ratio = max(large["peak_mib"], 1.0) / max(small["peak_mib"], 1.0)
        rows.append(row("expiry", f"expire_due {args.due:,} due: {2 * args.stored:,} / {args.stored:,} stored (time)",
                        time_ratio, "<= 1.2", time_ratio <= 1.2, f"{small['seconds']:.2f} s vs {large['seconds']:.2f} s"))
        rows.append(row("expiry", f"expire_due {args.due:,} due: {2 * args.stored:,} / {args.stored:,} stored (peak memory)",
                        memory_ratio, "<= 1.2", memory_ratio <= 1.2,
                        f"+{small['peak_mib']:.1f} MiB vs +{large['peak_mib']:.1f} MiB"))
        counts = [int(count) for count in args.linear.split(",")]
        print(f"expire_due linearity: {', '.join(f'{c:,}' for c in counts)} due among {args.linear_stored:,} stored")
        per_row = {}
        for count in counts:
            result = measure(directory, max(args.linear_stored, count + 1), count)
            assert result["expired"] == count == result["journaled"], result
            per_row[count] = result["seconds"] / count
            if count == 10_000:
                rows.append(row("expiry", "expire_due 10,000 due: seconds (absolute target)", None, "< 0.5 s",
                                result["seconds"] < 0.5, f"{result['seconds']:.2f} s"))
        smallest, largest = counts[0], counts[-1]
        linearity = per_row[largest] / per_row[smallest]
        rows.append(row("expiry", f"expire_due per due row: {largest:,} / {smallest:,} due", linearity, "<= 1.2",
                        linearity <= 1.2, f"{per_row[smallest] * 1e6:.0f} vs {per_row[largest] * 1e6:.0f} us per row"))
    emit(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
