"""Real processes sharing one PostgreSQL database.

Eight POS processes hammer a set of transactions with random finalize, cancel, refund
and update; afterwards every journal is a legal path, every provider commit happened
once, no update was lost and the sandbox ledger balances.  Then four worker processes
drain one shared outbox and sweep one set of due rows: every delivery sent once, every
due row expired once.

The sizes scale with TXENGINE_RACE_TRANSACTIONS (default 400 here, to fit `make test`
on two shared cores; the issue's 1,000 runs with TXENGINE_RACE_TRANSACTIONS=1000).
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections import Counter
from datetime import timedelta

import pytest

pytest.importorskip("psycopg")

from txengine import Engine, FakeClock, SystemClock  # noqa: E402
from txengine.errors import EngineError  # noqa: E402
from txengine.journal import TRANSITION, replay  # noqa: E402
from txengine.machine import ACTIVE, TABLE  # noqa: E402
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox  # noqa: E402
from txengine.testing.sandbox import serve  # noqa: E402

from .conftest import tip  # noqa: E402

TRANSACTIONS = int(os.environ.get("TXENGINE_RACE_TRANSACTIONS", "400"))
POS_PROCESSES, WORKER_PROCESSES = 8, 4
WALLET = 800
COMMANDS = ("finalize", "cancel", "refund", "update")


def _pos_process(url, base_url, tx_ids, seed, results):
    """One POS: random commands on random transactions; reports every update that succeeded."""
    rng = random.Random(seed)
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=base_url)
    updated, outcomes = [], Counter()
    with Engine.open(url, providers={"reference": driver}) as engine:
        for _ in range(len(tx_ids) * 3 // POS_PROCESSES + 1):
            tx_id, command = rng.choice(tx_ids), rng.choice(COMMANDS)
            try:
                if command == "update":
                    done = engine.update(tx_id, [tip(rng.randint(1, 99))])
                    updated.append((tx_id, done.version))
                else:
                    getattr(engine, command)(tx_id)
                outcomes[command] += 1
            except EngineError as refused:
                outcomes[type(refused).__name__] += 1
    results.put((updated, dict(outcomes)))


def _worker_process(url, base_url, clock_offset_minutes, results):
    """One worker whose clock is two days ahead (everything open is due), give or take minutes."""
    clock = FakeClock(SystemClock().now() + timedelta(days=2, minutes=clock_offset_minutes))
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=base_url)
    with Engine.open(url, providers={"reference": driver}, clock=clock) as engine:
        expired = engine.expire_due()
        delivered = engine.deliver_pending()
    results.put((expired, delivered))


def _run(context, target, argsets, timeout):
    results = context.Queue()
    children = [context.Process(target=target, args=(*args, results)) for args in argsets]
    for child in children:
        child.start()
    answers = [results.get(timeout=timeout) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    return answers


@pytest.mark.slow
def test_processes_hammering_one_database_leave_legal_journals_and_balanced_ledgers(pg_server, pg_database):
    url = pg_server.url(pg_database)
    sandbox = ReferenceSandbox(SystemClock())
    sandbox.set_discount("beer", 40)
    context = multiprocessing.get_context("spawn")
    from txengine import Basket, LineItem, Money

    basket = Basket([LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27)])
    with serve(sandbox) as served:
        driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=served.base_url)
        with Engine.open(url, providers={"reference": driver}) as engine:
            customers = {}
            for n in range(TRANSACTIONS):
                customer = f"customer-{n:05d}"
                sandbox.open_wallet(customer, WALLET)
                customers[engine.preview("reference", basket, customer_token=customer).id] = customer
        tx_ids = sorted(customers)

        answers = _run(context, _pos_process,
                       [(url, served.base_url, tx_ids, seed) for seed in range(POS_PROCESSES)], timeout=600)
        outcomes = sum((Counter(o) for _, o in answers), Counter())
        assert outcomes["finalize"] and outcomes["cancel"] and outcomes["update"], outcomes

        with Engine.open(url, providers={"reference": driver}) as engine:
            updates = Counter(tx_id for updated, _ in answers for tx_id, _ in updated)
            for tx_id, customer in customers.items():
                stored = engine.store.load(tx_id)
                history = engine.store.journal(tx_id)
                assert replay(history) == stored, "the snapshot is its journal replayed"
                for event in history[1:]:
                    if event.kind == TRANSITION:
                        assert (event.data["source"], event.data["event"]) in TABLE, "a legal path"
                tips = sum(1 for line in stored.items if line.name == "Tip")
                assert tips == updates[tx_id], "every acknowledged update is in the snapshot, none lost"
                commits = Counter(action for pv, action in sandbox.commits if pv == stored.provider_ref)
                assert commits["finalize"] == (1 if stored.state in ("finalized", "refunded") else 0)
                assert commits["refund"] == (1 if stored.state == "refunded" else 0)
                spent = WALLET - sandbox.balance(customer)
                assert spent == (WALLET if stored.state == "finalized" else 0), "the ledger balances"
            due = {tx_id for tx_id in tx_ids if engine.store.load(tx_id).state in ACTIVE
                   and engine.store.load(tx_id).pending is None}

        swept = _run(context, _worker_process,
                     [(url, served.base_url, offset) for offset in (0, 3, -4, 7)], timeout=600)
        with Engine.open(url, providers={"reference": driver}) as engine:
            expired = Counter(e.tx_id for tx_id in tx_ids for e in engine.store.journal(tx_id)
                              if e.kind == TRANSITION and e.data["event"] == "expire")
            missed = {tx_id: (tx.state, tx.pending, tx.expires_at) for tx_id in due - set(expired)
                      for tx in [engine.store.load(tx_id)]}
        assert not missed, missed
        assert set(expired) == due and set(expired.values()) <= {1}, "every due row expired once"
        assert sum(n for n, _ in swept) == len(due)
        with Engine.open(url, providers={"reference": driver}) as engine:
            queued = engine.store.deliveries()  # what the race and the sweep enqueued
        assert queued and {d.status for d in queued} == {"delivered"}
        assert sum(delivered for _, delivered in swept) == len(queued), "every delivery sent once"
        sends = Counter(r.header("idempotency-key") for r in sandbox.requests if r.path == "/receipts")
        assert len(sends) == len(queued) and set(sends.values()) == {1}
