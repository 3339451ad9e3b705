"""Moved to ``txengine.app.demo`` (the application layer knows the providers); kept so
existing imports keep working."""

from .app.demo import Narrator, run, run_sessions
from .app.wiring import demo_pairs

__all__ = ["Narrator", "demo_pairs", "run", "run_sessions"]
