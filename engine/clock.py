"""Clocks: the engine never reads the time except through one of these.

Timers are tested by advancing a ``FakeClock``, never by sleeping.  All times are
timezone-aware UTC ``datetime`` values with microsecond precision.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Protocol

from .errors import ValidationError

UTC = timezone.utc


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock UTC time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "SystemClock()"


def ensure_utc(value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationError("times must be timezone-aware datetimes")
    return value.astimezone(UTC)


class FakeClock:
    """A clock that only moves when told to; shared safely between threads."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = ensure_utc(start) if start else datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta | float | int = 0, **kwargs: float) -> datetime:
        """Move forward by a timedelta, a number of seconds, or timedelta kwargs."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        step += timedelta(**kwargs)
        if step < timedelta(0):
            raise ValidationError("a clock cannot go backwards")
        with self._lock:
            self._now += step
            return self._now

    def set(self, when: datetime) -> datetime:
        when = ensure_utc(when)
        with self._lock:
            if when < self._now:
                raise ValidationError("a clock cannot go backwards")
            self._now = when
            return self._now

    def step_back(self, delta: timedelta | float | int) -> datetime:
        """Move backwards, as a wall clock does when NTP corrects it or an operator sets it.

        ``advance`` and ``set`` refuse to go back so a test cannot do it by accident;
        this is the deliberate way, for tests of what the engine does when time does.
        """
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step <= timedelta(0):
            raise ValidationError("step_back takes a positive duration")
        with self._lock:
            self._now -= step
            return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()})"
