"""The PostgreSQL store on a real throwaway server: migrations for a fleet, the journal
enforced by the database, rows claimed with SKIP LOCKED, no secret in sight, and
outages (the server stopped and started under running engines)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import httpx
import pytest

psycopg = pytest.importorskip("psycopg")

from txengine import Engine, FakeClock  # noqa: E402
from txengine.errors import OutcomeUnknown, StoreUnavailable  # noqa: E402
from txengine.journal import replay  # noqa: E402
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox  # noqa: E402
from txengine.store import migrate, open_store  # noqa: E402
from txengine.store import postgres  # noqa: E402
from txengine.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS  # noqa: E402

from .conftest import CUSTOMER, tip  # noqa: E402


@pytest.fixture
def url(pg_server, pg_database) -> str:
    return pg_server.url(pg_database)


@pytest.fixture
def blank_url(pg_server):
    """An empty database: no schema at all."""
    name = pg_server.new_database(migrated=False)
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def pg_engine(url, driver, clock):
    with Engine.open(url, providers={"reference": driver}, clock=clock) as engine:
        yield engine


def raw(url):
    return psycopg.connect(url, autocommit=True)


def schema(url) -> list[tuple]:
    """Every column, index and trigger: what two migration paths must agree on."""
    with raw(url) as db:
        columns = db.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM"
            " information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2").fetchall()
        indexes = db.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                             " ORDER BY 1").fetchall()
        triggers = db.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1").fetchall()
    return columns + indexes + triggers


class TestMigrations:
    def test_postgres_and_sqlite_share_one_version_history(self):
        assert len(postgres.MIGRATIONS) == len(SQLITE_MIGRATIONS) == postgres.LATEST

    def test_a_blank_database_is_migrated_once_on_open(self, blank_url):
        store = open_store(blank_url)
        key = store.keyed_hash_key()
        assert store.schema_version == postgres.LATEST
        store.close()
        again = open_store(blank_url)
        assert again.keyed_hash_key() == key, "reopening keeps the keyed-hash key"
        again.close()
        with raw(blank_url) as db:
            assert db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == postgres.LATEST

    @pytest.mark.parametrize("start", range(1, postgres.LATEST))
    def test_every_earlier_version_migrates_to_the_same_schema(self, start, blank_url, url):
        with raw(blank_url) as db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for number, script in enumerate(postgres.MIGRATIONS[:start], start=1):
                db.execute(script)
                db.execute("INSERT INTO schema_version VALUES (%s)", (number,))
        assert migrate(blank_url) == postgres.LATEST
        assert schema(blank_url) == schema(url)

    def test_a_fleet_migrating_at_once_applies_each_version_once(self, blank_url):
        results, errors = [], []

        def run():
            try:
                results.append(migrate(blank_url))
            except Exception as error:  # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=run) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and results == [postgres.LATEST] * 8
        with raw(blank_url) as db:
            assert db.execute("SELECT version FROM schema_version ORDER BY 1").fetchall() == [
                (n,) for n in range(1, postgres.LATEST + 1)]

    def test_an_engine_meeting_a_newer_schema_refuses_to_start(self, url, driver, clock):
        with raw(url) as db:
            db.execute("INSERT INTO schema_version VALUES (%s)", (postgres.LATEST + 1,))
        with pytest.raises(StoreUnavailable, match="newer than the .* this txengine knows: upgrade txengine"):
            Engine.open(url, providers={"reference": driver}, clock=clock)
        with pytest.raises(StoreUnavailable, match="newer"):
            migrate(url)

    def test_an_engine_opened_without_migrating_refuses_an_old_schema(self, blank_url):
        with pytest.raises(StoreUnavailable, match=r"txengine migrate --db URL"):
            postgres.PostgresStore(blank_url, migrate_schema=False)


class TestTheJournal:
    def test_the_database_refuses_to_rewrite_it(self, pg_engine, basket, url):
        tx = pg_engine.preview("reference", basket, customer_token=CUSTOMER)
        with raw(url) as db:
            for statement in ("UPDATE journal SET kind = 'x' WHERE tx_id = %s",
                              "DELETE FROM journal WHERE tx_id = %s"):
                with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                    db.execute(statement, (tx.id,))
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                db.execute("TRUNCATE journal")
        assert len(pg_engine.history(tx.id)) == 1

    def test_replaying_it_rebuilds_every_stored_snapshot(self, pg_engine, basket, clock, sandbox):
        sandbox.open_wallet("other", 50)
        pg_engine.refund(pg_engine.finalize(pg_engine.preview("reference", basket, customer_token=CUSTOMER).id).id)
        updated = pg_engine.update(pg_engine.preview("reference", basket, customer_token="other").id, [tip()])
        pg_engine.begin_payment(updated.id)
        pg_engine.preview("reference", basket)
        clock.advance(minutes=10)
        assert pg_engine.expire_due() == 1
        for tx_id in pg_engine.store.transaction_ids():
            stored = pg_engine.store.load(tx_id)
            assert replay(pg_engine.store.journal(tx_id)) == stored
            assert stored.version == len(pg_engine.store.journal(tx_id))


class TestClaims:
    def test_a_delivery_claimed_by_one_worker_is_skipped_not_waited_for(self, pg_engine, basket, clock, url):
        for _ in range(3):
            pg_engine.finalize(pg_engine.preview("reference", basket, customer_token=CUSTOMER).id)
        store, now = pg_engine.store, clock.now()
        with raw(url) as other:
            with other.transaction():
                [locked] = other.execute("SELECT id FROM outbox ORDER BY id LIMIT 1 FOR UPDATE").fetchone(),
                claimed = store.claim_deliveries(now, now + timedelta(seconds=60), 10, "worker-a")
        assert locked[0] not in [d.id for d in claimed] and len(claimed) == 2
        [last] = store.claim_deliveries(now, now + timedelta(seconds=60), 10, "worker-b")
        assert last.id == locked[0]

    def test_a_crashed_workers_claims_return_after_their_lease(self, pg_engine, basket, clock, url):
        pg_engine.finalize(pg_engine.preview("reference", basket, customer_token=CUSTOMER).id)
        server_clock = FakeClock()  # stands in for the server's clock: no sleeping
        store = postgres.PostgresStore(url, lease_clock=server_clock)
        try:
            now, lease = clock.now(), timedelta(seconds=60)
            [claimed] = store.claim_deliveries(now, now + lease, 10, "crashed")
            server_clock.advance(seconds=59)
            assert store.claim_deliveries(now, now + lease, 10, "b") == []
            server_clock.advance(seconds=1)
            [again] = store.claim_deliveries(now, now + lease, 10, "b")
            assert again.id == claimed.id
        finally:
            store.close()

    def test_a_worker_whose_clock_runs_ahead_cannot_take_a_live_claim(self, pg_engine, basket, url, driver):
        """Leases run on the server's clock: engine clocks minutes apart do not matter."""
        pg_engine.finalize(pg_engine.preview("reference", basket, customer_token=CUSTOMER).id)
        behind, ahead = FakeClock(), FakeClock()
        ahead.advance(minutes=7)
        lease = timedelta(seconds=60)
        [claimed] = pg_engine.store.claim_deliveries(behind.now(), behind.now() + lease, 10, "behind")
        with Engine.open(url, providers={"reference": driver}, clock=ahead) as fast:
            assert fast.store.claim_deliveries(ahead.now(), ahead.now() + lease, 10, "ahead") == []
            assert fast.deliver_pending() == 0, "the claim is live on the one clock that counts"
        assert claimed.attempts == 0


class TestSecrets:
    SECRET = "s3cr3t-pg-password"

    def test_the_password_is_in_no_repr_and_no_error(self, pg_server):
        unreachable = f"postgresql://txengine:{self.SECRET}@127.0.0.1:1/nowhere?wait_timeout=0.5"
        with pytest.raises(StoreUnavailable) as refused:
            open_store(unreachable)
        assert self.SECRET not in str(refused.value) and self.SECRET not in repr(refused.value)
        assert refused.value.__cause__ is None and refused.value.__context__ is None or \
            self.SECRET not in str(refused.value.__context__)
        assert self.SECRET not in postgres.describe(unreachable)

    def test_a_store_repr_names_the_database_not_the_password(self, pg_server, pg_database):
        url = pg_server.url(pg_database).replace("postgres@", f"postgres:{self.SECRET}@")
        store = open_store(url)  # trust auth: the password is accepted and ignored
        try:
            assert self.SECRET not in repr(store) and pg_database in repr(store)
        finally:
            store.close()


def back_within(seconds: float, read):
    """``read()`` once the pool has reconnected by itself: the one real-time wait in these
    tests, because a real server restart takes real time."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return read()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise


class TestOutages:
    """The server stopped and started while an engine runs on it."""

    @pytest.fixture
    def short_wait(self, url):
        return url + "?wait_timeout=1&statement_timeout_ms=5000"

    def test_commands_fail_typed_during_the_outage_and_work_after_it(self, pg_server, short_wait, driver,
                                                                     clock, basket, sandbox):
        with Engine.open(short_wait, providers={"reference": driver}, clock=clock) as engine:
            tx = engine.preview("reference", basket, customer_token=CUSTOMER)
            pg_server.stop()
            try:
                for command in (lambda: engine.finalize(tx.id), lambda: engine.get(tx.id),
                                lambda: engine.preview("reference", basket), engine.expire_due):
                    with pytest.raises(StoreUnavailable, match="PostgreSQL store") as failed:
                        command()
                    assert not isinstance(failed.value.__context__, psycopg.Error) or \
                        failed.value.__suppress_context__
            finally:
                pg_server.start()
            assert back_within(10, lambda: engine.get(tx.id)) == tx, "nothing half-applied"
            assert sandbox.commits.count((tx.provider_ref, "finalize")) == 0, "nothing sent on a dead store"
            done = engine.finalize(tx.id)
            assert done.state == "finalized", "the pool reconnected by itself"

    def test_a_provider_commit_whose_local_write_failed_is_settled_later(self, pg_server, url, clock,
                                                                         basket, sandbox):
        inner = sandbox.transport()
        outage = {"armed": False}

        def handler(request: httpx.Request) -> httpx.Response:
            response = inner.handle_request(request)
            if outage["armed"] and request.url.path.endswith("/finalize"):
                outage["armed"] = False
                pg_server.stop()  # the provider committed; the engine cannot record it
            return response

        driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key,
                                 transport=httpx.MockTransport(handler))
        # the test's clock stands in for the server's too: the claim's lease runs out below
        store = postgres.PostgresStore(url, wait_timeout=1, lease_clock=clock)
        with Engine(store, {"reference": driver}, clock=clock) as engine:
            tx = engine.preview("reference", basket, customer_token=CUSTOMER)
            outage["armed"] = True
            try:
                with pytest.raises(OutcomeUnknown, match="could not be stored"):
                    engine.finalize(tx.id)
            finally:
                pg_server.start()
            in_doubt = back_within(10, lambda: engine.get(tx.id))
            assert in_doubt.pending == "finalize", "in doubt: claimed, outcome not recorded"
            clock.advance(minutes=5)  # the claim's lease runs out
            assert engine.recover() == 1
            assert engine.get(tx.id).state == "finalized"
            assert sandbox.commits.count((tx.provider_ref, "finalize")) == 1, "committed once at the provider"


class TestTheAsyncPath:
    async def test_the_async_engine_runs_store_operations_on_the_loop_without_threads(
            self, url, driver, clock, basket, monkeypatch):
        from txengine import AsyncEngine
        import txengine.aio

        def no_thread_hops(*args, **kwargs):
            raise AssertionError("a PostgreSQL store operation hopped to a thread")

        engine = AsyncEngine.open(url, providers={"reference": driver}, clock=clock)
        monkeypatch.setattr(txengine.aio.asyncio, "to_thread", no_thread_hops)
        async with engine:
            tx = await engine.preview("reference", basket, customer_token=CUSTOMER)
            done = await engine.finalize(tx.id)
            assert done.state == "finalized" and [d.kind for d in done.deliveries] == ["receipt"]
            assert await engine.deliver_pending() == 1
            assert [e.seq for e in await engine.history(tx.id)] == [1, 2, 3]  # preview, attempt, finalize


def test_a_lookup_by_a_key_with_nul_finds_nothing_as_on_sqlite(pg_engine):
    """PostgreSQL text cannot hold NUL; nothing stored has one, so nothing is found."""
    store = pg_engine.store
    assert store.load("tx_\x00") is None and store.load_command("\x00") is None
    assert store.load_intent("\x00") is None and store.journal("\x00") == []


def test_txengine_migrate_brings_a_blank_postgres_database_up_without_showing_the_password(blank_url):
    from click.testing import CliRunner

    from txengine.app.cli import cli

    with_password = blank_url.replace("postgres@", "postgres:hunter2-secret@")
    result = CliRunner().invoke(cli, ["migrate", "--db", with_password])
    assert result.exit_code == 0, result.output
    assert f"schema version {postgres.LATEST}" in result.output and "hunter2-secret" not in result.output
    assert migrate(blank_url) == postgres.LATEST, "a second run has nothing left to do"


@pytest.mark.parametrize("command", [["list"], ["show", "tx_x"], ["outbox", "list"], ["workers"]])
def test_a_read_command_on_a_blank_postgres_database_refuses_and_creates_no_schema(blank_url, command):
    from click.testing import CliRunner

    from txengine.app.cli import cli

    result = CliRunner().invoke(cli, [*command, "--db", blank_url])
    assert result.exit_code == 3, result.output
    assert "txengine migrate" in result.output
    with psycopg.connect(blank_url) as db:
        assert db.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None, "no schema was made"
