"""What every benchmark shares: interleaved timing, ratio rows, and the machine they ran on.

Machines here are noisy, so a benchmark never prints an absolute verdict: each row is a
ratio against a baseline measured in the same run.  Contenders run in alternating
slices (a disk hiccup hits all of them alike) and a ratio is the median over slices.

Each benchmark script prints human-readable lines while it runs, then one last line
``BENCH_ROWS [...]`` (JSON) that ``bench/run.py`` collects into one table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

Run = Callable[[int, int], None]  # run items [start, stop) of a contender's workload


def interleave(contenders: Mapping[str, Run], n: int, chunk: int) -> dict[str, list[float]]:
    """Time each contender over ``n`` items in slices of ``chunk``, alternating between them."""
    slices: dict[str, list[float]] = {name: [] for name in contenders}
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        for name, run in contenders.items():
            began = time.perf_counter()
            run(start, stop)
            slices[name].append(time.perf_counter() - began)
    return slices


def median_ratio(slices: Mapping[str, Sequence[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(slices[a], slices[b]))


def per_item_ms(slices: Mapping[str, Sequence[float]], name: str, n: int) -> float:
    return sum(slices[name]) / n * 1e3


def row(bench: str, name: str, ratio: float | None, target: str, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"bench": bench, "row": name, "ratio": None if ratio is None else round(ratio, 3),
            "target": target, "ok": ok, "detail": detail}


def emit(rows: list[dict[str, Any]]) -> None:
    for entry in rows:
        verdict = "" if entry["ok"] is None else ("OK" if entry["ok"] else "MISSED")
        ratio = "" if entry["ratio"] is None else f"{entry['ratio']:.2f}"
        print(f"  {entry['row']:<58} {ratio:>6}  {entry['target']:<12} {verdict:<6} {entry['detail']}")
    print("BENCH_ROWS " + json.dumps(rows), flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak_rss() -> float:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM); the RSS now."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return current_rss_mib()


def peak_rss_since_reset_mib() -> float:
    return _status_mib("VmHWM")


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores; Linux {platform.release()}; Python {platform.python_version()};"
            f" SQLite {sqlite3.sqlite_version}")


def durable(connection: sqlite3.Connection) -> sqlite3.Connection:
    """The engine's durability settings, for hand-written baselines."""
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 10000")
    return connection


def timed_sweep(engine: Any) -> dict[str, float]:
    """``expire_due()`` until nothing is due: how many expired, how long, peak memory added."""
    before = reset_peak_rss()
    began = time.perf_counter()
    expired = 0
    while moved := engine.expire_due():
        expired += moved
    return {"expired": expired, "seconds": time.perf_counter() - began,
            "peak_mib": peak_rss_since_reset_mib() - before}
