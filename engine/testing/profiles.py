"""The kit's hypothesis profiles: ``dev`` (quick, while coding), ``ci`` (every merge),
``fuzz`` (long runs that remember their failures).

    from txengine.testing import register_profiles
    register_profiles()                      # in your conftest.py; then
    HYPOTHESIS_PROFILE=ci pytest             # or settings.load_profile("ci")

``register_profiles(load=True)`` also loads ``$HYPOTHESIS_PROFILE`` (default ``dev``).
``stateful_step_count`` is the number of steps per run of a lifecycle state machine.

``ci`` is held to the kit's shrink budget (``txengine.testing.lifecycle.BUDGET_SECONDS``:
each broken driver of our suite found and shrunk within 30 s on 2 cores on ci's fixed
seed, measured by ``bench/kit.py``), so a failing merge reports one minimal program, fast:

- no ``explain`` phase: it traces every line the engine runs, and roughly doubles the
  time a failure takes to report (it only runs on a failure: a passing run is unchanged);
- ``report_multiple_bugs=False``: the first failure is shrunk and reported, instead of
  searching on for up to ten more seconds and shrinking every distinct failure found
  (fix it, and the next one shows on the next run).  ``fuzz`` still reports them all.

Shrinking is capped, whatever the profile: ``register_profiles()`` stops hypothesis
shrinking a failure after ``SHRINK_SECONDS`` (20 s; hypothesis' own cap, five minutes,
is ``hypothesis.internal.conjecture.engine.MAX_SHRINKING_SECONDS``, which hypothesis
leaves monkeypatchable for this).  A rare failure (one fault at one moment of a long
run) can otherwise take a minute or more to shrink on 2 cores; stopped at the cap, it is
reported as far as it got, still a program that fails as pasted.  Hypothesis then prints
its own warning, which speaks of five minutes: that is its default, not the time spent.
``register_profiles(shrink_seconds=None)`` leaves hypothesis' cap alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILES = ("dev", "ci", "fuzz")

#: seconds after which hypothesis stops shrinking a failure and reports it as it stands
SHRINK_SECONDS = 20


def register_profiles(*, load: bool = False, fuzz_database: str | os.PathLike[str] | None = None,
                      shrink_seconds: float | None = SHRINK_SECONDS) -> None:
    """Register ``dev``, ``ci`` and ``fuzz``; ``fuzz`` keeps its examples in ``fuzz_database``
    (default ``.hypothesis-fuzz`` in the working directory), so a failure replays first.
    Shrinking stops after ``shrink_seconds`` (None: hypothesis' own five minutes)."""
    if shrink_seconds is not None:
        cap_shrinking(shrink_seconds)
    settings.register_profile("dev", max_examples=25, deadline=None, stateful_step_count=30)
    settings.register_profile(
        "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
        stateful_step_count=50, report_multiple_bugs=False,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )
    settings.register_profile(
        "fuzz", max_examples=5000, deadline=None, stateful_step_count=100,
        suppress_health_check=[HealthCheck.too_slow],
        database=DirectoryBasedExampleDatabase(str(Path(fuzz_database or ".hypothesis-fuzz").resolve())),
    )
    if load:
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def cap_shrinking(seconds: float) -> None:
    """Stop hypothesis shrinking any failure after ``seconds`` (for this process)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"shrink_seconds must be a positive number of seconds, not {seconds!r}")
    from hypothesis.internal.conjecture import engine

    engine.MAX_SHRINKING_SECONDS = seconds
