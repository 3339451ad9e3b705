"""Where a Cheers lifecycle's time goes: statements and commits per command, and a profile.

    python bench/where.py [--n 2000] [--top 25] [--sort tottime]

Runs ``--n`` full Cheers lifecycles (preview, update, begin_payment, finalize, refund)
through ``Engine`` on a fresh SQLite file with the in-process sandbox, counting the SQL
statements and the COMMITs each command sends on the store's connection (sqlite3's
``set_trace_callback``), then prints cProfile's top functions.  Not part of ``make
bench`` (profiling distorts timing); run it before and after a change.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import pstats
import tempfile
import time

import common  # noqa: F401  (puts the repository on sys.path)

from lifecycle import BEER, TIP, EngineLifecycles

from txengine import Basket, FakeClock

COMMANDS = ("preview", "update", "begin_payment", "finalize", "refund")


class StatementCounter:
    """Counts the statements (and commits) the store's connection runs, per command."""

    def __init__(self) -> None:
        self.current = ""
        self.statements: collections.Counter[str] = collections.Counter()
        self.commits: collections.Counter[str] = collections.Counter()
        self.texts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def __call__(self, sql: str) -> None:
        self.statements[self.current] += 1
        self.texts[self.current][" ".join(sql.split()[:3])] += 1
        if sql.strip().upper().startswith("COMMIT"):
            self.commits[self.current] += 1


def lifecycles(contender: EngineLifecycles, counter: StatementCounter | None, n: int) -> None:
    engine = contender.engine

    def step(name: str) -> None:
        if counter is not None:
            counter.current = name

    for key in contender.keys[:n]:
        step("preview")
        tx = engine.preview("cheers", Basket([BEER]), customer_token=key)
        step("update")
        engine.update(tx.id, [TIP])
        step("begin_payment")
        engine.begin_payment(tx.id)
        step("finalize")
        engine.finalize(tx.id)
        step("refund")
        engine.refund(tx.id, comment="bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="txengine-profile-") as directory:
        clock = FakeClock()
        contender = EngineLifecycles(directory, clock, args.n + 20)
        counter = StatementCounter()
        contender.engine.store._connection().set_trace_callback(counter)
        lifecycles(contender, counter, 20)
        contender.engine.store._connection().set_trace_callback(None)
        print("statements (commits) per command, averaged over 20 lifecycles:")
        for name in COMMANDS:
            print(f"  {name:<14} {counter.statements[name] / 20:5.1f} ({counter.commits[name] / 20:.1f})"
                  f"   {dict(counter.texts[name])}")
        total = sum(counter.statements.values()) / 20
        print(f"  {'lifecycle':<14} {total:5.1f} ({sum(counter.commits.values()) / 20:.1f})")
        contender.keys = contender.keys[20:]
        profile = cProfile.Profile()
        began = time.perf_counter()
        profile.enable()
        lifecycles(contender, None, args.n)
        profile.disable()
        elapsed = time.perf_counter() - began
        print(f"\n{args.n} lifecycles under cProfile: {elapsed / args.n * 1e3:.2f} ms each (profiled)")
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
