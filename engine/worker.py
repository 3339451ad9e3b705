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
from .errors import EngineError
from .store.base import WorkerRecord

log = logging.getLogger("txengine.worker")

RUNNING, STOPPED = "running", "stopped"


# --- structured logs ------------------------------------------------------------------------


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the formatter's ``context``
    (the worker's database, say) and the record's ``fields``."""

    def __init__(self, context: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.context = dict(context or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.context,
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_logging(level: str = "info", stream=None, context: Mapping[str, Any] | None = None) -> logging.Handler:
    """JSON lines on ``stream`` for every ``txengine`` logger; ``context`` goes on each line
    (the worker passes its database, credentials redacted)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines(context))
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
