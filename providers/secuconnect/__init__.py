"""secuconnect Smart Transactions (secucard loyalty cards): driver and sandbox."""

from .driver import SecuconnectDriver
from .sandbox import SecuconnectSandbox

__all__ = ["SecuconnectDriver", "SecuconnectSandbox"]
