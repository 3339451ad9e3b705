"""``txengine worker`` as a real process: configured by ``--providers module:function``, it
drains the outbox against a sandbox served on loopback, and on SIGTERM lets its
in-flight sends finish, releases what it had claimed but not sent, marks itself stopped
and exits 0.  Its stderr is JSON lines."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from txengine import Engine, SystemClock
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import Fault, serve

REPO = Path(__file__).resolve().parent.parent
URL_VARIABLE = "TXENGINE_TEST_REFERENCE_URL"


def providers():
    """The worker's configuration, as a deployment would write it (credentials from its
    environment, never from the command line)."""
    return {"reference": ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=os.environ[URL_VARIABLE])}


def wait_for(predicate, timeout=15.0, what="the worker"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def receipt_keys(sandbox):
    return [r.header("idempotency-key") for r in list(sandbox.requests) if r.path == "/receipts"]


@pytest.mark.slow
def test_sigterm_finishes_in_flight_sends_releases_the_rest_and_exits_cleanly(tmp_path, basket):
    sandbox = ReferenceSandbox(SystemClock())
    db = tmp_path / "pos.db"
    with serve(sandbox) as served:
        driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=served.base_url)
        with Engine.open(f"sqlite:///{db}", providers={"reference": driver}) as engine:
            txs = [engine.finalize(engine.preview("reference", basket).id) for _ in range(8)]
        sandbox.faults.inject("receipt", Fault.SLOW, times=100, delay=0.5)  # each send takes 0.5 s

        worker = subprocess.Popen(
            [sys.executable, "-m", "txengine.cli", "worker", "--db", str(db), "--providers",
             "tests.test_worker_process:providers", "--concurrency", "2", "--interval", "0.05",
             "--heartbeat", "0.2"],
            cwd=REPO, env={**os.environ, URL_VARIABLE: served.base_url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_for(lambda: receipt_keys(sandbox), what="the first sends")
            worker.send_signal(signal.SIGTERM)
            _, stderr = worker.communicate(timeout=15)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == 0, stderr

        lines = [json.loads(line) for line in stderr.splitlines()]
        names = [line["event"] for line in lines]
        assert names[0] == "started" and names[-1] == "stopped"
        assert [line["reason"] for line in lines if line["event"] == "stopping"] == ["SIGTERM"]
        assert ReferenceSandbox.api_key not in stderr

        sent = receipt_keys(sandbox)
        with sqlite3.connect(db) as connection:
            rows = connection.execute(
                "SELECT idempotency_key, status, attempts, lease_owner FROM outbox ORDER BY id").fetchall()
            [status] = connection.execute("SELECT status FROM workers").fetchone()
        assert status == "stopped"
        assert all(owner is None for *_, owner in rows), "nothing left leased"
        delivered = {key for key, state, attempts, _ in rows if state == "delivered"}
        assert delivered == set(sent) and len(sent) == len(set(sent)), "each send finished and settled once"
        released = [(state, attempts) for key, state, attempts, _ in rows if key not in delivered]
        assert released and set(released) == {("pending", 0)}, "unsent ones released, no attempt counted"

        sandbox.faults.clear()
        with Engine.open(f"sqlite:///{db}", providers={"reference": driver}) as engine:
            assert engine.deliver_pending() == len(released)
    assert sandbox.receipts == {tx.provider_ref: 1 for tx in txs}
    assert sorted(receipt_keys(sandbox)) == sorted(f"{tx.id}:receipt" for tx in txs)


@pytest.mark.slow
def test_a_bad_provider_configuration_exits_2_with_a_json_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "txengine.cli", "worker", "--db", str(tmp_path / "x.db"),
         "--providers", "tests.test_worker_process:nothing", "--iterations", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    [line] = [json.loads(line) for line in result.stderr.splitlines()]
    assert line["event"] == "bad_configuration" and "nothing" in line["error"]


@pytest.mark.slow
def test_three_worker_processes_on_one_database_send_each_delivery_once(tmp_path, basket):
    sandbox = ReferenceSandbox(SystemClock())
    db = tmp_path / "pos.db"
    with serve(sandbox) as served:
        driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, base_url=served.base_url)
        with Engine.open(f"sqlite:///{db}", providers={"reference": driver}) as engine:
            txs = [engine.finalize(engine.preview("reference", basket).id) for _ in range(120)]
        workers = [subprocess.Popen(
            [sys.executable, "-m", "txengine.cli", "worker", "--db", str(db), "--providers",
             "tests.test_worker_process:providers", "--concurrency", "4", "--interval", "0.01",
             "--iterations", "40"],
            cwd=REPO, env={**os.environ, URL_VARIABLE: served.base_url},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ) for _ in range(3)]
        logs = [worker.communicate(timeout=60)[1] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0, 0], logs
    delivered = [sum(json.loads(line).get("count", 0) for line in log.splitlines()
                     if json.loads(line)["event"] == "delivered") for log in logs]
    assert sum(delivered) == 120, delivered
    print("deliveries per worker process:", delivered)
    keys = receipt_keys(sandbox)
    assert sorted(keys) == sorted(f"{tx.id}:receipt" for tx in txs), "each sent exactly once, by one worker"
    assert sandbox.receipts == {tx.provider_ref: 1 for tx in txs}
