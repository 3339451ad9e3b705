"""Item 3: the intent lease is derived from the call deadline, measured on one clock, fenced.

Two engines share one SQLite file.  Their own clocks may disagree by minutes; the lease
is measured on the store's clock (one database, one clock) and fenced by an owner token,
so another engine's ``recover()`` never re-sends a call still in flight, and an answer
that arrives after its lease was really taken over is never committed.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from txengine import Engine, FakeClock
from txengine.core import LEASE_MARGIN
from txengine.errors import OutcomeUnknown, ValidationError
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.store import SQLiteStore

from .conftest import CUSTOMER


class DuringFinalize(httpx.MockTransport):
    """Forwards to the sandbox; runs ``meanwhile`` once, while the first finalize is in flight."""

    def __init__(self, sandbox: ReferenceSandbox) -> None:
        self.meanwhile = None
        self.finalizes = 0
        inner = sandbox.transport()

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/finalize"):
                self.finalizes += 1
                if self.meanwhile is not None:
                    act, self.meanwhile = self.meanwhile, None
                    act()
            return inner.handle_request(request)

        super().__init__(handler)


@pytest.fixture
def shared(tmp_path, sandbox):
    """Two engines on one file; engine B's clock runs 5 minutes ahead of engine A's."""
    db_clock = FakeClock()
    transport = DuringFinalize(sandbox)
    path = str(tmp_path / "shared.db")

    def engine(clock: FakeClock) -> Engine:
        driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=transport)
        return Engine(SQLiteStore(path, clock=db_clock), {"reference": driver}, clock=clock)

    a = engine(FakeClock(db_clock.now()))
    b = engine(FakeClock(db_clock.now() + timedelta(minutes=5)))
    yield a, b, db_clock, transport
    a.close()
    b.close()


def _ready_to_finalize(engine: Engine, basket) -> str:
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    return engine.begin_payment(tx.id).id


def test_a_skewed_engine_does_not_take_over_a_live_call(shared, basket):
    a, b, _, transport = shared
    tx_id = _ready_to_finalize(a, basket)
    recovered: list[int] = []
    transport.meanwhile = lambda: recovered.append(b.recover())

    finalized = a.finalize(tx_id)

    assert recovered == [0]  # B's clock is 5 minutes ahead, yet the lease is live
    assert transport.finalizes == 1  # no double send
    assert finalized.state == "finalized"  # the first caller's success, reported as success
    assert b.get(tx_id).state == "finalized" and b.get(tx_id).pending is None


def test_an_answer_after_the_lease_was_taken_over_is_not_committed_and_not_lost(shared, basket):
    a, b, db_clock, transport = shared
    tx_id = _ready_to_finalize(a, basket)
    lease = a.core.intent_leases["reference"]

    def stall_past_the_lease() -> None:
        db_clock.advance(lease + timedelta(seconds=1))  # A's call outlived its lease
        b.recover()  # B takes the intent over and settles it

    transport.meanwhile = stall_past_the_lease
    with pytest.raises(OutcomeUnknown, match="lease was taken over"):
        a.finalize(tx_id)

    settled = a.get(tx_id)
    assert settled.state == "finalized" and settled.pending is None  # B's commit, exactly once
    finals = [event for event in a.history(tx_id) if event.kind == "transition" and event.data.get("event") == "finalize"]
    assert len(finals) == 1


def test_the_lease_outlives_the_call_deadline(tmp_path, driver, clock):
    with Engine.open(f"sqlite:///{tmp_path / 'a.db'}", {"reference": driver}, clock=clock) as engine:
        assert engine.core.intent_leases["reference"] == timedelta(seconds=driver.call_deadline) + LEASE_MARGIN
    short = timedelta(seconds=driver.call_deadline)
    with pytest.raises(ValidationError, match="intent_lease must be a timedelta of at least"):
        Engine.open(f"sqlite:///{tmp_path / 'b.db'}", {"reference": driver}, clock=clock, intent_lease=short)
    fast = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, deadline=2)
    with Engine.open(f"sqlite:///{tmp_path / 'c.db'}", {"reference": fast}, clock=clock) as engine:
        assert engine.core.intent_leases["reference"] == timedelta(seconds=2) + LEASE_MARGIN
