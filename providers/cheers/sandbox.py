"""A faithful simulator of Cheers Loyalty's POS integration API.

Business rules, on the sandbox's own clock:

- **terminals**: every call needs a registered ``X-API-Key``;
- **wallets** hold whole-unit credits (1 credit = 1 unit of local currency); an open
  preview *holds* the credits it plans to spend, finalize deducts them, cancel and
  expiry release them, refund returns them;
- **transaction keys** (the customer's QR): 32 hex digits, issued for a wallet, maybe
  with a validity; a successful preview consumes the key, and a cancelled or expired
  preview leaves it consumed.  A refused preview (``INSUFFICIENT_CREDIT``, say) does
  not, so the POS can retry the same QR with ``EXTERNAL_PAYMENT``;
- **discount rules** price eligible lines (a percentage and/or an amount per unit);
  lines added by update get no discount and no credits;
- **idempotency**: a repeated ``X-Idempotency-Key`` (per terminal) replays the original
  preview; the same key with another QR or body is refused; refusals are not
  remembered.  Finalize, cancel and refund repeated on a transaction already in their
  state answer the same transaction again;
- **deadlines**: a preview expires ``ASSUMED_PREVIEW_LIFETIME`` after it is created,
  each update moves that by ``UPDATE_EXTENSION``; refunds close ``REFUND_WINDOW`` after
  finalize.  Deadlines are exclusive.

What is documented and what is assumed is listed in ``txengine.providers.cheers.driver``'s
fidelity note; the sandbox follows it (error statuses from ``ASSUMED_ERROR_STATUS``,
error bodies ``{"code", "message"}``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import attrs

from txengine.clock import Clock

from txengine.testing.sandbox import BadRequest, Sandbox, SandboxRequest, SandboxResponse, route
from .driver import (
    ASSUMED_ERROR_STATUS,
    ASSUMED_PREVIEW_LIFETIME,
    CREDIT,
    CREDIT_TRANSACTION_ALREADY_CANCELLED,
    CREDIT_TRANSACTION_ALREADY_FINALIZED,
    CREDIT_TRANSACTION_ALREADY_REFUNDED,
    CREDIT_TRANSACTION_EXPIRED,
    CREDIT_TRANSACTION_NOT_FINALIZED,
    CREDIT_TRANSACTION_NOT_FOUND,
    CURRENCY_MISMATCH,
    EXTERNAL_PAYMENT,
    IDEMPOTENCY_KEY_CONFLICT,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    INSUFFICIENT_CREDIT,
    NOT_FOUND,
    PAYMENT_TYPES,
    REFUND_WINDOW,
    REFUND_WINDOW_CLOSED,
    SANDBOX_BASE_URL,
    TRANSACTION_KEY_ALREADY_USED,
    TRANSACTION_KEY_EXPIRED,
    TRANSACTION_KEY_NOT_FOUND,
    TRANSACTION_KEY_PATTERN,
    UNAUTHORIZED,
    UPDATE_EXTENSION,
    VALIDATION_ERROR,
)

#: The terminal key a fresh sandbox accepts (``txengine sandbox serve cheers``).
DEFAULT_API_KEY = "cheers-sandbox-terminal-key"

# Transaction statuses.  EXPIRED is never stored: a PREVIEWED transaction is expired
# once the clock reaches its deadline.
PREVIEWED = "PREVIEWED"
FINALIZED = "FINALIZED"
CANCELLED = "CANCELLED"
REFUNDED = "REFUNDED"
EXPIRED = "EXPIRED"

_CONFLICT_BY_STATUS = {
    FINALIZED: CREDIT_TRANSACTION_ALREADY_FINALIZED,
    CANCELLED: CREDIT_TRANSACTION_ALREADY_CANCELLED,
    REFUNDED: CREDIT_TRANSACTION_ALREADY_REFUNDED,
    EXPIRED: CREDIT_TRANSACTION_EXPIRED,
}

# The seed's worked example, reproduced by ``seed_worked_example``.
WORKED_EXAMPLE_TRANSACTION_KEY = "5ccd7850844b415091071c027930101f"
WORKED_EXAMPLE_PRODUCT_ID = "f04ce0c0-1034-40bf-a066-3e313f68c781"
WORKED_EXAMPLE_TRANSACTION_ID = "b04ce0c0-1034-40bf-a066-3e313f68c782"
WORKED_EXAMPLE_WALLET = "worked-example-customer"
WORKED_EXAMPLE_CREDITS = 800
WORKED_EXAMPLE_DISCOUNT_PERCENT = 40  # 3 x 500 = 1500, 40 % off = 600

# A demo customer beside the worked example, and the wallets ``issue_customer`` funds.
DEMO_WALLET = "demo-customer"
DEMO_TRANSACTION_KEY = "de000000c0ffeec0ffeec0ffeec0ffee"
DEMO_CREDITS = 10_000


def _fail(code: str, message: str) -> BadRequest:
    return BadRequest(message, ASSUMED_ERROR_STATUS[code], code)


@attrs.frozen
class DiscountRule:
    """``percent`` off a line, plus ``per_unit`` whole units off each unit, capped at the line."""

    product_id: str | None  # None: every line
    percent: int = 0
    per_unit: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.percent <= 100 or self.per_unit < 0:
            raise ValueError("a discount is 0-100 percent and a non-negative amount per unit")

    def applies_to(self, product_id: str | None) -> bool:
        return self.product_id is None or self.product_id == product_id

    def discount(self, unit_price: int, quantity: int) -> int:
        gross = unit_price * quantity
        return min(gross, gross * self.percent // 100 + self.per_unit * quantity)


@attrs.define
class Wallet:
    id: str
    balance: int
    opening_balance: int


@attrs.define
class TransactionKey:
    wallet_id: str
    expires_at: datetime | None = None
    used_by: str | None = None  # the credit transaction that consumed it


@attrs.define
class CreditTransaction:
    id: str
    wallet_id: str
    payment_type: str
    currency: str
    lines: list[dict[str, Any]]
    expires_at: datetime
    status: str = PREVIEWED
    finalized_at: datetime | None = None
    refunded_at: datetime | None = None
    refund_comment: str | None = None

    @property
    def credits(self) -> int:
        return sum(line["credits"] for line in self.lines)

    def status_at(self, now: datetime) -> str:
        if self.status == PREVIEWED and now >= self.expires_at:
            return EXPIRED
        return self.status

    def view(self) -> dict[str, Any]:
        """The answer body, in the guide's field order."""
        return {
            "transactionId": self.id,
            "totalCredits": self.credits,
            "totalDiscount": sum(line["discount"] for line in self.lines),
            "outstandingBalance": sum(line["outstandingBalance"] for line in self.lines),
            "currencyCode": self.currency,
            "items": [dict(line) for line in self.lines],
        }


@attrs.frozen
class LedgerEntry:
    """A movement of credits: ``finalize`` takes them, ``refund`` gives them back."""

    kind: str
    transaction_id: str
    wallet_id: str
    credits: int
    at: datetime


@attrs.frozen
class _Replay:
    fingerprint: str
    response: SandboxResponse


def _priced_line(item: Mapping[str, Any], discount: int, credits: int) -> dict[str, Any]:
    gross = item["unitPrice"] * item["quantity"]
    return {
        "productId": item["productId"],
        "name": item["name"],
        "unitPrice": item["unitPrice"],
        "quantity": item["quantity"],
        "credits": credits,
        "discount": discount,
        "outstandingBalance": gross - discount - credits,
        "vat": item["vat"],
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _items(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _fail(VALIDATION_ERROR, f"{field} must be a non-empty list")
    items = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise _fail(VALIDATION_ERROR, f"{where} must be an object")
        product_id = item.get("productId")
        if product_id is not None and (not isinstance(product_id, str) or not product_id):
            raise _fail(VALIDATION_ERROR, f"{where}.productId must be a string or null")
        if not _is_int(item.get("quantity")) or item["quantity"] < 1:
            raise _fail(VALIDATION_ERROR, f"{where}.quantity must be a positive integer")
        if not _is_int(item.get("unitPrice")) or item["unitPrice"] < 0:
            raise _fail(VALIDATION_ERROR, f"{where}.unitPrice must be a whole, non-negative amount")
        if not isinstance(item.get("name"), str) or not item["name"].strip():
            raise _fail(VALIDATION_ERROR, f"{where}.name is required")
        if not _is_int(item.get("vat")) or not 0 <= item["vat"] <= 100:
            raise _fail(VALIDATION_ERROR, f"{where}.vat must be an integer percent")
        items.append({key: item[key] for key in ("productId", "quantity", "unitPrice", "name", "vat")})
    return items


def _body(request: SandboxRequest) -> dict[str, Any]:
    try:
        body = request.json()
    except BadRequest as bad:
        raise _fail(VALIDATION_ERROR, str(bad)) from None
    if not isinstance(body, dict):
        raise _fail(VALIDATION_ERROR, "the body must be a JSON object")
    return body


def _currency(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 3 or not value.isalpha() or not value.isupper():
        raise _fail(VALIDATION_ERROR, "currencyCode must be an ISO 4217 code")
    return value


class CheersSandbox(Sandbox):
    """Cheers Loyalty's credit-transaction API with wallets, discounts and one-time QR keys."""

    name = "cheers"
    host = SANDBOX_BASE_URL.removeprefix("https://")

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        api_keys: Iterable[str] = (DEFAULT_API_KEY,),
        preview_lifetime: timedelta = ASSUMED_PREVIEW_LIFETIME,
    ) -> None:
        super().__init__(clock)
        api_keys = tuple(api_keys)
        if not api_keys:
            raise ValueError("a Cheers sandbox needs at least one terminal API key")
        self._demo_api_key = api_keys[0]
        self._issued_customers = 0
        self.preview_lifetime = preview_lifetime
        self._terminals: set[str] = set(api_keys)
        self._wallets: dict[str, Wallet] = {}
        self._keys: dict[str, TransactionKey] = {}
        self._discounts: list[DiscountRule] = []
        self._transactions: dict[str, CreditTransaction] = {}
        # each wallet's transactions that may still hold credits: a preview reads the held
        # credits of its wallet without scanning every transaction ever made
        self._open: dict[str, dict[str, CreditTransaction]] = {}
        self._replays: dict[tuple[str, str], _Replay] = {}
        self._reserved_ids: deque[str] = deque()
        self.ledger: list[LedgerEntry] = []

    # --- set-up, for tests and the demo ---

    def add_terminal(self, api_key: str) -> None:
        with self.lock:
            self._terminals.add(api_key)

    def add_wallet(self, wallet_id: str, credits: int) -> None:
        if not _is_int(credits) or credits < 0:
            raise ValueError("a wallet holds a whole, non-negative number of credits")
        with self.lock:
            self._wallets[wallet_id] = Wallet(wallet_id, credits, credits)

    def issue_transaction_key(
        self, wallet_id: str, key: str | None = None, *, valid_for: timedelta | None = None
    ) -> str:
        """A one-time QR key for ``wallet_id`` (random unless given)."""
        key = key or secrets.token_hex(16)
        if not TRANSACTION_KEY_PATTERN.fullmatch(key):
            raise ValueError("a transaction key is 32 hexadecimal characters")
        with self.lock:
            if wallet_id not in self._wallets:
                raise KeyError(f"no wallet {wallet_id!r}")
            expires_at = self.clock.now() + valid_for if valid_for is not None else None
            self._keys[key.lower()] = TransactionKey(wallet_id, expires_at)
        return key

    def add_discount(self, product_id: str | None, *, percent: int = 0, per_unit: int = 0) -> DiscountRule:
        rule = DiscountRule(product_id, percent, per_unit)
        with self.lock:
            self._discounts.append(rule)
        return rule

    def reserve_transaction_id(self, transaction_id: str) -> None:
        """The next successful preview gets this id (ids are random UUIDs otherwise)."""
        with self.lock:
            self._reserved_ids.append(transaction_id)

    def seed_worked_example(self) -> None:
        """Configure the guide's example: 3 beers at 500 HUF -> 600 off, 800 credits, 100 due."""
        self.add_wallet(WORKED_EXAMPLE_WALLET, WORKED_EXAMPLE_CREDITS)
        self.issue_transaction_key(WORKED_EXAMPLE_WALLET, WORKED_EXAMPLE_TRANSACTION_KEY)
        self.add_discount(WORKED_EXAMPLE_PRODUCT_ID, percent=WORKED_EXAMPLE_DISCOUNT_PERCENT)
        self.reserve_transaction_id(WORKED_EXAMPLE_TRANSACTION_ID)

    # --- for a newcomer: demo customers and the keys that reach them ---

    def credentials(self) -> dict[str, str]:
        """The driver's keyword arguments (besides the base URL) for this sandbox."""
        return {"api_key": self._demo_api_key}

    def seed_demo(self) -> list[dict[str, str]]:
        """The guide's worked example and a well-funded demo customer; idempotent.

        QR keys are one-time, as at Cheers: once a sale used one, ask
        ``issue_customer`` for a fresh key.
        """
        with self.lock:
            if WORKED_EXAMPLE_WALLET not in self._wallets:
                self.seed_worked_example()
            if DEMO_WALLET not in self._wallets:
                self.add_wallet(DEMO_WALLET, DEMO_CREDITS)
                self.issue_transaction_key(DEMO_WALLET, DEMO_TRANSACTION_KEY)
        return [
            {
                "customer_token": WORKED_EXAMPLE_TRANSACTION_KEY,
                "description": (
                    f"the guide's worked example: {WORKED_EXAMPLE_CREDITS} credits,"
                    f" {WORKED_EXAMPLE_DISCOUNT_PERCENT}% off product {WORKED_EXAMPLE_PRODUCT_ID};"
                    " one-time QR key"
                ),
            },
            {
                "customer_token": DEMO_TRANSACTION_KEY,
                "description": f"demo customer with {DEMO_CREDITS} credits; one-time QR key",
            },
        ]

    def issue_customer(self) -> dict[str, str]:
        """A new customer with a funded wallet and a fresh one-time QR key."""
        with self.lock:
            wallet_id = ""
            while not wallet_id or wallet_id in self._wallets:
                self._issued_customers += 1
                wallet_id = f"issued-customer-{self._issued_customers}"
            self.add_wallet(wallet_id, DEMO_CREDITS)
            key = self.issue_transaction_key(wallet_id)
        return {
            "customer_token": key,
            "description": f"{wallet_id} with {DEMO_CREDITS} credits; one-time QR key",
        }

    # --- inspection ---

    def wallet_balance(self, wallet_id: str) -> int:
        """Credits in the wallet: opening balance minus finalized, plus refunded."""
        with self.lock:
            return self._wallets[wallet_id].balance

    def opening_balance(self, wallet_id: str) -> int:
        with self.lock:
            return self._wallets[wallet_id].opening_balance

    def wallet_available(self, wallet_id: str) -> int:
        """The balance less the credits open previews hold."""
        with self.lock:
            return self._wallets[wallet_id].balance - self._held(wallet_id)

    def transaction(self, transaction_id: str) -> CreditTransaction:
        with self.lock:
            return self._transactions[transaction_id]

    def status(self, transaction_id: str) -> str:
        """PREVIEWED, EXPIRED, FINALIZED, CANCELLED or REFUNDED, as of now."""
        with self.lock:
            return self._transactions[transaction_id].status_at(self.clock.now())

    def transactions(self) -> list[CreditTransaction]:
        with self.lock:
            return list(self._transactions.values())

    def transaction_key_used(self, key: str) -> bool:
        with self.lock:
            return self._keys[key.lower()].used_by is not None

    # --- the wire ---

    def error(self, status: int, code: str, message: str, **extra: Any) -> SandboxResponse:
        return SandboxResponse.json(status, {"code": code, "message": message, **extra})

    def not_found(self, request: SandboxRequest) -> SandboxResponse:
        return self.error(ASSUMED_ERROR_STATUS[NOT_FOUND], NOT_FOUND,
                          f"no route for {request.method} {request.path}")

    def authorize(self, request: SandboxRequest, operation: str) -> SandboxResponse | None:
        if request.header("x-api-key") not in self._terminals:
            return self.error(ASSUMED_ERROR_STATUS[UNAUTHORIZED], UNAUTHORIZED,
                              "missing or unknown X-API-Key")
        return None

    @route("POST", "/v3/integrations/credit-transactions/preview", "preview")
    def preview(self, request: SandboxRequest) -> SandboxResponse:
        idempotency_key = request.header("x-idempotency-key") or ""
        if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX_LENGTH:
            raise _fail(VALIDATION_ERROR, "X-Idempotency-Key must be 1-255 characters")
        transaction_key = request.header("x-transaction-key") or ""
        if not TRANSACTION_KEY_PATTERN.fullmatch(transaction_key):
            raise _fail(VALIDATION_ERROR, "X-Transaction-Key must be 32 hexadecimal characters")
        body = _body(request)

        # Idempotency keys are unique per device, so they are scoped by terminal.
        scope = (request.header("x-api-key"), idempotency_key)
        fingerprint = hashlib.sha256(
            transaction_key.lower().encode() + json.dumps(body, sort_keys=True).encode()
        ).hexdigest()
        replay = self._replays.get(scope)
        if replay is not None:
            if replay.fingerprint != fingerprint:
                raise _fail(IDEMPOTENCY_KEY_CONFLICT,
                            "this X-Idempotency-Key was used for another preview")
            return replay.response

        payment_type = body.get("paymentType")
        if payment_type not in PAYMENT_TYPES:
            raise _fail(VALIDATION_ERROR, f"paymentType must be one of {sorted(PAYMENT_TYPES)}")
        currency = _currency(body.get("currencyCode"))
        items = _items(body.get("items"), "items")
        key = self._usable_key(transaction_key)
        lines = self._price(items, payment_type, key.wallet_id)  # may refuse: key not consumed

        now = self.clock.now()
        transaction = CreditTransaction(
            id=self._reserved_ids.popleft() if self._reserved_ids else str(uuid.uuid4()),
            wallet_id=key.wallet_id,
            payment_type=payment_type,
            currency=currency,
            lines=lines,
            expires_at=now + self.preview_lifetime,
        )
        self._transactions[transaction.id] = transaction
        self._open.setdefault(transaction.wallet_id, {})[transaction.id] = transaction
        key.used_by = transaction.id
        response = SandboxResponse.json(200, transaction.view())
        self._replays[scope] = _Replay(fingerprint, response)
        return response

    @route("POST", "/v1/integrations/credit-transactions/{transaction_id}/update", "update")
    def update(self, request: SandboxRequest, transaction_id: str) -> SandboxResponse:
        transaction = self._transaction(transaction_id)
        self._require(transaction, PREVIEWED)
        body = _body(request)
        if _currency(body.get("currencyCode")) != transaction.currency:
            raise _fail(CURRENCY_MISMATCH, f"the transaction is in {transaction.currency}")
        # Fees and tips: never discounted, never paid with credits.
        transaction.lines.extend(
            _priced_line(item, discount=0, credits=0) for item in _items(body.get("newItems"), "newItems")
        )
        transaction.expires_at += UPDATE_EXTENSION
        return SandboxResponse.json(200, transaction.view())

    @route("POST", "/v3/integrations/credit-transactions/{transaction_id}/finalize", "finalize")
    def finalize(self, request: SandboxRequest, transaction_id: str) -> SandboxResponse:
        transaction = self._transaction(transaction_id)
        if transaction.status == FINALIZED:
            return SandboxResponse.json(200, transaction.view())  # a retry learns the same answer
        self._require(transaction, PREVIEWED)
        wallet = self._wallets[transaction.wallet_id]
        # The preview's hold guarantees this; kept so a broken hold cannot mint credits.
        if wallet.balance < transaction.credits:
            raise _fail(INSUFFICIENT_CREDIT, "the wallet no longer covers these credits")
        now = self.clock.now()
        wallet.balance -= transaction.credits
        transaction.status, transaction.finalized_at = FINALIZED, now
        self.ledger.append(LedgerEntry("finalize", transaction.id, wallet.id, transaction.credits, now))
        return SandboxResponse.json(200, transaction.view())

    @route("POST", "/v1/integrations/credit-transactions/{transaction_id}/cancel", "cancel")
    def cancel(self, request: SandboxRequest, transaction_id: str) -> SandboxResponse:
        transaction = self._transaction(transaction_id)
        if transaction.status == CANCELLED:
            return SandboxResponse.json(200, transaction.view())
        self._require(transaction, PREVIEWED)
        # Nothing is deducted; the hold goes with the status, the QR key stays consumed.
        transaction.status = CANCELLED
        return SandboxResponse.json(200, transaction.view())

    @route("POST", "/v1/integrations/credit-transactions/{transaction_id}/refund", "refund")
    def refund(self, request: SandboxRequest, transaction_id: str) -> SandboxResponse:
        transaction = self._transaction(transaction_id)
        if transaction.status == REFUNDED:
            return SandboxResponse.json(200, transaction.view())
        comment = _body(request).get("comment")
        if comment is not None and not isinstance(comment, str):
            raise _fail(VALIDATION_ERROR, "comment must be a string")
        status = transaction.status_at(self.clock.now())
        if status in (PREVIEWED, EXPIRED):
            raise _fail(CREDIT_TRANSACTION_NOT_FINALIZED, "only a finalized transaction can be refunded")
        if status != FINALIZED:
            raise _fail(_CONFLICT_BY_STATUS[status], f"the transaction is {status.lower()}")
        now = self.clock.now()
        if now >= transaction.finalized_at + REFUND_WINDOW:
            raise _fail(REFUND_WINDOW_CLOSED, "refunds are only possible within 24 hours of finalization")
        wallet = self._wallets[transaction.wallet_id]
        wallet.balance += transaction.credits
        transaction.status, transaction.refunded_at, transaction.refund_comment = REFUNDED, now, comment
        self.ledger.append(LedgerEntry("refund", transaction.id, wallet.id, transaction.credits, now))
        return SandboxResponse.json(200, transaction.view())

    # --- rules ---

    def _transaction(self, transaction_id: str) -> CreditTransaction:
        transaction = self._transactions.get(transaction_id)
        if transaction is None:
            raise _fail(CREDIT_TRANSACTION_NOT_FOUND, f"no credit transaction {transaction_id}")
        return transaction

    def _require(self, transaction: CreditTransaction, wanted: str) -> None:
        status = transaction.status_at(self.clock.now())
        if status != wanted:
            raise _fail(_CONFLICT_BY_STATUS[status], f"the transaction is {status.lower()}")

    def _usable_key(self, transaction_key: str) -> TransactionKey:
        key = self._keys.get(transaction_key.lower())
        if key is None:
            raise _fail(TRANSACTION_KEY_NOT_FOUND, "unknown X-Transaction-Key")
        if key.used_by is not None:
            raise _fail(TRANSACTION_KEY_ALREADY_USED, "this X-Transaction-Key was already used")
        if key.expires_at is not None and self.clock.now() >= key.expires_at:
            raise _fail(TRANSACTION_KEY_EXPIRED, "this X-Transaction-Key has expired")
        return key

    def _held(self, wallet_id: str) -> int:
        now = self.clock.now()
        open_ = self._open.get(wallet_id, {})
        for settled in [tx_id for tx_id, transaction in open_.items() if transaction.status != PREVIEWED]:
            del open_[settled]  # finalized, cancelled: never a preview again
        return sum(transaction.credits for transaction in open_.values() if transaction.status_at(now) == PREVIEWED)

    def _discount(self, item: Mapping[str, Any]) -> int:
        return max(
            (rule.discount(item["unitPrice"], item["quantity"])
             for rule in self._discounts if rule.applies_to(item["productId"])),
            default=0,
        )

    def _price(self, items: list[dict[str, Any]], payment_type: str, wallet_id: str) -> list[dict[str, Any]]:
        discounts = [self._discount(item) for item in items]
        due = sum(item["unitPrice"] * item["quantity"] - discount
                  for item, discount in zip(items, discounts))
        available = self._wallets[wallet_id].balance - self._held(wallet_id)
        if payment_type == CREDIT and due > available:
            raise _fail(INSUFFICIENT_CREDIT,
                        f"the wallet has {available} credits, the basket needs {due}")
        budget = 0 if payment_type == EXTERNAL_PAYMENT else available
        lines = []
        for item, discount in zip(items, discounts):
            credits = min(budget, item["unitPrice"] * item["quantity"] - discount)
            budget -= credits
            lines.append(_priced_line(item, discount, credits))
        return lines
