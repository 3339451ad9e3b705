"""The background worker, in process on a FakeClock: what one iteration does, heartbeats,
JSON log lines without secrets, failures that do not stop it, a graceful stop, and the
operator commands (``txengine outbox``, ``txengine workers``)."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from txengine import Engine
from txengine.app.cli import main
from txengine.app.wiring import demo_providers, load_providers
from txengine.errors import OutcomeUnknown, ValidationError
from txengine.worker import JsonLines, Worker, configure_logging
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER


@pytest.fixture
def logs():
    stream = io.StringIO()
    handler = configure_logging("debug", stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logging.getLogger("txengine").removeHandler(handler)


def events(lines, name):
    return [line for line in lines if line.get("event") == name]  # library records carry no event


def backlog_of_every_kind(engine, sandbox, clock, basket):
    """An overdue preview, an in-doubt finalize and two queued receipts."""
    abandoned = engine.preview("reference", basket, customer_token=CUSTOMER)
    doubtful = engine.preview("reference", basket)
    sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(doubtful.id)
    paid = engine.finalize(engine.preview("reference", basket).id)
    clock.advance(minutes=11)
    return abandoned, doubtful, paid


def test_one_iteration_fires_timers_recovers_and_delivers(engine, sandbox, clock, basket, logs):
    abandoned, doubtful, paid = backlog_of_every_kind(engine, sandbox, clock, basket)
    worker = Worker(engine, interval=0)
    result = worker.run_once()
    assert (result.expired, result.recovered, result.delivered, result.errors) == (1, 1, 2, 0)
    assert result.busy
    assert engine.get(abandoned.id).state == "expired"
    assert engine.get(doubtful.id).state == "finalized"
    assert sandbox.receipts == {doubtful.provider_ref: 1, paid.provider_ref: 1}
    assert not worker.run_once().busy, "nothing left: the next one idles"
    lines = logs()
    assert [line["count"] for line in events(lines, "delivered")] == [2]
    assert events(lines, "heartbeat")[0]["backlog"] == {"pending": 0, "dead": 0, "in_doubt": 0, "stuck": 0}


def test_run_beats_on_its_cadence_and_ends_stopped(engine, clock, logs):
    worker = Worker(engine, interval=0, heartbeat_every=timedelta(seconds=30), worker_id="w-1")
    ticks = iter(range(100))
    engine_expire = engine.expire_due

    def expire_and_tick():
        clock.advance(seconds=10) if next(ticks) else None
        return engine_expire()

    engine.expire_due = expire_and_tick
    worker.run(iterations=7)  # 60 s pass on the fake clock
    beats = events(logs(), "heartbeat")
    assert [beat["status"] for beat in beats] == ["running", "running", "running", "stopped"]
    [row] = engine.store.workers()
    assert (row.id, row.status, row.iterations) == ("w-1", "stopped", 7)
    assert row.stopped_at == clock.now() and row.heartbeat_at == clock.now()


def test_a_failing_step_is_logged_and_the_others_still_run(engine, sandbox, clock, basket, logs):
    paid = engine.finalize(engine.preview("reference", basket).id)

    def broken(*args):
        raise sqlite3.OperationalError("database is locked")

    engine.store.intents_to_recover = broken
    result = Worker(engine, interval=0).run_once()
    assert (result.recovered, result.delivered, result.errors, result.busy) == (0, 1, 1, False)
    [failure] = events(logs(), "step_failed")
    assert failure["step"] == "recovered" and failure["error"] == "database is locked"
    assert failure["level"] == "error"
    assert sandbox.receipts == {paid.provider_ref: 1}


def test_an_unknown_error_is_logged_by_its_type_only(engine, logs):
    def leaky(*args):
        raise RuntimeError(f"customer {CUSTOMER} with key {ReferenceSandbox.api_key}")

    engine.store.due_for_expiry = leaky
    Worker(engine, interval=0).run_once()
    [failure] = events(logs(), "step_failed")
    assert failure["error_type"] == "RuntimeError" and "error" not in failure


def test_logs_never_carry_secrets(db_url, sandbox, clock, basket, logs):
    driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        backlog_of_every_kind(engine, sandbox, clock, basket)
        sandbox.faults.inject("receipt", Fault.SERVER_ERROR, times=3)
        worker = Worker(engine, interval=0)
        worker.run(iterations=3)
    text = json.dumps(logs())
    assert CUSTOMER not in text and ReferenceSandbox.api_key not in text


def test_stop_finishes_in_flight_sends_and_releases_the_rest(db_url, basket, sandbox, clock, logs):
    setup = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    with Engine.open(db_url, providers={"reference": setup}, clock=clock) as engine:
        txs = [engine.finalize(engine.preview("reference", basket).id) for _ in range(5)]
    workers = []

    def sigterm_during_the_first_send(request):
        workers[0].stop("SIGTERM")
        return sandbox._handle_httpx(request)

    driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key,
                             transport=httpx.MockTransport(sigterm_during_the_first_send))
    with Engine.open(db_url, providers={"reference": driver}, clock=clock, delivery_concurrency=1) as engine:
        worker = Worker(engine, interval=0)
        workers.append(worker)
        worker.run()  # no iteration limit: only the stop ends it
        rows = [engine.get(tx.id).deliveries[0] for tx in txs]
        assert sorted((r.status, r.attempts) for r in rows) == [("delivered", 1)] + [("pending", 0)] * 4
        with sqlite3.connect(engine.store.path) as db:
            assert db.execute("SELECT count(*) FROM outbox WHERE lease_owner IS NOT NULL").fetchone()[0] == 0
        assert engine.store.workers()[0].status == "stopped"
    assert [line["reason"] for line in events(logs(), "stopping")] == ["SIGTERM"]


class TestConfiguration:
    def test_providers_come_from_a_module_function(self):
        providers = load_providers("txengine.app.wiring:demo_providers")
        assert set(providers) == {"reference", "cheers", "rekonect", "forloy", "secuconnect"}
        assert providers["forloy"].offline, "the demo's Forloy stores and forwards"

    @pytest.mark.parametrize("spec", ["txengine.worker", "no.such.module:f", "txengine.worker:nothing",
                                      "txengine.worker:configure_logging", "txengine.app.wiring:load_providers"])
    def test_a_bad_spec_is_refused_with_a_validation_error(self, spec):
        with pytest.raises(ValidationError):
            load_providers(spec)

    def test_a_factory_in_the_current_directory_is_found(self, tmp_path, monkeypatch):
        (tmp_path / "pos_providers_here.py").write_text(
            "from txengine.app.wiring import demo_providers\n"
            "def providers():\n    return demo_providers()\n")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
        assert "cheers" in load_providers("pos_providers_here:providers")

    def test_the_demo_providers_drive_a_session(self, db_url, clock, basket):
        with Engine.open(db_url, providers=demo_providers(clock), clock=clock) as engine:
            tx = engine.finalize(engine.preview("rekonect", basket).id)
            assert Worker(engine, interval=0).run_once().delivered == 1
            assert engine.get(tx.id).deliveries[0].status == "delivered"

    def test_the_json_formatter_writes_one_object_per_line(self):
        record = logging.LogRecord("txengine.worker", logging.INFO, __file__, 1, "heartbeat", (), None)
        record.fields = {"event": "heartbeat", "backlog": {"dead": 1}}
        line = JsonLines().format(record)
        assert "\n" not in line and json.loads(line)["backlog"] == {"dead": 1}


class TestOperatorCommands:
    def test_outbox_list_shows_dead_first_and_retry_requeues(self, engine, basket, sandbox, clock, capsys):
        dead_tx = engine.finalize(engine.preview("reference", basket).id)
        preview = sandbox.previews.pop(dead_tx.provider_ref)  # the provider lost it: 404, refused
        assert engine.deliver_pending() == 0
        pending_tx = engine.finalize(engine.preview("reference", basket).id)
        [dead] = engine.deliveries(dead_tx.id)
        path = engine.store.path

        assert main(["outbox", "list", "--db", path]) == 0
        out = capsys.readouterr().out
        assert out.index(f"{dead.id} dead") < out.index(pending_tx.id), "dead first"
        assert "[NOT_FOUND]" in out
        assert out.splitlines()[-1].startswith("pending 1, dead 1")

        assert main(["outbox", "list", "--db", path, "--status", "dead", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(d["id"], d["status"]) for d in listed["deliveries"]] == [(dead.id, "dead")]
        assert "[NOT_FOUND]" in listed["deliveries"][0]["last_error"]

        sandbox.previews[preview.id] = preview  # the provider fixed it: the operator re-queues
        assert main(["outbox", "retry", str(dead.id), "--db", path]) == 0
        assert main(["outbox", "retry", str(dead.id), "--db", path]) == 1, "no longer dead"
        assert main(["outbox", "retry", "--all-dead", "--db", path]) == 1, "nothing dead: nothing to do"
        assert "re-queued 0 dead" in capsys.readouterr().out
        assert main(["outbox", "retry", "--db", path]) == 2
        clock.set(datetime.now(timezone.utc))  # the command line re-queues on the wall clock
        assert engine.deliver_pending() == 2
        assert sandbox.receipts == {dead_tx.provider_ref: 1, pending_tx.provider_ref: 1}

    def test_show_tells_what_is_in_doubt_and_what_is_queued(self, engine, basket, sandbox, capsys):
        tx = engine.preview("reference", basket)
        sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id, idempotency_key="till-1-fin")
        assert main(["show", tx.id, "--db", engine.store.path]) == 0
        out = capsys.readouterr().out
        assert "in doubt: finalize under key 'till-1-fin', 1 attempt(s), last error: HTTP 503" in out
        engine.recover()
        assert main(["show", tx.id, "--db", engine.store.path]) == 0
        assert "#1 receipt: pending, 0 attempt(s), next" in capsys.readouterr().out

    def test_workers_lists_heartbeats(self, engine, capsys):
        Worker(engine, interval=0, worker_id="till-backend-1").run(iterations=1)
        assert main(["workers", "--db", engine.store.path]) == 0
        assert "till-backend-1" in capsys.readouterr().out

    def test_commands_refuse_a_missing_database(self, tmp_path, capsys):
        assert main(["outbox", "list", "--db", str(tmp_path / "typo.db")]) == 2
        assert "no database at" in capsys.readouterr().err
        assert not (tmp_path / "typo.db").exists()

