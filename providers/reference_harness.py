"""The property kit's harness for the reference provider: how the kit's suites build, reach and read it.

Registered under the entry point group ``txengine.harnesses`` (pyproject.toml), so
``txengine.testing`` finds it without importing the providers package."""

from __future__ import annotations

from collections import Counter
from typing import Any

from txengine.clock import Clock
from txengine.testing.harness import ProviderHarness, deterministic_key as _key


class ReferenceHarness(ProviderHarness):
    """The reference provider: wallets keyed by the customer key, 40 % off beer, receipts."""

    provider = "reference"
    wallet_labels = ("rich", "regular", "poor")
    anonymous = True
    BALANCES = {"rich": 1_000_000, "regular": 800, "poor": 100}
    fault_operations = {
        "preview": ("preview",), "update": ("update",), "finalize": ("finalize",),
        "cancel": ("cancel",), "refund": ("refund",), "deliver": ("receipt",),
    }
    commit_kinds = {"preview": "preview", "finalize": "finalize", "refund": "refund", "deliver": "receipt"}
    currencies = ("EUR", "JPY", "KWD")
    product_ids = ("beer", "wine", "sku-1", None)

    def make_sandbox(self, clock: Clock) -> Any:
        from .reference import ReferenceSandbox

        sandbox = ReferenceSandbox(clock)
        for label, balance in self.BALANCES.items():
            sandbox.open_wallet(self.customer_key(label), balance)
        sandbox.set_discount("beer", 40)
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from .reference import ReferenceDriver, ReferenceSandbox

        return ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=transport)

    @staticmethod
    def customer_key(wallet: str) -> str:
        return _key("reference", wallet)

    def customer_token(self, sandbox, wallet: str) -> str:
        return self.customer_key(wallet)

    def balance(self, sandbox, wallet: str) -> int:
        return sandbox.balance(self.customer_key(wallet))

    def opening_balance(self, sandbox, wallet: str) -> int:
        return sandbox.opening_balances[self.customer_key(wallet)]

    def commits(self, sandbox) -> Counter:
        counts = Counter((action, preview_id) for preview_id, action in sandbox.commits)
        counts.update({("receipt", transaction): times for transaction, times in sandbox.receipts.items()})
        counts.update(("preview", preview_id) for preview_id in sandbox.previews)
        return counts
