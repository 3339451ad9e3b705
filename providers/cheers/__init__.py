"""Cheers Loyalty: the driver and its sandbox (see ``driver``'s fidelity note)."""

from .driver import PRODUCTION_BASE_URL, SANDBOX_BASE_URL, CheersDriver
from .sandbox import DEFAULT_API_KEY, CheersSandbox

__all__ = [
    "CheersDriver",
    "CheersSandbox",
    "DEFAULT_API_KEY",
    "PRODUCTION_BASE_URL",
    "SANDBOX_BASE_URL",
]
