"""The property kit's harness for Cheers: how the kit's suites build, reach and read it.

Registered under the entry point group ``txengine.harnesses`` (pyproject.toml), so
``txengine.testing`` finds it without importing the providers package."""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from typing import Any

from hypothesis import strategies as st

from txengine.clock import Clock
from txengine.models import Transaction
from txengine.testing.harness import ProviderHarness, deterministic_key as _key


class CheersHarness(ProviderHarness):
    """Cheers: one-time QR keys (a fresh one per preview), credit holds, whole-unit amounts."""

    provider = "cheers"
    BEER = "f04ce0c0-1034-40bf-a066-3e313f68c781"
    wallet_labels = ("rich", "regular", "empty")
    BALANCES = {"rich": 1_000_000, "regular": 800, "empty": 0}
    fault_operations = {
        "preview": ("preview",), "update": ("update",), "finalize": ("finalize",),
        "cancel": ("cancel",), "refund": ("refund",), "deliver": ("cancel",),
    }
    commit_kinds = {"preview": "preview", "finalize": "finalize", "refund": "refund"}
    currencies = ("HUF", "JPY", "EUR")
    product_ids = (BEER, "coffee", None)
    whole_units = True
    integer_vat = True
    max_unit_minor = 200_000

    def __init__(self) -> None:
        self._issued: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def make_sandbox(self, clock: Clock) -> Any:
        from . import CheersSandbox

        sandbox = CheersSandbox(clock)
        for label, balance in self.BALANCES.items():
            sandbox.add_wallet(label, balance)
        sandbox.add_discount(self.BEER, percent=40)
        sandbox.add_discount("coffee", per_unit=1)
        self._issued[sandbox] = itertools.count()
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from . import DEFAULT_API_KEY, CheersDriver

        return CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=transport)

    def customer_token(self, sandbox, wallet: str) -> str:
        # One-time keys: each preview scans a fresh QR code of the same wallet.
        return sandbox.issue_transaction_key(wallet, _key("cheers", wallet, next(self._issued[sandbox])))

    def invalid_customer_tokens(self):
        return st.sampled_from(("", "not-a-qr-code", "5ccd" * 7, "g" * 32, "5ccd7850844b415091071c027930101f0"))

    def balance(self, sandbox, wallet: str) -> int:
        return sandbox.wallet_balance(wallet)

    def ledger_effect(self, sandbox, wallet: str, tx: Transaction) -> int:
        # A Cheers credit is one whole unit of the basket's currency.
        return -int(tx.total_credits.to_decimal())

    def opening_balance(self, sandbox, wallet: str) -> int:
        return sandbox.opening_balance(wallet)

    def commits(self, sandbox) -> Counter:
        counts = Counter((entry.kind, entry.transaction_id) for entry in sandbox.ledger)
        counts.update(("preview", transaction.id) for transaction in sandbox.transactions())
        return counts
