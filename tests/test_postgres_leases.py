"""Intent leases on PostgreSQL: measured on the server's clock, fenced by an owner token.

Two engines share one database and their own clocks disagree by minutes: another
engine's ``recover()`` never re-sends a call still in flight (the server's clock says
the lease is live), and an answer arriving after its lease was taken over is not
committed.  The same scenarios as tests/test_boundary_leases.py, on the fleet store.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

pytest.importorskip("psycopg")

from txengine import Engine, FakeClock  # noqa: E402
from txengine.errors import OutcomeUnknown  # noqa: E402
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox  # noqa: E402
from txengine.store.postgres import PostgresStore  # noqa: E402

from .test_boundary_leases import DuringFinalize, _ready_to_finalize  # noqa: E402


def _engines(url, sandbox, lease_clock=None):
    """Engine A on a clock, engine B on a clock five minutes ahead, one database."""
    transport = DuringFinalize(sandbox)
    start = FakeClock().now()

    def engine(clock: FakeClock) -> Engine:
        driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=transport)
        return Engine(PostgresStore(url, lease_clock=lease_clock), {"reference": driver}, clock=clock)

    return engine(FakeClock(start)), engine(FakeClock(start + timedelta(minutes=5))), transport


def test_an_engine_five_minutes_ahead_does_not_take_over_a_live_call(pg_server, pg_database, sandbox, basket):
    a, b, transport = _engines(pg_server.url(pg_database), sandbox)  # leases on the server's real clock
    try:
        tx_id = _ready_to_finalize(a, basket)
        recovered: list[int] = []
        transport.meanwhile = lambda: recovered.append(b.recover())
        finalized = a.finalize(tx_id)
        assert recovered == [0], "B's clock is 5 minutes ahead, yet the lease is live on the server"
        assert transport.finalizes == 1 and finalized.state == "finalized"
        assert b.get(tx_id).state == "finalized" and b.get(tx_id).pending is None
    finally:
        a.close()
        b.close()


def test_an_answer_after_its_lease_was_taken_over_is_fenced_off(pg_server, pg_database, sandbox, basket):
    server_clock = FakeClock()  # stands in for the server's clock, so the lease can run out
    a, b, transport = _engines(pg_server.url(pg_database), sandbox, lease_clock=server_clock)
    try:
        tx_id = _ready_to_finalize(a, basket)
        lease = a.core.intent_leases["reference"]

        def stall_past_the_lease() -> None:
            server_clock.advance(lease + timedelta(seconds=1))
            b.recover()

        transport.meanwhile = stall_past_the_lease
        with pytest.raises(OutcomeUnknown, match="lease was taken over"):
            a.finalize(tx_id)
        settled = a.get(tx_id)
        assert settled.state == "finalized" and settled.pending is None
        finals = [e for e in a.history(tx_id) if e.kind == "transition" and e.data.get("event") == "finalize"]
        assert len(finals) == 1
    finally:
        a.close()
        b.close()
