"""Metrics, traces and logs of the engine, through the OpenTelemetry API and ``logging``.

The library only *uses* the OpenTelemetry API: until an application installs the SDK
(``txengine worker --metrics-port`` does) every call here is a no-op.  What it records:

- a span per command (``txengine.command``: its name, the transaction, the event) and
  per provider call (``txengine.provider_call``: provider, operation, outcome, duration);
- counters ``txengine.transitions``, ``txengine.rejections``, ``txengine.unknown_outcomes``
  (by provider and event, from the journal entries the engine commits);
- a histogram ``txengine.provider_call.duration`` (seconds, by provider, operation, outcome);
- with ``watch_backlog(store, clock)``, gauges of the store's backlog: transactions in
  doubt and needing attention, outbox pending and dead, the oldest pending delivery's age.

Nothing recorded carries a secret: attributes are provider names, events, states, outcome
words, transaction ids and counts; never a request, a token or an error text.  Log records
(logger ``txengine.engine``) carry the transaction id as ``tx_id`` (and in ``fields``).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace

from .errors import ProviderRejected

log = logging.getLogger("txengine.engine")
_tracer = trace.get_tracer("txengine")
_meter = metrics.get_meter("txengine")

transitions = _meter.create_counter("txengine.transitions",
                                    description="lifecycle transitions committed")
rejections = _meter.create_counter("txengine.rejections",
                                   description="provider calls definitively refused")
unknown_outcomes = _meter.create_counter("txengine.unknown_outcomes",
                                         description="provider calls whose outcome could not be learned")
call_duration = _meter.create_histogram("txengine.provider_call.duration", unit="s",
                                        description="provider calls, by outcome")

_COUNTED = {"transition": transitions, "rejected": rejections, "unknown": unknown_outcomes}


def _log(level: int, message: str, tx_id: str, **fields: Any) -> None:
    if not log.isEnabledFor(level):  # a sweep commits thousands: build no record nobody reads
        return
    log.log(level, message, extra={"tx_id": tx_id, "fields": {"event": message, "tx_id": tx_id, **fields}})


def _failed(span: Any, failure: BaseException) -> None:
    """Mark a span failed by the error's type alone: no traceback is formatted on the
    command's path, and no message (a provider's words) reaches the trace."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(failure).__name__))


@contextmanager
def command_span(command: Any) -> Iterator[None]:
    """One span around one engine command (``command`` is the core's generator)."""
    name = getattr(command, "__name__", "command")
    if name == "command":  # Core.command(tx_id, event, ...): name the span by its event
        frame = getattr(command, "gi_frame", None)
        name = str(frame.f_locals.get("event", name)) if frame is not None else name
    with _tracer.start_as_current_span(f"txengine.command {name}", attributes={"txengine.command": name},
                                       record_exception=False, set_status_on_exception=False) as span:
        try:
            yield
        except Exception as failure:
            _failed(span, failure)
            raise


def committed(commits: Sequence[Any]) -> None:
    """Count and log what store commits journal: one command's commit (its span is tagged
    with the transaction and the event), or a sweep's batch (counted per event and
    provider, one ``add`` each: thousands of expiries are not thousands of adds)."""
    counts: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
    last_counted = None
    for commit in commits:
        new = commit.snapshot if commit.snapshot is not None else commit.head
        provider = new.provider if new is not None else None
        for entry in commit.events:
            event = str(entry.data.get("event", ""))
            if entry.kind in _COUNTED:
                counts[entry.kind, event, provider] += 1
                last_counted = event
                _log_entry(entry, event)
    if len(commits) == 1 and commits[0].events:
        span = trace.get_current_span()
        span.set_attribute("txengine.tx_id", commits[0].tx_id)
        if last_counted is not None:
            span.set_attribute("txengine.event", last_counted)
    for (kind, event, provider), count in counts.items():
        _COUNTED[kind].add(count, {"event": event, **({"provider": provider} if provider else {})})


def _log_entry(entry: Any, event: str) -> None:
    data = entry.data
    if entry.kind == "transition":
        _log(logging.DEBUG, "transition", entry.tx_id, transition=event,
             source=str(data.get("source")), target=str(data.get("target")))
    elif entry.kind == "rejected":
        _log(logging.INFO, "rejected", entry.tx_id, transition=event, code=str(data.get("code", "")))
    else:
        _log(logging.WARNING, "outcome_unknown", entry.tx_id, transition=event)


@contextmanager
def provider_call(provider: str, operation: str) -> Iterator[None]:
    """A span and a duration sample around one provider exchange; the outcome is ``ok``,
    ``rejected`` (a definite refusal) or ``unknown`` (anything else)."""
    started = time.perf_counter()
    with _tracer.start_as_current_span(
            "txengine.provider_call", attributes={"provider": provider, "operation": operation},
            record_exception=False, set_status_on_exception=False) as span:
        outcome = "ok"
        try:
            yield
        except ProviderRejected as refusal:
            outcome = "rejected"
            _failed(span, refusal)
            raise
        except Exception as failure:
            outcome = "unknown"
            _failed(span, failure)
            raise
        except BaseException:  # cancelled (a task, a worker stopping): no outcome learned
            outcome = "cancelled"
            raise
        finally:
            span.set_attribute("outcome", outcome)
            call_duration.record(time.perf_counter() - started,
                                 {"provider": provider, "operation": operation, "outcome": outcome})


_watched: list[tuple[Any, Any]] = []  # the (store, clock) the backlog gauges read


def watch_backlog(store: Any, clock: Any) -> None:
    """Let the backlog gauges read ``store`` (one store per process: the worker's; a second
    call replaces the first)."""
    _watched[:] = [(store, clock)]


def _backlog() -> dict[str, int]:
    if not _watched:
        return {}
    store, clock = _watched[0]
    try:
        return dict(store.backlog(clock.now()))
    except Exception:  # a scrape must not fail on a busy or closed store
        return {}


def _gauge(name: str, key: str, description: str) -> None:
    def observe(options: Any) -> list[metrics.Observation]:
        value = _backlog().get(key)
        return [] if value is None else [metrics.Observation(value)]

    _meter.create_observable_gauge(name, [observe], description=description)


def _oldest_pending_age(options: Any) -> list[metrics.Observation]:
    if not _watched:
        return []
    store, clock = _watched[0]
    try:
        first = store.deliveries(None, "pending", limit=1)
    except Exception:
        return []
    age = (clock.now() - first[0].created_at).total_seconds() if first else 0.0
    return [metrics.Observation(max(age, 0.0))]


_gauge("txengine.transactions_in_doubt", "in_doubt", "transactions whose last provider call is in doubt")
def _needing_attention(options: Any) -> list[metrics.Observation]:
    if not _watched:
        return []
    try:
        return [metrics.Observation(len(_watched[0][0].needing_attention(100_000)))]
    except Exception:
        return []


_meter.create_observable_gauge("txengine.transactions_needing_attention", [_needing_attention],
                               description="in-doubt calls parked for an operator (recover() no longer re-sends them)")
_gauge("txengine.outbox_pending", "pending", "guaranteed deliveries waiting to be sent")
_gauge("txengine.outbox_dead", "dead", "guaranteed deliveries parked for an operator")
_meter.create_observable_gauge("txengine.outbox_oldest_pending_age", [_oldest_pending_age], unit="s",
                               description="age of the oldest pending delivery")
