"""The property kit's harness for secuconnect: how the kit's suites build, reach and read it.

Registered under the entry point group ``txengine.harnesses`` (pyproject.toml), so
``txengine.testing`` finds it without importing the providers package."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import strategies as st

from txengine.clock import Clock
from txengine.testing.harness import ProviderHarness


class SecuconnectHarness(ProviderHarness):
    """secuconnect: secucards with a cash balance (the seed's card, a poor one, an empty one)."""

    provider = "secuconnect"
    wallet_labels = ("seed", "poor", "empty")
    CARDS = {"seed": "9276004429942845", "poor": "9276000000000025", "empty": "9276000000000033"}
    fault_operations = {
        "preview": ("token", "create", "preTransaction"), "update": ("update", "preTransaction"),
        "finalize": ("get", "start"), "cancel": ("abort",), "refund": ("cancel",), "deliver": ("abort",),
    }
    commit_kinds = {"finalize": "start", "refund": "reversal"}
    unconfirmable_amounts = {
        "preTransaction": "missing_sum is the provider's reckoning of the card balance against the basket;"
                          " the driver bounds it by the basket's gross, nothing else confirms it",
    }
    product_ids = ("30037", "51", None)
    integer_vat = True

    def make_sandbox(self, clock: Clock) -> Any:
        from . import SecuconnectSandbox

        sandbox = SecuconnectSandbox(clock)  # the seed's card holds 10,00 EUR
        sandbox.add_card(self.CARDS["poor"], cash_balance=500)
        sandbox.add_card(self.CARDS["empty"], cash_balance=0)
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from . import SecuconnectDriver
        from .sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

        return SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                                 transport=transport)

    def repeatable(self, request) -> bool:
        # a fresh OAuth token is a login, not a payment step
        return super().repeatable(request) or request.url.path.endswith("/oauth/token")

    def customer_token(self, sandbox, wallet: str) -> str:
        return self.CARDS[wallet]

    def invalid_customer_tokens(self):
        return st.sampled_from(("", "9276", "9276-0044-2994-2845", "927600442994284x"))

    def balance(self, sandbox, wallet: str) -> int:
        return sandbox.card_balance(self.CARDS[wallet])

    def opening_balance(self, sandbox, wallet: str) -> int:
        return sandbox.opening_balances[self.CARDS[wallet]]

    def commits(self, sandbox) -> Counter:
        counts = Counter(("start", booking.smart_transaction_id) for booking in sandbox.loyalty_transactions)
        counts.update(("reversal", booking.smart_transaction_id) for booking in sandbox.loyalty_transactions
                      if booking.reversed_at is not None)
        return counts
