"""The property kit's harness for Rekonect: how the kit's suites build, reach and read it.

Registered under the entry point group ``txengine.harnesses`` (pyproject.toml), so
``txengine.testing`` finds it without importing the providers package."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import strategies as st

from txengine.clock import Clock
from txengine.testing.harness import ProviderHarness


class RekonectHarness(ProviderHarness):
    """Rekonect: members with points and credit, a one-time gift, a deal, anonymous sales,
    and the guaranteed purchase submit."""

    provider = "rekonect"
    wallet_labels = ("member", "gifted", "broke")
    anonymous = True
    PHONES = {"member": "5511122233", "gifted": "5511122244", "broke": "5511122255"}
    fault_operations = {
        "preview": ("member_details",), "finalize": ("payment",),
        "refund": ("transaction", "payment"), "deliver": ("transaction",),
    }
    commit_kinds = {"finalize": "pay", "deliver": "purchase"}
    product_ids = ("COFFEE", "PASTRY", "sku-1", None)

    def make_sandbox(self, clock: Clock) -> Any:
        from . import RekonectSandbox

        sandbox = RekonectSandbox(clock)
        sandbox.add_member(self.PHONES["member"], points=1500, credit=500)
        sandbox.add_member(self.PHONES["gifted"], points=200)
        sandbox.add_asset(self.PHONES["gifted"], "FREECOFFEE", name="Free coffee", amount_off=350,
                          product_codes={"COFFEE"})
        sandbox.add_member(self.PHONES["broke"])
        sandbox.add_deal("10% off pastries", percent_off=10, product_codes={"PASTRY"})
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from . import RekonectDriver

        return RekonectDriver(environment="sandbox", api_key=sandbox.api_key, source_name="txengine-property", pos_id="POS-1",
                              branch_id="BR-1", transport=transport)

    def customer_token(self, sandbox, wallet: str) -> str:
        return self.PHONES[wallet]

    def invalid_customer_tokens(self):
        return st.sampled_from(("", "not a phone", "12", "+", "member-5511122233"))

    def balance(self, sandbox, wallet: str) -> int:
        return sandbox.balance(self.PHONES[wallet]).total

    def opening_balance(self, sandbox, wallet: str) -> int:
        return sandbox.opening_balances[self.PHONES[wallet]].total

    def commits(self, sandbox) -> Counter:
        counts = Counter(("pay", payment.transaction_id) for payment in sandbox.payments.values())
        counts.update(("purchase", purchase.transaction_id) for purchase in sandbox.purchases.values())
        return counts

    def idempotency_key_of(self, request) -> str | None:
        # Rekonect de-duplicates payments and purchases by the transaction's id.
        from txengine.testing.harness import _json_body

        body = _json_body(request)
        transaction = body.get("transaction") if isinstance(body, dict) else None
        key = transaction.get("transactionId") if isinstance(transaction, dict) else None
        return key if isinstance(key, str) else None
