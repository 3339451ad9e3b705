"""Shared fixtures: a fake clock, a fresh database (SQLite file or PostgreSQL), the
reference provider."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.testing import register_profiles
from txengine.testing.lifecycle import BlockingAsyncEngine
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox

# the kit's profiles (dev, ci, fuzz); make fuzz keeps its example database in the repository
register_profiles(load=True, fuzz_database=Path(__file__).resolve().parents[1] / ".hypothesis-fuzz")

CUSTOMER = "5ccd7850844b415091071c027930101f"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# The suites that run against both stores (every other suite runs on SQLite only, to keep
# `make test` within its budget on two cores): the lifecycle, the
# failure and recovery paths and the delivery queue.  The PostgreSQL-only tests
# (tests/test_postgres_*.py) ask for the `pg_server` fixture themselves.
BOTH_STORES = {
    "tests.test_lifecycle", "tests.test_failures", "tests.test_delivery",
    "tests.test_recovery_engine", "tests.test_recovery_cheers", "tests.test_recovery_rekonect",
    "tests.test_recovery_forloy", "tests.test_recovery_secuconnect", "tests.test_head_commits",
    "tests.test_damaged_rows", "tests.test_listing",
}
STORES = [s.strip() for s in os.environ.get("TXENGINE_TEST_STORES", "sqlite,postgres").split(",") if s.strip()]


def pytest_generate_tests(metafunc):
    if "db_url" in metafunc.fixturenames:
        kinds = STORES if metafunc.module.__name__ in BOTH_STORES else ["sqlite"]
        metafunc.parametrize("store_kind", kinds, indirect=True)


@pytest.fixture
def store_kind(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL cluster for the whole run (skips when none can be had)."""
    from .pg_server import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
        server.start()
        server.prepare_template()
    except PostgresUnavailable as reason:
        pytest.skip(f"PostgreSQL is not available: {reason}")
    yield server
    server.destroy()


@pytest.fixture
def pg_database(pg_server):
    """A fresh, migrated database (cloned from the template), dropped afterwards."""
    name = pg_server.new_database()
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def db_url(request, store_kind, tmp_path, clock, monkeypatch) -> str:
    if store_kind == "postgres":
        from txengine.store.postgres import PostgresStore

        # These suites move time with the test's FakeClock; it stands in for the server's
        # clock too, so a lease runs out when the test advances it.  The server's own
        # clock is proven in tests/test_postgres_*.py (engines whose clocks differ).
        monkeypatch.setattr(PostgresStore, "default_lease_clock", clock)
        pg_server = request.getfixturevalue("pg_server")
        return pg_server.url(request.getfixturevalue("pg_database"))
    return f"sqlite:///{tmp_path / 'txengine.db'}"


@pytest.fixture
def sandbox(clock) -> ReferenceSandbox:
    sandbox = ReferenceSandbox(clock)
    sandbox.open_wallet(CUSTOMER, 800)
    sandbox.set_discount("beer", 40)
    return sandbox


@pytest.fixture
def driver(sandbox) -> ReferenceDriver:
    return ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())


@pytest.fixture
def engine(db_url, driver, clock):
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        yield engine


@pytest.fixture
def basket() -> Basket:
    return Basket([LineItem("beer", "Draft Beer 0.5L", 3, Money(500, "EUR"), 27)])


def tip(amount_minor: int = 100) -> LineItem:
    return LineItem(None, "Tip", 1, Money(amount_minor, "EUR"), 0)


# Every lifecycle test runs against both facades with the same assertions: the async
# engine is driven from blocking test code on its own event loop.
BlockingView = BlockingAsyncEngine


@pytest.fixture(params=["sync", "async"])
def pos(request, db_url, driver, clock):
    """The engine a POS would use, once blocking and once asyncio."""
    from txengine import AsyncEngine

    if request.param == "sync":
        with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
            yield engine
    else:
        view = BlockingView(AsyncEngine.open(db_url, providers={"reference": driver}, clock=clock))
        yield view
        view.close()
