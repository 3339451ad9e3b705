"""The lifecycle state machines (tests/test_property_lifecycle.py) on PostgreSQL: the
reference provider and the four real ones, sync, and the async engine on its asyncio
path, each run on a fresh database cloned from the migrated template.

A tenth of the profile's examples per machine (the SQLite runs explore the full
profile, and `make test` must stay within ten minutes on two cores; here the point is that the fleet store behaves the same under the same steps,
crashes and restarts).  The machine's FakeClock stands in for the server's clock, so
the leases it lets run out do run out.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

pytest.importorskip("psycopg")

from txengine.store.postgres import PostgresStore  # noqa: E402
from txengine.testing.registry import load_harness  # noqa: E402
from txengine.testing.lifecycle import LifecycleStateMachine  # noqa: E402

pytestmark = pytest.mark.slow


class PostgresStores:
    """A ``StoreFactory``: a fresh database per run on the session's throwaway server."""

    server = None  # set by the fixture below

    def new_url(self) -> str:
        return self.server.url(self.server.new_database())

    def dispose(self, url: str) -> None:
        self.server.drop_database(url.rsplit("/", 1)[1])


class OnPostgres(LifecycleStateMachine):
    def _open_engine(self) -> None:
        PostgresStore.default_lease_clock = self.clock  # the store opened here measures leases on it
        try:
            super()._open_engine()
        finally:
            PostgresStore.default_lease_clock = None


MACHINES = [
    OnPostgres.for_harness(harness, store=PostgresStores(), engine_kind=kind,
                           name=f"{harness.provider.title()}{kind.title()}OnPostgres")
    for harness, kind in [(load_harness(name), kind) for name, kind in (
        ("reference", "sync"), ("cheers", "sync"), ("rekonect", "sync"), ("forloy", "sync"),
        ("secuconnect", "sync"), ("reference", "async"))]
]


@pytest.fixture(autouse=True)
def _server(pg_server):
    PostgresStores.server = pg_server


@pytest.mark.parametrize("machine", MACHINES, ids=lambda machine: machine.__name__)
def test_the_lifecycle_invariants_hold_on_postgres(machine):
    profile = settings()
    run_state_machine_as_test(machine, settings=settings(
        profile, max_examples=max(4, profile.max_examples // 10), deadline=None,
        suppress_health_check=list(HealthCheck)))
