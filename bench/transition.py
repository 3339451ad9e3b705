"""The engine's cost of one durable transition, as ratios against baselines run alongside.

    python bench/transition.py [--n 6000] [--chunk 50]

One transition is ``begin_payment`` (a local event: no provider I/O): load the snapshot,
decide, compare-and-swap the snapshot and append the journal entry, in one SQLite
transaction with WAL and synchronous=FULL.  Baselines, on identical tables and pragmas:

- raw sqlite3: the same UPDATE + journal INSERT + COMMIT on the engine's own schema
  (same indexes and triggers) writing the same bytes, with no engine around it;
- transitions: load the row, restore a ``transitions.Machine`` at the stored state,
  trigger the event, commit the same UPDATE + INSERT (a hand-rolled engine).

Machines are noisy: the contenders run in alternating slices, so a disk hiccup hits all of
them alike, and the ratios are medians over slices.
Target: engine / raw <= 1.5.  The decision alone is compared with python-statemachine and
``transitions`` (one shared machine, ``add_model``: its idiomatic form).
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import time
from datetime import timedelta

from common import emit, interleave, median_ratio, per_item_ms, row

from txengine import Basket, Engine, FakeClock, LineItem, Money  # noqa: E402
from txengine.machine import PaymentLifecycle, TimerPolicy, decide  # noqa: E402
from txengine.store.sqlite import SQLiteStore  # noqa: E402
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox  # noqa: E402

BASKET = Basket([LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27),
                 LineItem(None, "Service fee", 1, Money(9, "EUR"), 27)])


def fresh_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}-{time.perf_counter_ns()}.db")


# The same lifecycle, declared for the ``transitions`` library.
TRANSITIONS_TABLE = [
    {"trigger": "begin_payment", "source": ["previewed", "updated"], "dest": "payment_pending"},
    {"trigger": "update", "source": ["previewed", "updated"], "dest": "updated"},
    {"trigger": "finalize", "source": ["previewed", "updated", "payment_pending"], "dest": "finalized"},
    {"trigger": "cancel", "source": ["previewed", "updated", "payment_pending"], "dest": "cancelled"},
    {"trigger": "refund", "source": "finalized", "dest": "refunded"},
    {"trigger": "expire", "source": ["previewed", "updated", "payment_pending"], "dest": "expired"},
]
STATES = ["previewed", "updated", "payment_pending", "finalized", "cancelled", "refunded", "expired"]


class EngineContender:
    """The engine, with ``n`` previewed transactions waiting for ``begin_payment``."""

    name = "engine"

    def __init__(self, directory: str, n: int) -> None:
        clock = FakeClock()
        sandbox = ReferenceSandbox(clock)
        driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
        self.engine_url = f"sqlite:///{fresh_path(directory, 'engine')}"
        self.engine = Engine.open(self.engine_url, providers={"reference": driver}, clock=clock)
        self.ids = [self.engine.preview("reference", BASKET).id for _ in range(n)]
        # one transition's bytes, for the baselines to write the same rows
        sample = self.engine.preview("reference", BASKET).id
        self.engine.begin_payment(sample)
        db = self.engine.store._connection()
        self.snapshot = db.execute("SELECT snapshot FROM transactions WHERE id = ?", (sample,)).fetchone()[0]
        self.event = db.execute("SELECT data FROM journal WHERE tx_id = ? AND seq = 2", (sample,)).fetchone()[0]
        # Opened again, as after a restart: the previews are not in its snapshot cache, so
        # every begin_payment loads and decodes its row (the cache never flatters the engine).
        self.engine.close()
        self.engine = Engine.open(self.engine_url, providers={"reference": driver}, clock=clock)

    def run(self, start: int, stop: int) -> None:
        for tx_id in self.ids[start:stop]:
            self.engine.begin_payment(tx_id)

    def close(self) -> None:
        self.engine.close()


class RawContender:
    """The same commit with bare sqlite3, on the engine's own schema (indexes, triggers)."""

    name = "raw sqlite3"

    def __init__(self, directory: str, ids: list[str], snapshot: str, event: str) -> None:
        path = fresh_path(directory, "raw")
        self.ids = ids
        SQLiteStore(path).close()
        self.snapshot, self.event = snapshot, event
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO transactions (id, provider, state, version, expires_at, snapshot, created_at,"
            " updated_at) VALUES (?, 'reference', 'previewed', 1, 600000000, ?, 0, 0)",
            [(tx_id, snapshot) for tx_id in ids])
        self.db.executemany("INSERT INTO journal VALUES (?, 1, 'transition', 0, ?)",
                            [(tx_id, event) for tx_id in ids])
        self.db.execute("COMMIT")

    def commit(self, tx_id: str, state: str, snapshot: str) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE transactions SET state = ?, version = 2, expires_at = 600000000,"
                   " refund_deadline = NULL, pending = NULL, snapshot = ?, updated_at = 1"
                   " WHERE id = ? AND version = 1", (state, snapshot, tx_id))
        db.execute("INSERT INTO journal VALUES (?, 2, 'transition', 1, ?)", (tx_id, self.event))
        db.execute("COMMIT")

    def run(self, start: int, stop: int) -> None:
        for tx_id in self.ids[start:stop]:
            self.commit(tx_id, "payment_pending", self.snapshot)

    def close(self) -> None:
        self.db.close()


class TransitionsContender(RawContender):
    """A hand-rolled engine on ``transitions``: load the row, restore a Machine at the stored
    state, trigger, commit the same bytes."""

    name = "transitions"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from transitions import Machine

        # transitions' idiomatic form: one shared machine, each restored model added to it
        self.machine = Machine(model=None, states=STATES, transitions=TRANSITIONS_TABLE,
                               initial="previewed", auto_transitions=False)

    def run(self, start: int, stop: int) -> None:
        class Payment:
            pass

        for tx_id in self.ids[start:stop]:
            state, stored = self.db.execute(
                "SELECT state, snapshot FROM transactions WHERE id = ?", (tx_id,)).fetchone()
            model = Payment()
            self.machine.add_model(model, initial=state)
            model.trigger("begin_payment")
            self.machine.remove_model(model)
            self.commit(tx_id, model.state, stored)


def machine_costs(n: int = 2000) -> dict[str, float]:
    """The decision alone, four ways (microseconds)."""
    from transitions import Machine

    from txengine.models import PricedLine, Transaction

    clock = FakeClock()
    now = clock.now()
    tx = Transaction(id="t", provider="p", state="previewed",
                     items=(PricedLine.unpriced(BASKET.items[0]),), currency="EUR",
                     expires_at=now + timedelta(minutes=10), created_at=now, updated_at=now)
    policy = TimerPolicy()

    class Model:
        state = "previewed"

    def per_call(function) -> float:
        started = time.perf_counter()
        for _ in range(n):
            function()
        return (time.perf_counter() - started) / n * 1e6

    model = Model()
    reused = PaymentLifecycle(model)

    def reused_send():
        model.state = "previewed"
        reused.send("begin_payment", tx=tx, now=now, policy=policy)

    shared = Machine(model=None, states=STATES, transitions=TRANSITIONS_TABLE, initial="previewed",
                     auto_transitions=False)

    def transitions_restore():
        payment = Model()
        shared.add_model(payment, initial="previewed")
        payment.trigger("begin_payment")
        shared.remove_model(payment)

    return {
        "compiled table decide": per_call(lambda: decide(tx, "begin_payment", now, policy)),
        "python-statemachine send (reused)": per_call(reused_send),
        "python-statemachine build": per_call(lambda: PaymentLifecycle(Model())),
        "transitions restore + trigger": per_call(transitions_restore),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000,
                        help="transitions per contender (the engine reopens after the previews: no snapshot is cached)")
    parser.add_argument("--chunk", type=int, default=50, help="transitions per timed slice")
    args = parser.parse_args()
    random.seed(11)
    with tempfile.TemporaryDirectory() as directory:
        engine = EngineContender(directory, args.n)
        random.shuffle(engine.ids)  # an order the snapshot cache does not favour
        # the baselines write the same rows under the same keys
        contenders = [engine, RawContender(directory, engine.ids, engine.snapshot, engine.event),
                      TransitionsContender(directory, engine.ids, engine.snapshot, engine.event)]
        slices = interleave({c.name: c.run for c in contenders}, args.n, args.chunk)
        for contender in contenders:
            contender.close()
    print(f"one durable local transition ({args.n} each, interleaved slices of {args.chunk},"
          " WAL + synchronous=FULL):")
    for name in slices:
        print(f"  {name:<14} {per_item_ms(slices, name, args.n) * 1e3:8.1f} us")
    vs_raw, vs_transitions = median_ratio(slices, "engine", "raw sqlite3"), median_ratio(slices, "engine", "transitions")
    costs = machine_costs()
    print("the decision alone:")
    for name, value in costs.items():
        print(f"  {name:<40} {value:8.1f} us")
    decide_us = costs["compiled table decide"]
    emit([
        row("transition", "one durable local transition: Engine / raw sqlite3", vs_raw, "<= 1.5", vs_raw <= 1.5,
            f"{per_item_ms(slices, 'engine', args.n) * 1e3:.0f} vs {per_item_ms(slices, 'raw sqlite3', args.n) * 1e3:.0f} us"),
        row("transition", "one durable local transition: Engine / transitions + sqlite3", vs_transitions, "-", None,
            f"{per_item_ms(slices, 'transitions', args.n) * 1e3:.0f} us"),
        row("decision", "decision: engine / python-statemachine send",
            decide_us / costs["python-statemachine send (reused)"], "< 1", decide_us < costs["python-statemachine send (reused)"],
            f"{decide_us:.1f} vs {costs['python-statemachine send (reused)']:.1f} us"),
        row("decision", "decision: engine / transitions restore + trigger (shared machine)",
            decide_us / costs["transitions restore + trigger"], "< 1", decide_us < costs["transitions restore + trigger"],
            f"{decide_us:.1f} vs {costs['transitions restore + trigger']:.1f} us"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
