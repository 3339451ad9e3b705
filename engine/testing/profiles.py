"""The kit's hypothesis profiles: ``dev`` (quick, while coding), ``ci`` (every merge),
``fuzz`` (long runs that remember their failures).

    from txengine.testing import register_profiles
    register_profiles()                      # in your conftest.py; then
    HYPOTHESIS_PROFILE=ci pytest             # or settings.load_profile("ci")

``register_profiles(load=True)`` also loads ``$HYPOTHESIS_PROFILE`` (default ``dev``).
``stateful_step_count`` is the number of steps per run of a lifecycle state machine.

``ci`` is held to the kit's shrink budget (``txengine.testing.lifecycle.BUDGET_SECONDS``:
a broken driver's failure found and shrunk within 30 s on 2 cores, measured by
``bench/kit.py``), so a failing merge reports one minimal program, fast:

- no ``explain`` phase: it traces every line the engine runs, and roughly doubles the
  time a failure takes to report (it only runs on a failure: a passing run is unchanged);
- ``report_multiple_bugs=False``: the first failure is shrunk and reported, instead of
  searching on for up to ten more seconds and shrinking every distinct failure found
  (fix it, and the next one shows on the next run).  ``fuzz`` still reports them all.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILES = ("dev", "ci", "fuzz")


def register_profiles(*, load: bool = False, fuzz_database: str | os.PathLike[str] | None = None) -> None:
    """Register ``dev``, ``ci`` and ``fuzz``; ``fuzz`` keeps its examples in ``fuzz_database``
    (default ``.hypothesis-fuzz`` in the working directory), so a failure replays first."""
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
