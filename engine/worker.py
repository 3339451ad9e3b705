"""``txengine worker``: the background loop that keeps every promise the engine made.

A POS backend runs one (or several, on one database) next to itself.  Each iteration:

1. ``expire_due()``: fire the timers, so abandoned previews expire (and queue the
   releases some providers want);
2. ``recover()``: re-drive side effects whose outcome is unknown and whose lease ran
   out (a crashed process, a lost answer), under their original idempotency keys;
3. ``deliver_pending()``: one round of guaranteed deliveries, sent concurrently.

An iteration that found work is followed by another at once; an idle one sleeps
``interval`` seconds.  Every ``heartbeat_every`` the worker writes its row in the
``workers`` table and logs a heartbeat line with the backlog (pending and dead
deliveries, transactions in doubt).  Logs are JSON lines through ``logging`` (logger
``txengine.worker``); they carry counts, ids and error texts the engine guarantees
free of secrets, never a request or a credential.

SIGTERM (or SIGINT) stops it gracefully: the iteration in progress finishes its
in-flight provider calls and settles them, releases deliveries it claimed but had not
sent (no attempt counted), marks the worker ``stopped`` and returns.  Nothing it held
stays leased; a SIGKILL instead leaves leases that simply run out (60 s by default) and
another worker or a restart takes over.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from .clock import Clock
from .drivers import ProviderDriver
from .errors import EngineError, ValidationError
from .store import open_existing
from .store.base import WorkerRecord

log = logging.getLogger("txengine.worker")

RUNNING, STOPPED = "running", "stopped"


# --- structured logs ------------------------------------------------------------------------


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_logging(level: str = "info", stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger("txengine")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def _describe(error: BaseException) -> dict[str, str]:
    """An error as log fields.  Engine errors are secret-free by contract, and SQLite's
    speak of tables and locks; anything else is named by type only (its text could echo
    a request)."""
    fields = {"error_type": type(error).__name__}
    if isinstance(error, (EngineError, sqlite3.Error)):
        fields["error"] = str(error)
    return fields


# --- the loop ---------------------------------------------------------------------------------


@attrs.frozen
class Iteration:
    expired: int = 0
    recovered: int = 0
    delivered: int = 0
    errors: int = 0

    @property
    def busy(self) -> bool:
        """It found work (so there may be more): the next iteration starts at once."""
        return self.errors == 0 and (self.expired + self.recovered + self.delivered) > 0


class Worker:
    """Runs the sweeps of one engine until stopped.  ``run(iterations=N)`` for tests."""

    def __init__(
        self,
        engine,
        *,
        interval: float = 1.0,
        heartbeat_every: timedelta = timedelta(seconds=30),
        recover_batch: int = 20,
        worker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.clock: Clock = engine.clock
        self.interval = interval
        self.heartbeat_every = heartbeat_every
        self.recover_batch = recover_batch
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.started_at = self.clock.now()
        self.iterations = 0
        self.totals = {"expired": 0, "recovered": 0, "delivered": 0, "errors": 0}
        self._stop = threading.Event()
        self._last_beat: datetime | None = None

    def __repr__(self) -> str:
        return f"Worker({self.id!r}, iterations={self.iterations})"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _log(self, level: int, message: str, **fields: Any) -> None:
        log.log(level, message, extra={"fields": {"event": message, "worker": self.id, **fields}})

    # --- one iteration ---

    def run_once(self) -> Iteration:
        counts = {"expired": 0, "recovered": 0, "delivered": 0}
        errors = 0
        steps: tuple[tuple[str, Callable[[], int]], ...] = (
            ("expired", self.engine.expire_due),
            ("recovered", lambda: self.engine.recover(limit=self.recover_batch)),
            ("delivered", lambda: self.engine.deliver_pending(max_rounds=1)),
        )
        for name, step in steps:
            if self.stopping:
                break
            try:
                counts[name] = step()
            except Exception as error:  # a worker keeps going; the next iteration retries
                errors += 1
                self._log(logging.ERROR, "step_failed", step=name, **_describe(error))
            if counts[name]:
                self._log(logging.INFO, name, count=counts[name])
        self.iterations += 1
        for name, count in counts.items():
            self.totals[name] += count
        self.totals["errors"] += errors
        self._heartbeat_if_due()
        return Iteration(errors=errors, **counts)

    def _heartbeat_if_due(self) -> None:
        now = self.clock.now()
        if self._last_beat is None or now - self._last_beat >= self.heartbeat_every:
            self.beat(RUNNING)

    def beat(self, status: str) -> None:
        """Write the heartbeat row and log the backlog; a failure to do so is only logged."""
        now = self.clock.now()
        self._last_beat = now
        try:
            self.engine.store.beat(WorkerRecord(
                id=self.id, host=socket.gethostname(), pid=os.getpid(), status=status,
                started_at=self.started_at, heartbeat_at=now,
                stopped_at=now if status == STOPPED else None,
                iterations=self.iterations, totals=dict(self.totals),
            ))
            backlog = dict(self.engine.store.backlog(now))
        except Exception as error:
            self._log(logging.ERROR, "heartbeat_failed", **_describe(error))
            return
        level = logging.WARNING if backlog.get("dead") or backlog.get("stuck") else logging.INFO
        self._log(level, "heartbeat", status=status, iterations=self.iterations, **self.totals,
                  backlog=backlog)

    # --- the loop and its end ---

    def run(self, iterations: int | None = None) -> None:
        """Loop until ``stop()`` (a signal) or ``iterations`` ran; always ends ``stopped``."""
        self._log(logging.INFO, "started", providers=sorted(self.engine.drivers),
                  interval=self.interval, concurrency=self.engine.core.delivery_concurrency)
        self.beat(RUNNING)
        def more() -> bool:
            return not self.stopping and (iterations is None or self.iterations < iterations)

        try:
            while more():
                if not self.run_once().busy and more():
                    self._stop.wait(self.interval)  # returns at once when stopped
        finally:
            self.beat(STOPPED)
            self._log(logging.INFO, "stopped", iterations=self.iterations, **self.totals)

    def stop(self, reason: str = "requested") -> None:
        """Finish the iteration in progress, start no new provider call, then return."""
        if not self._stop.is_set():
            self._log(logging.INFO, "stopping", reason=reason)
        self._stop.set()
        self.engine.stop_sending()

    def install_signal_handlers(self) -> None:
        def handle(signum, frame) -> None:
            self.stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


# --- which providers a worker drives ------------------------------------------------------------


def load_providers(spec: str) -> dict[str, ProviderDriver]:
    """``package.module:function``: the function returns ``{name: driver}`` (credentials are
    the function's business: environment, a secrets manager; never the command line)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValidationError(f"--providers wants module:function, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as missing:
        raise ValidationError(f"cannot load {spec!r}: {type(missing).__name__}") from None
    providers = factory()
    if not isinstance(providers, Mapping) or not providers or not all(
            isinstance(name, str) and isinstance(driver, ProviderDriver) for name, driver in providers.items()):
        raise ValidationError(f"{spec} must return a non-empty {{name: ProviderDriver}} mapping")
    return dict(providers)


def demo_providers(clock: Clock | None = None) -> dict[str, ProviderDriver]:
    """Every provider wired to an in-process sandbox (nothing leaves the machine): for
    trying the worker locally.  Forloy runs offline, so its records go through the queue."""
    from .clock import SystemClock
    from .demo import demo_pairs

    pairs = demo_pairs(clock or SystemClock(), forloy_offline=True)
    return {name: driver for name, (_, driver) in pairs.items()}


# --- the command line: txengine worker | workers | outbox ---------------------------------------


def cmd_worker(args) -> int:
    from .engine import Engine

    configure_logging(args.log_level)
    try:
        providers = demo_providers() if args.demo_sandboxes else load_providers(args.providers)
    except ValidationError as bad:
        log.error("bad_configuration", extra={"fields": {"event": "bad_configuration", **_describe(bad)}})
        return 2
    engine = Engine.open(f"sqlite:///{args.db}", providers, delivery_concurrency=args.concurrency)
    worker = Worker(engine, interval=args.interval, heartbeat_every=timedelta(seconds=args.heartbeat))
    worker.install_signal_handlers()
    try:
        worker.run(iterations=args.iterations)
    finally:
        engine.close()
    return 0


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_outbox_list(args) -> int:
    store = open_existing(args.db)
    try:
        statuses = [args.status] if args.status else ["dead", "pending"]
        rows = [row for status in statuses
                for row in store.deliveries(args.tx, status, limit=args.limit)]
        print(f"{'id':>6}  {'status':<9} {'provider':<12} {'kind':<8} {'tx':<36} {'tries':>5}"
              f"  {'next attempt':<19}  last error")
        for row in rows:
            print(f"{row.id:>6}  {row.status:<9} {row.provider:<12} {row.kind:<8} {row.tx_id:<36}"
                  f" {row.attempts:>5}  {_when(row.next_attempt_at if row.status == 'pending' else None):<19}"
                  f"  {(row.last_error or '')[:100]}")
        backlog = store.backlog(datetime.now(timezone.utc))
        print(f"pending {backlog['pending']}, dead {backlog['dead']}, transactions in doubt"
              f" {backlog['in_doubt']} ({backlog['stuck']} waiting for recover)")
    finally:
        store.close()
    return 0


def cmd_outbox_retry(args) -> int:
    if bool(args.ids) == args.all_dead:
        print("name delivery ids, or --all-dead (not both)", file=sys.stderr)
        return 2
    store = open_existing(args.db)
    now = datetime.now(timezone.utc)
    try:
        if args.all_dead:
            print(f"re-queued {store.retry_dead_deliveries(now)} dead deliveries")
            return 0
        failed = 0
        for delivery_id in args.ids:
            if store.retry_delivery(delivery_id, now):
                print(f"re-queued delivery #{delivery_id}")
            else:
                failed += 1
                print(f"delivery #{delivery_id} is not dead (or does not exist): left as it is", file=sys.stderr)
        return 1 if failed else 0
    finally:
        store.close()


def cmd_workers(args) -> int:
    store = open_existing(args.db)
    try:
        now = datetime.now(timezone.utc)
        for worker in store.workers():
            age = int((now - worker.heartbeat_at).total_seconds())
            totals = ", ".join(f"{name} {count}" for name, count in worker.totals.items())
            print(f"{worker.id:<40} {worker.status:<8} heartbeat {age:>6}s ago  iterations {worker.iterations}"
                  f"  ({totals})")
    finally:
        store.close()
    return 0


def register_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``worker``, ``workers`` and ``outbox`` to the ``txengine`` command line."""
    worker = commands.add_parser("worker", help="run the background loop: timers, recovery, deliveries")
    worker.add_argument("--db", default="txengine.db", help="the SQLite file the POS backend uses")
    source = worker.add_mutually_exclusive_group(required=True)
    source.add_argument("--providers", metavar="MODULE:FUNCTION",
                        help="a function returning {name: driver}, configured with credentials")
    source.add_argument("--demo-sandboxes", action="store_true",
                        help="drive in-process sandboxes of every provider (local runs)")
    worker.add_argument("--interval", type=float, default=1.0, help="seconds to sleep when idle")
    worker.add_argument("--heartbeat", type=float, default=30.0, help="seconds between heartbeats")
    worker.add_argument("--concurrency", type=int, default=8, help="deliveries in flight at once")
    worker.add_argument("--iterations", type=int, default=None, help="stop after this many (default: run)")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(run=cmd_worker)

    workers = commands.add_parser("workers", help="the workers' heartbeats")
    workers.add_argument("--db", default="txengine.db")
    workers.set_defaults(run=cmd_workers)

    outbox = commands.add_parser("outbox", help="guaranteed deliveries: list, re-queue dead ones")
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True)
    listing = outbox_commands.add_parser("list", help="deliveries not yet delivered (dead first)")
    listing.add_argument("--db", default="txengine.db")
    listing.add_argument("--status", choices=["pending", "dead", "delivered"])
    listing.add_argument("--tx", help="only this transaction's deliveries")
    listing.add_argument("--limit", type=int, default=200)
    listing.set_defaults(run=cmd_outbox_list)
    retry = outbox_commands.add_parser("retry", help="re-queue dead deliveries for the worker to send now")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--all-dead", action="store_true")
    retry.add_argument("--db", default="txengine.db")
    retry.set_defaults(run=cmd_outbox_retry)
