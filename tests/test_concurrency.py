"""Two callers racing finalize and cancel on one transaction: exactly one provider call,
exactly one winner; with real threads, and with real processes on one SQLite file."""

import multiprocessing
import threading

import pytest

from txengine import Engine, SystemClock
from txengine.errors import ConcurrentModification, TransactionInDoubt
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import serve

from .conftest import CUSTOMER

LOSING = (ConcurrentModification, TransactionInDoubt)


def hold_after_load(store, barrier):
    """Make every caller wait, snapshot in hand, until all have loaded: a guaranteed race."""
    original = store.load
    held = threading.Semaphore(barrier.parties)  # only the racing loads wait; later reads do not

    def load(tx_id):
        snapshot = original(tx_id)
        if held.acquire(blocking=False):
            barrier.wait(timeout=10)
        return snapshot

    store.load = load


def commit_calls(sandbox, tx):
    return [r.path for r in sandbox.requests
            if r.path in (f"/previews/{tx.provider_ref}/finalize", f"/previews/{tx.provider_ref}/cancel")]


@pytest.mark.parametrize("round_", range(5))
def test_threads_racing_finalize_and_cancel(engine, basket, sandbox, round_):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    hold_after_load(engine.store, threading.Barrier(2))
    outcomes = {}

    def attempt(command):
        try:
            outcomes[command] = getattr(engine, command)(tx.id).state
        except LOSING as lost:
            outcomes[command] = type(lost).__name__

    threads = [threading.Thread(target=attempt, args=(c,)) for c in ("finalize", "cancel")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    winners = [state for state in outcomes.values() if state in ("finalized", "cancelled")]
    assert len(winners) == 1, outcomes
    assert len(commit_calls(sandbox, tx)) == 1
    final = engine.store.load(tx.id)
    assert final.state == winners[0]
    assert sandbox.balance(CUSTOMER) == (0 if final.state == "finalized" else 800)


def _race_child(db_path, base_url, tx_id, command, barrier, results):
    """One POS process: its own engine on the shared file, talking to the shared sandbox."""
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=base_url)
    with Engine.open(f"sqlite:///{db_path}", providers={"reference": driver}) as engine:
        hold_after_load(engine.store, barrier)
        try:
            results.put((command, engine.__getattribute__(command)(tx_id).state))
        except LOSING as lost:
            results.put((command, type(lost).__name__))


@pytest.mark.slow
def test_processes_racing_finalize_and_cancel_on_one_sqlite_file(tmp_path, basket):
    sandbox = ReferenceSandbox(SystemClock())
    sandbox.open_wallet(CUSTOMER, 800)
    sandbox.set_discount("beer", 40)
    db_path = tmp_path / "shared.db"
    context = multiprocessing.get_context("spawn")
    with serve(sandbox) as served:
        driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=served.base_url)
        with Engine.open(f"sqlite:///{db_path}", providers={"reference": driver}) as engine:
            tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        barrier, results = context.Barrier(2), context.Queue()
        children = [context.Process(target=_race_child,
                                    args=(db_path, served.base_url, tx.id, command, barrier, results))
                    for command in ("finalize", "cancel")]
        for child in children:
            child.start()
        outcomes = dict(results.get(timeout=60) for _ in children)
        for child in children:
            child.join(30)
            assert child.exitcode == 0
    winners = [state for state in outcomes.values() if state in ("finalized", "cancelled")]
    assert len(winners) == 1, outcomes
    assert len(commit_calls(sandbox, tx)) == 1


def test_a_writer_stopped_holding_the_writer_gate_holds_the_others_up_only_for_the_busy_timeout(
        tmp_path, driver, clock, basket):
    """A POS process frozen mid-write (SIGSTOP, a debugger) keeps the gate's flock; the
    other writers wait no longer than the busy timeout, then go on to SQLite, whose lock
    decides (here it is free, so the command goes through)."""
    import fcntl
    import os

    from txengine.store.sqlite import SQLiteStore

    path = str(tmp_path / "gate.db")
    engine = Engine(SQLiteStore(path, busy_timeout_ms=300), {"reference": driver}, clock)
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    frozen = os.open(path + "-writer", os.O_RDWR)  # another open file: another holder, like a process
    fcntl.flock(frozen, fcntl.LOCK_EX)
    done: list[object] = []
    writer = threading.Thread(target=lambda: done.append(engine.begin_payment(tx.id)), daemon=True)
    try:
        writer.start()
        writer.join(timeout=20)
        assert not writer.is_alive(), "the writer is still waiting for the stopped one's gate"
        assert [t.state for t in done] == ["payment_pending"]
    finally:
        fcntl.flock(frozen, fcntl.LOCK_UN)
        os.close(frozen)
        engine.close()
