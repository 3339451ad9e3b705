"""The property kit's rule-based machine: how fast it steps, how many examples it wastes,
how quickly it finds and shrinks a broken driver.

    python bench/kit.py [--examples 20] [--stores sqlite,postgres] [--only steps,drivers]
                        [--drivers FinalizesTwice,...] [--steps N]

Every figure is measured in this run, under the kit's ``ci`` profile (derandomized, no
example database), with hypothesis' own statistics (``hypothesis.statistics.collector``):

- steps/s of each bundled provider's ``LifecycleStateMachine`` on SQLite and on
  PostgreSQL (a throwaway server, tests/pg_server.py, a fresh database per run cloned
  from a migrated template; a skipped row when none can be started): ``--examples``
  examples of the profile's steps, the wall time of the whole run (set-up, steps,
  invariant checks after each, teardown's settling) over the steps run.  The ratio
  column is PostgreSQL's steps/s over SQLite's for the same provider.
- the invalid share: the examples hypothesis threw away (``invalid`` or ``overrun``)
  over all it ran, per provider, and why; target below 15 % (what is left is
  hypothesis' own: see tests/test_property_machine.py).
- each deliberately broken driver of tests/test_conformance.py and
  tests/test_property_repro.py against the reference sandbox, each in a process of its
  own (as a CI job runs it): found or not, seconds to find it, seconds searching on,
  seconds to shrink it (and how many runs the shrink made), the minimal example's
  step count and its longest string.  The ratio is find + shrink over the kit's
  budget, ``BUDGET_SECONDS`` (``txengine.testing.lifecycle``): 30 s on 2 cores.
  With ``--seed N`` the row is the shrink time against the cap every profile has
  (``SHRINK_SECONDS``: 20 s), as on a seed other than ci's a rare failure may be found
  late.  Drivers the machine does not catch on this seed say so: the ones that break the
  wire and not the ledger (``FinalizesTwice``, ``CancelsWithoutAsking``...) are the
  conformance check's by design.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import sys
import time
from typing import Any

from common import emit, row

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis.statistics import collector  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from txengine.testing import register_profiles  # noqa: E402
from txengine.testing.profiles import SHRINK_SECONDS  # noqa: E402
from txengine.testing.lifecycle import BUDGET_SECONDS, LifecycleStateMachine  # noqa: E402
from txengine.testing.registry import load_harness  # noqa: E402

PROVIDERS = ("reference", "cheers", "rekonect", "forloy", "secuconnect")
INVALID_TARGET = 0.15
#: the broken drivers, by the test module that defines them
DRIVERS = {
    "tests.test_property_repro": ("ForgetsToSendFinalize",),
    "tests.test_conformance": (
        "RefundsItCannotDo", "RefundsAtAMissingEndpoint", "CancelsLocallyButNeedsTheProvider",
        "KeyInAHeaderTheProviderIgnores", "FreshKeyEveryAttempt", "FinalizesTwice", "CancelsWithoutAsking",
        "TrustsAnySuccessStatus", "TakesAServerErrorForSuccess", "GivesUpOnAServerError", "WorksOutTheRest"),
}
#: the kit's ci profile, derandomized and without an example database (every run the same)
QUIET = {"database": None, "derandomize": True, "suppress_health_check": list(HealthCheck)}


def run_machine(machine: type[LifecycleStateMachine], **options: Any) -> dict[str, Any]:
    """Run ``machine`` under ``options``: wall seconds, steps, hypothesis' statistics, the error."""
    statistics: list[dict] = []
    machine.steps_total = 0
    began = time.perf_counter()
    error: BaseException | None = None
    with collector.with_value(statistics.append):
        try:
            run_state_machine_as_test(machine, settings=settings(settings.get_profile("ci"), **{**QUIET, **options}))
        except Exception as failure:  # the failure is the measurement
            error = failure
    seconds = time.perf_counter() - began
    stats = statistics[-1] if statistics else {}
    cases = [case for phase in ("reuse", "generate", "target") for case in
             stats.get(f"{phase}-phase", {}).get("test-cases", [])]
    invalid = sum(case["status"] in ("invalid", "overrun") for case in cases)
    reasons: dict[str, int] = {}
    for case in cases:
        if case["status"] == "overrun":
            reasons["overrun"] = reasons.get("overrun", 0) + 1
        for reason in case["events"]:
            if reason.startswith("gave up because"):
                reason = reason.removeprefix("gave up because: ")
                if "unable to satisfy" in reason and "_rule_is_enabled" in reason:
                    reason = "no enabled rule could run"
                reasons[reason] = reasons.get(reason, 0) + 1
    return {"seconds": seconds, "steps": machine.steps_total, "cases": len(cases), "invalid": invalid,
            "reasons": reasons, "error": error, "stats": stats}


# --- steps per second ------------------------------------------------------------------------------


def pg_factory():
    """A store factory on a throwaway PostgreSQL server, and the server (None, reason: unavailable)."""
    try:
        import psycopg  # noqa: F401

        from tests.pg_server import PostgresServer, PostgresUnavailable
    except ImportError as missing:
        return None, None, f"no psycopg ({missing})"
    try:
        server = PostgresServer()
        server.start()
        server.prepare_template()
    except PostgresUnavailable as reason:
        return None, None, str(reason)

    class PostgresStores:
        def new_url(self) -> str:
            return server.url(server.new_database())

        def dispose(self, url: str) -> None:
            server.drop_database(url.rsplit("/", 1)[1])

    return PostgresStores(), server, ""


class OnPostgres(LifecycleStateMachine):
    """The store measures its leases on the machine's FakeClock (as tests/test_postgres_property.py)."""

    def _open_engine(self) -> None:
        from txengine.store.postgres import PostgresStore

        PostgresStore.default_lease_clock = self.clock
        try:
            super()._open_engine()
        finally:
            PostgresStore.default_lease_clock = None


def steps_rows(examples: int, stores: list[str]) -> list[dict]:
    rows: list[dict] = []
    rates: dict[tuple[str, str], float] = {}
    pg_store, server, why_not = (None, None, "")
    if "postgres" in stores:
        pg_store, server, why_not = pg_factory()
    try:
        for store in stores:
            for provider in PROVIDERS:
                name = f"steps/s {provider} on {store}"
                if store == "postgres" and pg_store is None:
                    rows.append(row("kit", name, None, "-", None, f"skipped: PostgreSQL unavailable ({why_not})"))
                    continue
                base = OnPostgres if store == "postgres" else LifecycleStateMachine
                machine = base.for_harness(load_harness(provider), store=pg_store if store == "postgres" else None,
                                           name=f"{provider.title()}Lifecycle")
                result = run_machine(machine, max_examples=examples, phases=[Phase.generate])
                rate = result["steps"] / result["seconds"]
                rates[(provider, store)] = rate
                ratio = rate / rates[(provider, "sqlite")] if store == "postgres" and (provider, "sqlite") in rates \
                    else None
                share = result["invalid"] / max(1, result["cases"])
                failed = f"; FAILED: {str(result['error']).splitlines()[0][:80]}" if result["error"] else ""
                rows.append(row("kit", name, ratio, "-", None if not failed else False,
                                f"{rate:.0f} steps/s ({result['steps']} steps in {result['seconds']:.1f} s,"
                                f" {result['cases']} examples){failed}"))
                print(f"    {name}: {rate:.0f} steps/s, invalid {result['invalid']}/{result['cases']}"
                      f" {result['reasons']}", flush=True)
                if store == stores[0]:
                    rows.append(row("kit", f"invalid share {provider} (on {store})", share, f"< {INVALID_TARGET:.2f}",
                                    share < INVALID_TARGET,
                                    f"{result['invalid']} of {result['cases']} examples"
                                    + (f" ({', '.join(f'{n}x {r}' for r, n in result['reasons'].items())})"
                                       if result["reasons"] else "")))
    finally:
        if server is not None:
            server.destroy()
    return rows


# --- broken drivers ----------------------------------------------------------------------------------


def reproduction(error: BaseException, machine: str) -> str | None:
    notes = "\n".join(getattr(error, "__notes__", []))
    found = re.search(rf"^state = {machine}\(\)$.*?^state\.teardown\(\)$", notes, re.M | re.S)
    return found.group(0) if found else None


def minimal_example(program: str) -> tuple[int, int]:
    """The step count (teardown aside) and the longest string in a printed program."""
    tree = ast.parse(program)
    steps = sum(isinstance(node, (ast.Expr, ast.Assign)) for node in tree.body) - 2  # state = ..., teardown
    strings = [len(node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
               and isinstance(node.value, str)]
    return steps, max(strings, default=0)


def driver_class(name: str) -> type:
    import importlib

    for module, names in DRIVERS.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise LookupError(name)


def driver_rows(names: list[str], steps: int | None = None, seed: int | None = None) -> list[dict]:
    """Each broken driver in a process of its own, as a CI job would run it (and so that
    one machine's run leaves nothing behind for the next one's to meet)."""
    import json
    import subprocess

    rows: list[dict] = []
    for name in names:
        command = [sys.executable, __file__, "--only", "drivers", "--in-process", "--drivers", name]
        command += (["--steps", str(steps)] if steps else []) + (["--seed", str(seed)] if seed is not None else [])
        done = subprocess.run(command, capture_output=True,
                              text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
        found = [line for line in done.stdout.splitlines() if line.startswith("BENCH_ROWS ")]
        for line in done.stdout.splitlines():
            if line.startswith("    "):
                print(line, flush=True)
        if done.returncode or not found:
            rows.append(row("kit", f"broken driver {name}", None, "-", False,
                            f"the measurement failed: {done.stderr.strip().splitlines()[-1:]}"))
            continue
        rows += json.loads(found[0].removeprefix("BENCH_ROWS "))
    return rows


def driver_rows_in_process(names: list[str], steps: int | None = None, seed: int | None = None) -> list[dict]:
    from tests.test_conformance import Harness

    options: dict[str, Any] = {"stateful_step_count": steps} if steps else {}
    if seed is not None:
        import hypothesis.core

        hypothesis.core.global_force_seed = seed  # what pytest's --hypothesis-seed sets
        options["derandomize"] = False
    seeded = "" if seed is None else f" (seed {seed})"

    rows: list[dict] = []
    for name in names:
        found_at: list[float] = []

        class Broken(LifecycleStateMachine):
            harness = Harness(driver_class(name))

            def teardown(self) -> None:
                try:
                    super().teardown()  # settling may be what fails
                except BaseException:
                    self._broken = True
                    raise
                finally:
                    if self._broken and not found_at:
                        found_at.append(time.perf_counter())

        Broken.__name__ = Broken.__qualname__ = f"{name}Lifecycle"
        began = time.perf_counter()
        result = run_machine(Broken, **options)
        error = result["error"]
        if error is None or not found_at:
            rows.append(row("kit", f"broken driver {name}{seeded}", None, "-", None,
                            f"not caught on this seed ({result['cases']} examples, {result['seconds']:.0f} s);"
                            " the conformance check catches it"))
            print(f"    {name}: not caught ({result['seconds']:.0f} s, {result['cases']} examples, {result['steps']}"
                  f" steps, stopped because {result['stats'].get('stopped-because')})"
                  f"{f': {error!r}'[:300] if error else ''}", flush=True)
            continue
        find = found_at[0] - began
        shrink = result["stats"].get("shrink-phase", {}).get("duration-seconds", 0.0)
        searching = result["seconds"] - find - shrink  # generating on after the first failure
        attempts = result["stats"].get("shrink-phase", {}).get("test-cases", [])
        per_attempt = statistics.median(case["runtime"] for case in attempts) * 1e3 if attempts else 0.0
        program = reproduction(error, Broken.__name__)
        steps, longest = minimal_example(program) if program else (-1, -1)
        total = result["seconds"]
        reason = str(error).splitlines()[0][:70]
        capped = " (stopped at the cap)" if shrink >= SHRINK_SECONDS else ""
        detail = (f"found in {find:.1f} s, searched on {searching:.1f} s, shrunk in {shrink:.1f} s{capped}"
                  f" ({len(attempts)} runs, median {per_attempt:.0f} ms); minimal example {steps} steps,"
                  f" longest string {longest}; {reason}")
        if seed is None:  # ci's fixed seed: found and fully shrunk within the budget
            rows.append(row("kit", f"broken driver {name}: find + shrink s", total / BUDGET_SECONDS,
                            f"<= {BUDGET_SECONDS} s", total <= BUDGET_SECONDS, detail))
        else:  # any seed: shrinking stops at the cap (within the one run that crosses it)
            rows.append(row("kit", f"broken driver {name}{seeded}: shrink s", shrink / SHRINK_SECONDS,
                            f"<= {SHRINK_SECONDS} s", shrink <= SHRINK_SECONDS + 1, detail))
        print(f"    {name}: found {find:.1f} s, searched on {searching:.1f} s, shrunk {shrink:.1f} s"
              f" ({len(attempts)} attempts, median {per_attempt:.0f} ms), {steps} steps, longest string {longest}:"
              f" {reason}", flush=True)
        if program:
            print("      " + program.replace("\n", "\n      "), flush=True)
    return rows


def main() -> int:
    register_profiles()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20, help="examples per provider machine (steps/s)")
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--only", default="steps,drivers")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help="stateful_step_count for the broken drivers (default: ci's)")
    parser.add_argument("--seed", type=int, help="run the broken drivers on this seed instead of ci's fixed one"
                        " (judged against the shrink cap, which holds on every seed)")
    parser.add_argument("--drivers", default=",".join(name for names in DRIVERS.values() for name in names))
    args = parser.parse_args()
    parts = args.only.split(",")
    rows: list[dict] = []
    if "steps" in parts:
        rows += steps_rows(args.examples, [store for store in args.stores.split(",") if store])
    if "drivers" in parts:
        measure = driver_rows_in_process if args.in_process else driver_rows
        rows += measure([name for name in args.drivers.split(",") if name], args.steps, args.seed)
    emit(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
