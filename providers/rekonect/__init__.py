"""Rekonect (white-labelled as Protel Loyalty): driver and sandbox."""

from .driver import RekonectDriver
from .sandbox import RekonectSandbox

__all__ = ["RekonectDriver", "RekonectSandbox"]
