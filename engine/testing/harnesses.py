"""Harnesses for the reference provider and the four real ones, on their sandboxes.

Each sets up a few customers whose wallets differ in ways that matter (rich, just
enough, nothing; gifts and deals where the provider has them), names the sandbox
operations behind each lifecycle event, and reads the sandbox's ledger.  They double as
worked examples for a POS team writing a harness of its own.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from hypothesis import strategies as st

from ..clock import Clock
from ..models import Transaction
from ..money import currency_exponent
from .harness import ProviderHarness


def _key(*parts: object, length: int = 32) -> str:
    """A deterministic hex key: runs replay exactly, and no real key is ever used."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:length]


# --- reference ---------------------------------------------------------------------------------


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
        from txengine.providers.reference import ReferenceSandbox

        sandbox = ReferenceSandbox(clock)
        for label, balance in self.BALANCES.items():
            sandbox.open_wallet(self.customer_key(label), balance)
        sandbox.set_discount("beer", 40)
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from txengine.providers.reference import ReferenceDriver, ReferenceSandbox

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


# --- Cheers --------------------------------------------------------------------------------------


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
        from txengine.providers.cheers import CheersSandbox

        sandbox = CheersSandbox(clock)
        for label, balance in self.BALANCES.items():
            sandbox.add_wallet(label, balance)
        sandbox.add_discount(self.BEER, percent=40)
        sandbox.add_discount("coffee", per_unit=1)
        self._issued[sandbox] = itertools.count()
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from txengine.providers.cheers import DEFAULT_API_KEY, CheersDriver

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


# --- Rekonect ------------------------------------------------------------------------------------


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
        from txengine.providers.rekonect import RekonectSandbox

        sandbox = RekonectSandbox(clock)
        sandbox.add_member(self.PHONES["member"], points=1500, credit=500)
        sandbox.add_member(self.PHONES["gifted"], points=200)
        sandbox.add_asset(self.PHONES["gifted"], "FREECOFFEE", name="Free coffee", amount_off=350,
                          product_codes={"COFFEE"})
        sandbox.add_member(self.PHONES["broke"])
        sandbox.add_deal("10% off pastries", percent_off=10, product_codes={"PASTRY"})
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from txengine.providers.rekonect import RekonectDriver

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
        from .harness import _json_body

        body = _json_body(request)
        transaction = body.get("transaction") if isinstance(body, dict) else None
        key = transaction.get("transactionId") if isinstance(transaction, dict) else None
        return key if isinstance(key, str) else None


# --- Forloy --------------------------------------------------------------------------------------


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
        from txengine.providers.forloy import ForloySandbox

        sandbox = ForloySandbox(clock)
        sandbox.add_cashback_card(customer_name="cashback", balance="5.00", cashback_rate="0.05")
        sandbox.add_punch_card(customer_name="punch", punch_requirement=3)
        sandbox.add_discount_card(customer_name="discount", discount_rate="0.10")
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from txengine.providers.forloy import ForloyDriver, ForloySandbox

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


# --- secuconnect ---------------------------------------------------------------------------------


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
    product_ids = ("30037", "51", None)
    integer_vat = True

    def make_sandbox(self, clock: Clock) -> Any:
        from txengine.providers.secuconnect import SecuconnectSandbox

        sandbox = SecuconnectSandbox(clock)  # the seed's card holds 10,00 EUR
        sandbox.add_card(self.CARDS["poor"], cash_balance=500)
        sandbox.add_card(self.CARDS["empty"], cash_balance=0)
        return sandbox

    def make_driver(self, sandbox, *, transport, clock):
        from txengine.providers.secuconnect import SecuconnectDriver
        from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

        return SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                                 transport=transport)

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


BUNDLED: tuple[ProviderHarness, ...] = (
    ReferenceHarness(), CheersHarness(), RekonectHarness(), ForloyHarness(), SecuconnectHarness(),
)
