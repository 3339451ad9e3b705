"""The operator's ``txengine``: every command's exit codes and ``--json``, the rule that no
command but ``migrate`` creates a database, read commands that never wait for the write
lock, a killed worker shown stale, and the metrics a platform team scrapes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from txengine import Engine, FakeClock
from txengine.app import demo
from txengine.app.cli import cli
from txengine.app.wiring import demo_providers
from txengine.errors import OutcomeUnknown, ProviderRejected
from txengine.providers.reference import ReferenceSandbox
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> str:
    """A database the demo filled: every provider, every end state."""
    db = str(tmp_path_factory.mktemp("demo") / "demo.db")
    assert demo.run(db, lambda line: None) == 0
    return db


def listed(db: str, *filters: str) -> dict:
    result = run("list", "--db", db, "--json", *filters)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- the basics ---------------------------------------------------------------------------------


def test_version_and_help_with_defaults():
    assert run("--version").output.startswith("txengine, version ")
    shown = run("list", "--help").output
    assert "default: txengine.db" in shown and "env var: TXENGINE_DB" in shown and "--json" in shown


def test_a_bad_option_is_a_usage_error():
    assert run("list", "--state", "paid").exit_code == 2
    assert run("list", "--due-before", "tomorrow", "--db", "x.db").exit_code == 2


# --- read commands and their JSON ------------------------------------------------------------------


def test_show_json_is_one_timeline_with_what_can_happen_next(demo_db):
    refunded = listed(demo_db, "--state", "refunded", "--provider", "secuconnect")["transactions"][0]
    result = run("show", refunded["id"], "--db", demo_db, "--json")
    assert result.exit_code == 0
    shown = json.loads(result.output)
    assert set(shown) == {"transaction", "timeline", "deliveries", "in_doubt", "next"}
    assert shown["transaction"]["state"] == "refunded" and shown["next"] == []
    assert [(e["kind"], e["event"]) for e in shown["timeline"]][-1] == ("transition", "refund")
    assert all(e["at"].endswith("+00:00") for e in shown["timeline"]), "one time format"
    text = run("show", refunded["id"], "--db", demo_db).output
    assert "timeline:" in text and "next: nothing: the transaction is final" in text and "None" not in text


def test_next_steps_are_what_the_provider_supports(demo_db):
    from txengine.app.cli import next_events
    from txengine.store import open_existing

    store = open_existing(demo_db, read_only=True)
    try:
        [forloy] = [store.load(t["id"]) for t in listed(demo_db, "--provider", "forloy")["transactions"]]
        member = store.load(listed(demo_db, "--provider", "rekonect", "--state", "finalized")["transactions"][0]["id"])
    finally:
        store.close()
    assert next_events(forloy, forloy.updated_at) == [], "Forloy offers no refund"
    assert next_events(member, member.updated_at) == ["refund"]


def test_show_of_an_unknown_transaction_exits_1(demo_db):
    result = run("show", "tx_nope", "--db", demo_db)
    assert result.exit_code == 1 and "no transaction tx_nope" in result.output


def test_list_filters_and_pages(demo_db):
    everything = listed(demo_db, "--limit", "100")
    assert everything["total"] == len(everything["transactions"]) >= 9
    assert set(everything["transactions"][0]) >= {"id", "provider", "state", "in_doubt", "to_pay", "currency",
                                                 "updated_at", "expires_at", "refund_deadline"}
    cheers = listed(demo_db, "--provider", "cheers")
    assert cheers["total"] >= 2 and {t["provider"] for t in cheers["transactions"]} == {"cheers"}
    finals = listed(demo_db, "--state", "finalized", "--state", "refunded")
    assert {t["state"] for t in finals["transactions"]} == {"finalized", "refunded"}
    first, second = listed(demo_db, "--limit", "2"), listed(demo_db, "--limit", "2", "--page", "2")
    assert len(first["transactions"]) == len(second["transactions"]) == 2
    assert not {t["id"] for t in first["transactions"]} & {t["id"] for t in second["transactions"]}
    assert listed(demo_db, "--in-doubt")["total"] == 0
    assert listed(demo_db, "--attention")["total"] == 0
    assert listed(demo_db, "--due-before", "2100-01-01")["total"] == 0, "the demo's sessions all ended"
    assert "no transactions match" in run("list", "--db", demo_db, "--in-doubt").output


def test_in_doubt_and_due_transactions_are_found(engine, sandbox, basket, clock):
    live = engine.preview("reference", basket, customer_token=CUSTOMER)
    doubtful = engine.preview("reference", basket)
    sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(doubtful.id)
    db = engine.store.path
    assert [t["id"] for t in listed(db, "--in-doubt")["transactions"]] == [doubtful.id]
    assert listed(db, "--attention")["total"] == 0, "recover() still re-sends it: no operator needed yet"
    due = (live.expires_at + timedelta(seconds=1)).isoformat()
    assert [t["id"] for t in listed(db, "--due-before", due)["transactions"]] == [live.id]
    shown = json.loads(run("show", doubtful.id, "--db", db, "--json").output)
    assert shown["in_doubt"]["event"] == "finalize" and shown["next"] == ["finalize"]


def test_workers_and_outbox_list_json(demo_db):
    workers = json.loads(run("workers", "--db", demo_db, "--json").output)
    assert workers == {"workers": []}
    assert "no worker has run" in run("workers", "--db", demo_db).output
    outbox = json.loads(run("outbox", "list", "--db", demo_db, "--json", "--status", "delivered").output)
    assert set(outbox) == {"deliveries", "backlog"} and outbox["deliveries"]
    assert set(outbox["deliveries"][0]) >= {"id", "tx_id", "provider", "kind", "status", "attempts", "last_error"}
    assert set(outbox["backlog"]) >= {"pending", "dead", "in_doubt"}


def test_read_commands_never_wait_for_the_write_lock(demo_db):
    busy = sqlite3.connect(demo_db, isolation_level=None)
    busy.execute("BEGIN IMMEDIATE")  # a POS in the middle of a commit
    try:
        started = time.monotonic()
        for command in (["list"], ["workers"], ["outbox", "list"]):
            assert run(*command, "--db", demo_db).exit_code == 0
        assert time.monotonic() - started < 5
    finally:
        busy.execute("ROLLBACK")
        busy.close()


def test_txengine_db_is_the_default_database(demo_db):
    result = CliRunner().invoke(cli, ["list", "--json"], env={"TXENGINE_DB": f"sqlite:///{demo_db}"})
    assert result.exit_code == 0 and json.loads(result.output)["total"] >= 9


# --- no command but migrate creates anything ---------------------------------------------------------

COMMANDS = [
    ["show", "tx_1"], ["list"], ["workers"], ["outbox", "list"], ["outbox", "retry", "--all-dead"],
    ["sweep", "--demo-sandboxes"], ["recover", "--demo-sandboxes"], ["diagram", "--tx", "tx_1"],
    ["worker", "--demo-sandboxes", "--iterations", "1"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("spelling", ["path", "url"])
def test_a_missing_database_is_one_line_and_never_created(tmp_path, command, spelling):
    typo = tmp_path / "typo.db"
    result = run(*command, "--db", str(typo) if spelling == "path" else f"sqlite:///{typo}")
    assert result.exit_code == 2, result.output
    assert "no database at" in result.output and len(result.output.strip().splitlines()) == 1
    assert not typo.exists()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_unmigrated_database_is_refused_untouched(tmp_path, command):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a file, but no txengine schema
    result = run(*command, "--db", str(empty))
    assert result.exit_code == 2 and f"{empty} is not a txengine database" in result.output
    tables = sqlite3.connect(empty).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [], "no schema was created"


def test_migrate_creates_and_the_others_then_work(tmp_path):
    db = tmp_path / "new.db"
    assert run("migrate", "--db", str(db)).exit_code == 0 and db.exists()
    assert run("list", "--db", str(db)).exit_code == 0
    assert run("migrate", "--db", str(tmp_path / "no" / "dir.db")).exit_code == 2


def test_a_file_that_is_not_a_database_means_the_store_is_unavailable(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n" * 100)
    result = run("list", "--db", str(junk))
    assert result.exit_code == 3 and "store unavailable" in result.output


def test_postgresql_is_refused_cleanly_without_echoing_the_password():
    result = run("list", "--db", "postgresql://pos:hunter2@127.0.0.1/pos")
    assert result.exit_code in (2, 3) and "hunter2" not in result.output


# --- commands that act ---------------------------------------------------------------------------------


@pytest.fixture
def overdue_db(tmp_path, basket) -> str:
    """One preview whose deadline passed an hour ago (by the wall clock)."""
    clock = FakeClock(datetime.now(timezone.utc) - timedelta(hours=1))
    db = str(tmp_path / "pos.db")
    with Engine.open(f"sqlite:///{db}", demo_providers(clock), clock=clock) as engine:
        engine.preview("reference", basket)
    return db


def test_sweep_expires_what_is_due_then_has_nothing_to_do(overdue_db):
    result = run("sweep", "--db", overdue_db, "--demo-sandboxes")
    assert result.exit_code == 0 and "expired 1 transaction(s)" in result.output
    assert listed(overdue_db, "--state", "expired")["total"] == 1
    again = run("sweep", "--db", overdue_db, "--demo-sandboxes")
    assert again.exit_code == 1 and "nothing is due" in again.output


def test_recover_with_nothing_in_doubt_exits_1(overdue_db):
    assert run("recover", "--db", overdue_db, "--demo-sandboxes").exit_code == 1


def test_acting_commands_need_their_providers(overdue_db):
    assert run("sweep", "--db", overdue_db).exit_code == 2
    result = run("recover", "--db", overdue_db, "--providers", "no_such_module:providers")
    assert result.exit_code == 2 and "no_such_module" in result.output


def test_worker_logs_json_lines_naming_its_database(overdue_db):
    result = CliRunner().invoke(cli, ["worker", "--db", overdue_db, "--demo-sandboxes", "--iterations", "1"])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert lines and all(line["db"] == overdue_db for line in lines)
    assert any(line["event"] == "expired" for line in lines)


def test_worker_metrics_port_in_use_is_a_configuration_error(overdue_db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = CliRunner().invoke(cli, ["worker", "--db", overdue_db, "--demo-sandboxes", "--iterations", "1",
                                          "--metrics-port", str(taken.getsockname()[1])])
    assert result.exit_code == 2
    [line] = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert line["event"] == "bad_configuration" and "cannot serve metrics" in line["error"]


def test_outbox_retry_of_nothing_is_nothing_to_do(overdue_db):
    assert run("outbox", "retry", "--all-dead", "--db", overdue_db).exit_code == 1
    assert run("outbox", "retry", "--db", overdue_db).exit_code == 2


def test_sandbox_serve_refuses_an_unknown_name_and_a_port_in_use():
    result = run("sandbox", "serve", "nope")
    assert result.exit_code == 2 and "no sandbox named 'nope'" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("sandbox", "serve", "reference", "--port", str(port))
    assert result.exit_code == 2 and "in use" in result.output


def test_demo_refuses_a_directory_that_does_not_exist(tmp_path):
    assert run("demo", "--db", str(tmp_path / "no" / "demo.db")).exit_code == 2


# --- as a real process -----------------------------------------------------------------------------


def txengine(*args: str, **kwargs):
    return subprocess.run([sys.executable, "-m", "txengine.app.cli", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_the_console_script_as_a_process(demo_db, tmp_path):
    listing = txengine("list", "--db", demo_db, "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout)["total"] >= 9
    assert txengine("show", "tx_nope", "--db", demo_db).returncode == 1
    missing = txengine("outbox", "list", "--db", str(tmp_path / "typo.db"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"Error: no database at {tmp_path / 'typo.db'}"
    piped = txengine("list", "--db", demo_db)
    assert "\x1b[" not in piped.stdout, "plain when piped"
    assert max(len(line) for line in piped.stdout.splitlines()) <= 80


def wait_for(predicate, timeout=20.0, what="it"):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return found


def workers_json(db: str, *args: str) -> list[dict]:
    return json.loads(run("workers", "--db", db, "--json", *args).output)["workers"]


@pytest.mark.slow
def test_a_killed_worker_shows_stale(overdue_db):
    process = subprocess.Popen(
        [sys.executable, "-m", "txengine.app.cli", "worker", "--db", overdue_db, "--demo-sandboxes",
         "--interval", "0.05", "--heartbeat", "0.05"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: [w for w in workers_json(overdue_db) if w["pid"] == process.pid], what="a heartbeat")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    [killed] = [w for w in workers_json(overdue_db) if w["pid"] == process.pid]
    assert killed["status"] in ("running", "stale"), "nothing marked it stopped"
    stale = wait_for(lambda: [w for w in workers_json(overdue_db, "--stale-after", "1")
                              if w["pid"] == process.pid and w["status"] == "stale"], what="staleness")
    assert stale[0]["heartbeat_age_seconds"] >= 1
    assert "stale" in run("workers", "--db", overdue_db, "--stale-after", "1").output


# --- metrics ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_worker_serves_prometheus_metrics_and_healthz(overdue_db):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "txengine.app.cli", "worker", "--db", overdue_db, "--demo-sandboxes",
         "--interval", "0.05", "--metrics-port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def answered():
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answered, what="/healthz")
        def transitions_counted():
            text = httpx.get(f"{base}/metrics").text
            return text if "txengine_transitions_total" in text else None

        scraped = wait_for(transitions_counted, what="a transition")
        for series in ("txengine_outbox_pending", "txengine_outbox_dead", "txengine_transactions_in_doubt",
                       "txengine_transactions_needing_attention", "txengine_outbox_oldest_pending_age"):
            assert series in scraped, series
        assert 'event="expire"' in scraped
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, process.stderr.read() if process.stderr else ""


def test_metrics_after_a_session_with_failures_name_no_secret(engine, sandbox, basket, clock):
    from txengine import telemetry
    from txengine.app.metrics import serve_metrics

    server = serve_metrics(0)
    try:
        telemetry.watch_backlog(engine.store, clock)
        paid = engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(engine.preview("reference", basket).id)
        sandbox.previews.pop(paid.provider_ref)  # its receipt will be refused: a dead delivery
        engine.deliver_pending()
        with pytest.raises(ProviderRejected):
            engine.preview("reference", basket, customer_token="0" * 32)
        scraped = httpx.get(f"http://127.0.0.1:{server.server_address[1]}/metrics").text
    finally:
        server.shutdown()
    def sample(name: str, *labels: str) -> float:
        pattern = name + r"\{" + "".join(f'[^}}]*{label}' for label in labels) + r"[^}]*\} (\S+)"
        found = re.search(pattern, scraped)
        assert found, f"no {name} {labels} in the scrape"
        return float(found.group(1))

    assert sample("txengine_transitions_total", 'event="finalize"', 'provider="reference"') >= 1
    assert sample("txengine_unknown_outcomes_total", 'event="finalize"') == 1
    assert sample("txengine_provider_call_duration_seconds_count", 'outcome="unknown"') >= 1
    assert sample("txengine_transactions_in_doubt") == 1
    assert sample("txengine_outbox_dead") == 1
    for secret in (ReferenceSandbox.api_key, CUSTOMER):
        assert secret not in scraped


def test_a_span_per_command_and_per_provider_call_naming_no_secret(engine, sandbox, basket):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    trace.set_tracer_provider(provider)  # once per process: this is the only test that sets it
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(tx.id)
    spans = [(span.name, dict(span.attributes or {})) for span in exported.get_finished_spans()]
    assert [name for name, _ in spans] == ["txengine.provider_call", "txengine.command preview",
                                           "txengine.provider_call", "txengine.command finalize"]
    assert spans[2][1] == {"provider": "reference", "operation": "finalize", "outcome": "unknown"}
    assert spans[3][1]["txengine.tx_id"] == tx.id
    assert CUSTOMER not in repr(spans) and ReferenceSandbox.api_key not in repr(spans)
    failed = exported.get_finished_spans()[3]
    assert (failed.status.status_code.name, failed.status.description) == ("ERROR", "OutcomeUnknown")
    assert not failed.events, "no traceback or message recorded on the command's path"


def test_library_log_records_carry_the_transaction_id(engine, sandbox, basket):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("txengine.engine")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        tx = engine.preview("reference", basket)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records] == ["transition", "outcome_unknown"]
    assert all(r.tx_id == tx.id for r in records)


# --- configuration, completion, sandboxes --------------------------------------------------------------


def test_settings_come_from_the_environment_and_keep_secrets(monkeypatch):
    from txengine.settings import Settings, redacted_db

    monkeypatch.setenv("TXENGINE_CHEERS_API_KEY", "cheers-live-key-123")
    monkeypatch.setenv("TXENGINE_PREVIEW_TTL", "30")
    settings = Settings()
    assert settings.cheers_api_key.get_secret_value() == "cheers-live-key-123"
    assert "cheers-live-key-123" not in repr(settings) and "cheers-live-key-123" not in str(settings)
    timers = settings.engine_options(demo_providers())["timers"]
    assert {name: policy.preview_ttl for name, policy in timers.items()} == dict.fromkeys(timers, timedelta(seconds=30))
    assert redacted_db("postgresql://pos:hunter2@127.0.0.1:5432/pos") == "postgresql://***@127.0.0.1:5432/pos"
    assert redacted_db("/var/lib/pos/txengine.db") == "/var/lib/pos/txengine.db"


def test_shell_completion_is_generated():
    script = subprocess.run([sys.executable, "-c", "from txengine.app.cli import main; main()"],
                            env={**os.environ, "_TXENGINE_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=30)
    assert "complete" in script.stdout and "_TXENGINE_COMPLETE" in script.stdout


def test_sandbox_serve_says_how_to_get_a_customer():
    server = subprocess.Popen([sys.executable, "-m", "txengine.app.cli", "sandbox", "serve", "reference", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [server.stdout.readline()]
        while "a new customer" not in lines[-1]:
            assert lines[-1], f"the sandbox said: {lines}"
            lines.append(server.stdout.readline())
        base_url = re.search(r"listening on (\S+)", lines[0]).group(1)
        assert f"txengine sandbox customer --url {base_url}" in lines[-1]
        assert f"{base_url}/_sandbox/customers" in lines[-1]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(10)


def test_sandbox_customer_refuses_a_host_off_loopback():
    result = run("sandbox", "customer", "--url", "http://203.0.113.9:8765")
    assert result.exit_code == 2 and "loopback" in result.output

