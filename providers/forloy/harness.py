"""The property kit's harness for Forloy: how the kit's suites build, reach and read it.

Registered under the entry point group ``txengine.harnesses`` (pyproject.toml), so
``txengine.testing`` finds it without importing the providers package."""

from __future__ import annotations

from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from hypothesis import strategies as st

from txengine.clock import Clock
from txengine.models import Transaction
from txengine.money import currency_exponent
from txengine.testing.harness import ProviderHarness


class ForloyHarness(ProviderHarness):
    """Forloy: a cashback, a punch and a discount card; purchases recorded at finalize
    (or, ``offline=True``, synced later by the guaranteed delivery)."""

    provider = "forloy"
    wallet_labels = ("cashback", "punch", "discount")
    product_ids = ("coffee", "sku-1", None)

    def __init__(self, *, offline: bool = False) -> None:
        self.offline = offline
        self.fault_operations = (
            {"preview": ("login", "lookup"), "deliver": ("sync",)} if offline
            else {"preview": ("login", "lookup"), "finalize": ("record",)})
        self.commit_kinds = {"deliver": "record"} if offline else {"finalize": "record"}

    def make_sandbox(self, clock: Clock) -> Any:
        from . import ForloySandbox

        sandbox = ForloySandbox(clock)
        sandbox.add_cashback_card(customer_name="cashback", balance="5.00", cashback_rate="0.05")
        sandbox.add_punch_card(customer_name="punch", punch_requirement=3)
        sandbox.add_discount_card(customer_name="discount", discount_rate="0.10")
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from . import ForloyDriver, ForloySandbox

        return ForloyDriver(environment="production", email=ForloySandbox.STAFF_EMAIL, password=ForloySandbox.STAFF_PASSWORD,
                            location_id=ForloySandbox.LOCATION_ID, staff_user_id=ForloySandbox.STAFF_USER_ID,
                            offline=self.offline, clock=clock, transport=transport)

    @staticmethod
    def card(sandbox, wallet: str) -> Any:
        return next(card for card in sandbox.cards.values() if card.customer_name == wallet)

    def customer_token(self, sandbox, wallet: str) -> str:
        card = self.card(sandbox, wallet)
        return card.barcode_value if wallet == "punch" else card.qr_code_data

    def invalid_customer_tokens(self):
        return st.sampled_from(("", "not base64 !", "x" * 5000))

    def _minor(self, sandbox, amount: Decimal) -> int:
        return int(amount.scaleb(currency_exponent(sandbox.currency)))

    def balance(self, sandbox, wallet: str) -> int:
        """Cashback: the balance; punch: lifetime punches; discount: lifetime spend."""
        card = self.card(sandbox, wallet)
        if card.card_type == "punch":
            return card.lifetime_punches
        return self._minor(sandbox, card.balance if card.card_type == "cashback" else card.lifetime_spend)

    def ledger_effect(self, sandbox, wallet: str, tx: Transaction) -> int:
        card = self.card(sandbox, wallet)
        if card.card_type == "punch":
            return 1
        purchase = Decimal(tx.details["purchase_amount"])
        if card.card_type == "cashback":
            quantum = Decimal(1).scaleb(-currency_exponent(sandbox.currency))
            return self._minor(sandbox, (purchase * card.tier().rate).quantize(quantum, rounding=ROUND_HALF_UP))
        return self._minor(sandbox, purchase)

    def commits(self, sandbox) -> Counter:
        return Counter(("record", recorded.pos_reference_id or recorded.transaction_id)
                       for recorded in sandbox.transactions)

    def delivery_moves_money(self) -> bool:
        return self.offline

    def __repr__(self) -> str:
        return f"ForloyHarness(offline={self.offline})"


def offline_harness() -> ForloyHarness:
    """Forloy in store-and-forward mode: purchases reach Forloy by the guaranteed delivery."""
    return ForloyHarness(offline=True)
