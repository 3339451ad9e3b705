"""The kit's hypothesis profiles: ``dev`` (quick, while coding), ``ci`` (every merge),
``fuzz`` (long runs that remember their failures).

    from txengine.testing import register_profiles
    register_profiles()                      # in your conftest.py; then
    HYPOTHESIS_PROFILE=ci pytest             # or settings.load_profile("ci")

``register_profiles(load=True)`` also loads ``$HYPOTHESIS_PROFILE`` (default ``dev``).
``stateful_step_count`` is the number of steps per run of a lifecycle state machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILES = ("dev", "ci", "fuzz")


def register_profiles(*, load: bool = False, fuzz_database: str | os.PathLike[str] | None = None) -> None:
    """Register ``dev``, ``ci`` and ``fuzz``; ``fuzz`` keeps its examples in ``fuzz_database``
    (default ``.hypothesis-fuzz`` in the working directory), so a failure replays first."""
    settings.register_profile("dev", max_examples=25, deadline=None, stateful_step_count=30)
    settings.register_profile(
        "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
        stateful_step_count=100,
    )
    settings.register_profile(
        "fuzz", max_examples=5000, deadline=None, stateful_step_count=100,
        suppress_health_check=[HealthCheck.too_slow],
        database=DirectoryBasedExampleDatabase(str(Path(fuzz_database or ".hypothesis-fuzz").resolve())),
    )
    if load:
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
