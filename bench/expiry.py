"""The expiry sweep: flat in what is stored, linear in what is due.

    python bench/expiry.py [--stored 1000000] [--due 10000] [--linear 1000,10000,100000]

A store is filled with real engine rows: one previewed transaction is made through the
engine (reference provider), and its rows (snapshot, journal, indexes) are cloned under
fresh random ids, some with the preview deadline passed, the rest still open.  Each
sweep then runs in a fresh process (``expire_due()`` until nothing is due) so its peak
memory is its own.

Rows: the same number due among ``stored`` and among twice as many (time and peak
memory: target flat, within 1.2x), and 1,000 / 10,000 / 100,000 due (target: linear in
the due count, and 10,000 due in under 0.5 s, each expiry journaled).  The 10,000-due
sweep is also run by hand on a copy of the same file (``sweep_by_hand``: the same
statements and guarantees in bare sqlite3), so the absolute time has a baseline from the
same machine and minute beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

from common import emit, row, timed_sweep

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.store.sqlite import _ACTIVE_SQL, _EPOCH
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


def sweep_by_hand(path: str, batch: int = 500) -> dict[str, float]:
    """The baseline: the same sweep written by hand with sqlite3, with the engine's
    guarantees (each expiry compare-and-swapped on its version and journaled, a batch
    per synchronous=FULL commit) and the engine's statements, set-wise: read the due
    rows' columns, set the snapshot's head fields in place (json_set), append the
    journal entries."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    now = FakeClock().now() + SWEEP_AT
    now_us = int(now.timestamp() * 1_000_000)
    began, expired = time.perf_counter(), 0
    while due := db.execute(
            "SELECT id, state, version, updated_at FROM transactions INDEXED BY transactions_due"
            f" WHERE state IN ({_ACTIVE_SQL}) AND pending IS NULL AND expires_at <= ?"
            " AND provider = 'reference' ORDER BY expires_at LIMIT ?", (now_us, batch)).fetchall():
        swaps, entries = [], []
        for tx_id, state, version, updated_at in due:
            at_us = max(now_us, updated_at)
            at = (_EPOCH + timedelta(microseconds=at_us)).isoformat()
            swaps.append((version + 1, at, version + 1, at_us, tx_id, version))
            entries.append((tx_id, version + 1, "transition", at_us, json.dumps(
                {"event": "expire", "set": {}, "source": state, "target": "expired"},
                separators=(",", ":"), sort_keys=True)))
        db.execute("BEGIN IMMEDIATE")
        current = dict(db.execute(f"SELECT id, version FROM transactions WHERE id IN ({', '.join('?' * len(due))})",
                                  [row[0] for row in due]))
        swaps = [swap for swap in swaps if current.get(swap[4]) == swap[5]]
        db.executemany("UPDATE transactions SET state = 'expired', version = ?, snapshot = json_set(snapshot,"
                       " '$.state', 'expired', '$.version', ?, '$.updated_at', ?), updated_at = ?"
                       " WHERE id = ? AND version = ?", [(v, v, at, at_us, i, old) for v, at, _, at_us, i, old in swaps])
        db.executemany("INSERT INTO journal (tx_id, seq, kind, at, data) VALUES (?, ?, ?, ?, ?)", entries)
        db.execute("COMMIT")
        expired += len(swaps)
    seconds = time.perf_counter() - began
    db.close()
    return {"expired": expired, "seconds": seconds}


def measure(directory: str, stored: int, due: int, by_hand: bool = False) -> dict[str, float]:
    """The engine's sweep in a fresh process (and, ``by_hand``, the baseline's on a copy
    of the same file, in another)."""
    path = os.path.join(directory, f"expiry-{stored}-{due}.db")
    began = time.perf_counter()
    fill(path, stored, due)
    print(f"  filled {stored:,} stored, {due:,} due in {time.perf_counter() - began:.0f} s", flush=True)
    copy = path + ".by-hand"
    if by_hand:
        shutil.copyfile(path, copy)
    result = subprocess.run([sys.executable, __file__, "--sweep", path], capture_output=True, text=True, check=True)
    os.remove(path)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  swept: {measured['expired']:,} expired in {measured['seconds']:.2f} s,"
          f" peak +{measured['peak_mib']:.1f} MiB", flush=True)
    if by_hand:
        result = subprocess.run([sys.executable, __file__, "--by-hand", copy], capture_output=True, text=True,
                                check=True)
        os.remove(copy)
        hand = json.loads(result.stdout.strip().splitlines()[-1])
        assert hand["expired"] == due, hand
        measured["by_hand_seconds"] = hand["seconds"]
        print(f"  by hand: {hand['expired']:,} expired in {hand['seconds']:.2f} s", flush=True)
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--linear", default="1000,10000,100000", help="due counts for the linearity rows")
    parser.add_argument("--linear-stored", type=int, default=200_000, help="stored rows for the linearity rows")
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    parser.add_argument("--by-hand", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep:
        print(json.dumps(sweep(args.sweep)))
        return 0
    if args.by_hand:
        print(json.dumps(sweep_by_hand(args.by_hand)))
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
            result = measure(directory, max(args.linear_stored, count + 1), count, by_hand=count == 10_000)
            assert result["expired"] == count == result["journaled"], result
            per_row[count] = result["seconds"] / count
            if count == 10_000:
                rows.append(row("expiry", "expire_due 10,000 due: seconds (absolute target)", None, "< 0.5 s",
                                result["seconds"] < 0.5, f"{result['seconds']:.2f} s"))
                by_hand = result["seconds"] / result["by_hand_seconds"]
                rows.append(row("expiry", "expire_due 10,000 due: engine / the same sweep by hand", by_hand, "-",
                                None, f"{result['seconds']:.2f} s vs {result['by_hand_seconds']:.2f} s"))
        smallest, largest = counts[0], counts[-1]
        linearity = per_row[largest] / per_row[smallest]
        rows.append(row("expiry", f"expire_due per due row: {largest:,} / {smallest:,} due", linearity, "<= 1.2",
                        linearity <= 1.2, f"{per_row[smallest] * 1e6:.0f} vs {per_row[largest] * 1e6:.0f} us per row"))
    emit(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
