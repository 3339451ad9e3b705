"""Shared fixtures: a fake clock, a fresh SQLite file, the reference provider."""

from __future__ import annotations

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


@pytest.fixture
def db_url(tmp_path) -> str:
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
