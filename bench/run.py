"""``make bench``: every benchmark, one table of ratios, written to bench/RESULTS.md.

    python bench/run.py [--quick [--write]] [--only NAME ...]

Each benchmark runs in its own process (so memory and imports are its own) and ends
with a ``BENCH_ROWS`` line; every row is a ratio against a baseline measured in the same
run, interleaved with it.  ``--quick`` shrinks every size for a smoke run (its table is
not written to RESULTS.md unless ``--write`` is given: it is then marked as a quick run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine

HERE = Path(__file__).resolve().parent

#: name -> (script, full arguments, quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "transition": ("transition.py", [], ["--n", "600"]),
    "lifecycle": ("lifecycle.py", [], ["--n", "300"]),
    "expiry": ("expiry.py", [], ["--stored", "20000", "--due", "2000", "--linear", "100,1000,5000",
                                 "--linear-stored", "10000"]),
    "scaling": ("scaling.py", [], ["--seconds", "2", "--lifecycles", "500,2000"]),
    "delivery": ("delivery.py", [], ["--n", "1000"]),
    "kit": ("kit.py", [], ["--examples", "5", "--stores", "sqlite", "--drivers", "ForgetsToSendFinalize"]),
}


def run(name: str, script: str, arguments: list[str]) -> list[dict]:
    print(f"[{name}] python bench/{script} {' '.join(arguments)}", flush=True)
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(HERE / script), *arguments], stdout=subprocess.PIPE,
                               text=True, cwd=HERE.parent)
    rows: list[dict] = []
    assert process.stdout is not None
    for line in process.stdout:  # progress as it comes
        if line.startswith("BENCH_ROWS "):
            rows = json.loads(line.removeprefix("BENCH_ROWS "))
        else:
            print(f"  {line.rstrip()}", flush=True)
    if process.wait() != 0:
        rows = [{"bench": name, "row": f"{name}: the benchmark failed (exit {process.returncode})", "ratio": None,
                 "target": "-", "ok": False, "detail": ""}]
    print(f"[{name}] done in {time.perf_counter() - began:.0f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | ratio | target | verdict | measured |", "|---|---:|---|---|---|"]
    for entry in rows:
        ratio = "" if entry["ratio"] is None else f"{entry['ratio']:.2f}"
        verdict = "" if entry["ok"] is None else ("ok" if entry["ok"] else "**missed**")
        lines.append(f"| {entry['row']} | {ratio} | {entry['target']} | {verdict} | {entry['detail']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not written to RESULTS.md")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even for a --quick run (marked so)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    chosen = args.only or list(BENCHMARKS)
    if (HERE / "postgres.py").exists() and not args.only:
        chosen.append("postgres")
        BENCHMARKS["postgres"] = ("postgres.py", [], ["--quick"])
    rows: list[dict] = []
    began = time.perf_counter()
    for number, name in enumerate(chosen, 1):
        print(f"== {number}/{len(chosen)} ==", flush=True)
        script, full, quick = BENCHMARKS[name]
        rows.extend(run(name, script, quick if args.quick else full))
    result = table(rows)
    print()
    print(result)
    if not args.quick or args.write:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        how = ("`make bench-quick` (small sizes: a smoke run, not the full benchmark)" if args.quick
               else "`make bench`")
        (HERE / "RESULTS.md").write_text(
            "# Benchmark results\n\n"
            f"{how} on {stamp}, {time.perf_counter() - began:.0f} s in all.\n\n"
            f"Machine: {machine()}.\n\n"
            "Every ratio is the engine against a baseline measured in the same run, interleaved\n"
            "with it (see each script's docstring for what the baseline does).\n\n"
            f"{result}\n")
        print(f"\nwritten to {os.path.relpath(HERE / 'RESULTS.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
