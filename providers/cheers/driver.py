"""Cheers Loyalty: credit transactions priced, finalized and refunded by the provider.

The customer shows a QR code; the cashier scans its *transaction key* and the POS asks
Cheers to preview the basket.  Cheers applies its discounts, spends wallet credits and
answers the outstanding balance the POS collects by cash or card.  Fees and tips are
added afterwards with ``update`` (no discount, no credits); ``finalize`` deducts the
credits, ``cancel`` abandons the preview, ``refund`` returns the credits within 24 h.

Lifecycle mapping::

    preview        POST /v3/integrations/credit-transactions/preview
                   X-Transaction-Key (the QR, one-time), X-Idempotency-Key
    update         POST /v1/integrations/credit-transactions/{id}/update   {currencyCode, newItems}
    begin_payment  local (the POS collects ``outstandingBalance`` itself)
    finalize       POST /v3/integrations/credit-transactions/{id}/finalize
    cancel         POST /v1/integrations/credit-transactions/{id}/cancel
    refund         POST /v1/integrations/credit-transactions/{id}/refund   {comment}
    expire         local; its deferred ``release`` delivery sends the cancel call

Every call carries ``X-API-Key`` (one key per terminal).

Fidelity note
=============
Stated by Cheers' integration guide (``seeds/000_919258d34161637c.txt``) and relied on:

- the five paths above, their methods and API versions; the three headers; the sandbox
  host ``api.dev.votesess.com`` (production ``api.uniqpon.com``);
- request bodies ``{paymentType, currencyCode, items[{productId, quantity, unitPrice,
  name, vat}]}``, ``{currencyCode, newItems[...]}`` and ``{comment}``; the preview and
  update answer ``{transactionId, totalCredits, totalDiscount, outstandingBalance,
  currencyCode, items[{productId, name, unitPrice, quantity, credits, discount,
  outstandingBalance, vat}]}``, where ``update`` answers the whole basket;
- amounts in whole currency units (1 credit = 1 unit of local currency), VAT an integer
  percent; ``productId`` may be null;
- ``paymentType`` ``SPLIT_PAYMENT``, ``CREDIT``, ``EXTERNAL_PAYMENT``; ``CREDIT`` without
  enough credits fails with ``INSUFFICIENT_CREDIT`` and the POS falls back to
  ``EXTERNAL_PAYMENT`` (we tell the cashier; we never retry silently);
- the transaction key matches ``^[0-9a-fA-F]{32}$`` and is one-time: a preview consumes
  it and a cancel leaves it consumed; ``X-Idempotency-Key`` is 1-255 characters, unique
  per device, and a duplicate returns the same preview instead of charging twice;
- update adds items with zero discount and zero credits and extends the preview by
  ``UPDATE_EXTENSION``; finalize deducts the credits; cancel deducts nothing; refund
  returns the credits, only within ``REFUND_WINDOW`` of finalize, else
  ``CREDIT_TRANSACTION_CAN_NO_LONGER_BE_REFUNDED_BY_EXTERNAL_DEVICE``.

ASSUMED (no public source states it; each is one policy constant below, tested as such):

- ``ASSUMED_PREVIEW_LIFETIME``: a preview lives 10 minutes (from the product design);
- ``ASSUMED_ERROR_STATUS``: the HTTP status of every error code, and the names of every
  code except the two the guide names (``INSUFFICIENT_CREDIT`` and the refund one);
- ``ASSUMED_ERROR_ENVELOPE``: error bodies are ``{"code", "message"}``; the driver also
  reads ``{"error": {"code", "message"}}``, and a 4xx without a readable code becomes
  ``HTTP_<status>``;
- ``ASSUMED_REPLAYED_COMMANDS``: finalize, cancel and refund repeated on a transaction
  already in that state answer the same result, so retrying after a lost answer is
  safe.  Should Cheers answer an ``..._ALREADY_<STATE>`` error instead, the driver reads
  that as the success it is (``ALREADY_DONE``), and a 4xx whose code it cannot read
  as an unknown outcome (it might be that answer).  Only the preview's replay is documented;
- ``ASSUMED_COMMAND_ANSWER``: finalize, cancel and refund answer the transaction in the
  preview's shape (the guide says the POS then has everything to print the receipt);
  an empty 2xx body is accepted too; a body for another transaction, or a finalize or
  refund moving other credits than the transaction holds, is a protocol error;
- ``ASSUMED_DEFAULT_REFUND_COMMENT``: sent when the POS gives no refund comment (the guide
  always shows one, so we never omit it);
- a cancel of a preview that already expired at Cheers (``CREDIT_TRANSACTION_EXPIRED``)
  freed it as surely as the cancel would have, so cancel and the release delivery
  count it as done.

Retries: after a transport failure the driver re-sends a safe call once, at once
(``TRANSPORT_RETRIES``): the preview under its idempotency key, and the replayed
commands.  ``update`` is the one call that is not idempotent (the guide gives it no
idempotency key), so it is never re-sent here; if the engine's recovery re-sends it
after a lost answer, Cheers adds the lines twice.  The driver recognises that answer
and refuses it with ``UPDATE_APPLIED_TWICE`` (our code, not Cheers'), telling the
cashier to cancel and start again, rather than storing a basket that differs from the
provider's.  The credits at stake are unaffected: added lines never carry credits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import httpx

from txengine.drivers import Capabilities, Delivery, Exchange, HttpDriver, PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected, ValidationError
from txengine.machine import TimerPolicy
from txengine.models import LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from txengine.money import Money
from txengine.secret import Secret

# --- documented facts -------------------------------------------------------------------

SANDBOX_BASE_URL = "https://api.dev.votesess.com"
PRODUCTION_BASE_URL = "https://api.uniqpon.com"

PREVIEW_PATH = "/v3/integrations/credit-transactions/preview"
UPDATE_PATH = "/v1/integrations/credit-transactions/{transaction_id}/update"
FINALIZE_PATH = "/v3/integrations/credit-transactions/{transaction_id}/finalize"
CANCEL_PATH = "/v1/integrations/credit-transactions/{transaction_id}/cancel"
REFUND_PATH = "/v1/integrations/credit-transactions/{transaction_id}/refund"
COMMAND_PATHS: Mapping[str, str] = MappingProxyType(
    {"finalize": FINALIZE_PATH, "cancel": CANCEL_PATH, "refund": REFUND_PATH}
)

API_KEY_HEADER = "X-API-Key"
TRANSACTION_KEY_HEADER = "X-Transaction-Key"
IDEMPOTENCY_KEY_HEADER = "X-Idempotency-Key"

SPLIT_PAYMENT = "SPLIT_PAYMENT"
CREDIT = "CREDIT"
EXTERNAL_PAYMENT = "EXTERNAL_PAYMENT"
PAYMENT_TYPES = frozenset({SPLIT_PAYMENT, CREDIT, EXTERNAL_PAYMENT})

TRANSACTION_KEY_PATTERN = re.compile(r"[0-9a-fA-F]{32}")
IDEMPOTENCY_KEY_MAX_LENGTH = 255

UPDATE_EXTENSION = timedelta(minutes=10)
REFUND_WINDOW = timedelta(hours=24)

INSUFFICIENT_CREDIT = "INSUFFICIENT_CREDIT"
REFUND_WINDOW_CLOSED = "CREDIT_TRANSACTION_CAN_NO_LONGER_BE_REFUNDED_BY_EXTERNAL_DEVICE"

# --- assumptions (see the fidelity note) -------------------------------------------------

#: ASSUMED: how long a preview lives before finalize (the design says 10 minutes).
ASSUMED_PREVIEW_LIFETIME = timedelta(minutes=10)

# Error codes the guide does not name (ASSUMED names; their statuses below).
UNAUTHORIZED = "UNAUTHORIZED"
VALIDATION_ERROR = "VALIDATION_ERROR"
NOT_FOUND = "NOT_FOUND"
TRANSACTION_KEY_NOT_FOUND = "TRANSACTION_KEY_NOT_FOUND"
TRANSACTION_KEY_ALREADY_USED = "TRANSACTION_KEY_ALREADY_USED"
TRANSACTION_KEY_EXPIRED = "TRANSACTION_KEY_EXPIRED"
IDEMPOTENCY_KEY_CONFLICT = "IDEMPOTENCY_KEY_CONFLICT"
CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
CREDIT_TRANSACTION_NOT_FOUND = "CREDIT_TRANSACTION_NOT_FOUND"
CREDIT_TRANSACTION_EXPIRED = "CREDIT_TRANSACTION_EXPIRED"
CREDIT_TRANSACTION_ALREADY_FINALIZED = "CREDIT_TRANSACTION_ALREADY_FINALIZED"
CREDIT_TRANSACTION_ALREADY_CANCELLED = "CREDIT_TRANSACTION_ALREADY_CANCELLED"
CREDIT_TRANSACTION_ALREADY_REFUNDED = "CREDIT_TRANSACTION_ALREADY_REFUNDED"
CREDIT_TRANSACTION_NOT_FINALIZED = "CREDIT_TRANSACTION_NOT_FINALIZED"

#: ASSUMED: the HTTP status Cheers answers with each error code.
ASSUMED_ERROR_STATUS: Mapping[str, int] = MappingProxyType({
    VALIDATION_ERROR: 400,
    UNAUTHORIZED: 401,
    NOT_FOUND: 404,
    TRANSACTION_KEY_NOT_FOUND: 404,
    CREDIT_TRANSACTION_NOT_FOUND: 404,
    TRANSACTION_KEY_ALREADY_USED: 409,
    IDEMPOTENCY_KEY_CONFLICT: 409,
    CREDIT_TRANSACTION_ALREADY_FINALIZED: 409,
    CREDIT_TRANSACTION_ALREADY_CANCELLED: 409,
    CREDIT_TRANSACTION_ALREADY_REFUNDED: 409,
    CREDIT_TRANSACTION_NOT_FINALIZED: 409,
    TRANSACTION_KEY_EXPIRED: 410,
    CREDIT_TRANSACTION_EXPIRED: 410,
    INSUFFICIENT_CREDIT: 422,
    CURRENCY_MISMATCH: 422,
    REFUND_WINDOW_CLOSED: 422,
})

#: ASSUMED: the fields of an error body (``{"code": ..., "message": ...}``).
ASSUMED_ERROR_ENVELOPE = ("code", "message")

#: ASSUMED: these calls, repeated on a transaction already in their target state,
#: answer the same result; the driver retries them once after a transport failure.
ASSUMED_REPLAYED_COMMANDS = frozenset({"finalize", "cancel", "refund"})

#: ASSUMED: finalize, cancel and refund answer the transaction in the preview's shape;
#: the driver reads these two fields of it, when present.
ASSUMED_COMMAND_ANSWER = ("transactionId", "totalCredits")

#: The commands whose answer must show the credits the transaction holds.
CREDIT_MOVING_COMMANDS = frozenset({"finalize", "refund"})

#: ASSUMED: the comment sent with a refund when the POS gives none.
ASSUMED_DEFAULT_REFUND_COMMENT = "Refunded at the point of sale"

# --- driver policy ----------------------------------------------------------------------

#: Immediate re-sends after a transport failure, for calls that are safe to repeat.
TRANSPORT_RETRIES = 1

#: The code of a 4xx whose body names none (``HTTP_403``).  For finalize, cancel and
#: refund it is an unknown outcome, not a refusal: it might hide an ``ALREADY_...`` answer.
UNREADABLE_CODE_PREFIX = "HTTP_"

#: Our own code (not Cheers'): an update re-sent after a lost answer landed twice.
UPDATE_APPLIED_TWICE = "UPDATE_APPLIED_TWICE"

#: A transaction already in the state a command asked for: the command is done.
ALREADY_DONE: Mapping[str, frozenset[str]] = MappingProxyType({
    "finalize": frozenset({CREDIT_TRANSACTION_ALREADY_FINALIZED}),
    "cancel": frozenset({CREDIT_TRANSACTION_ALREADY_CANCELLED, CREDIT_TRANSACTION_EXPIRED}),
    "refund": frozenset({CREDIT_TRANSACTION_ALREADY_REFUNDED}),
})

TIMERS = TimerPolicy(
    preview_ttl=ASSUMED_PREVIEW_LIFETIME,
    update_extension=UPDATE_EXTENSION,
    refund_window=REFUND_WINDOW,
)

#: What the cashier reads for each code; unknown codes show Cheers' own message.
CASHIER_MESSAGES: Mapping[str, str] = MappingProxyType({
    INSUFFICIENT_CREDIT: (
        "Not enough Cheers credits to pay the whole basket. Retry the same QR code with"
        " payment type EXTERNAL_PAYMENT: discounts still apply and the customer pays the"
        " rest by cash or card."
    ),
    REFUND_WINDOW_CLOSED: (
        "Cheers refunds are only possible within 24 hours of the purchase; this one can"
        " no longer be refunded at the till."
    ),
    UNAUTHORIZED: "Cheers did not accept this terminal's API key; check the POS set-up.",
    TRANSACTION_KEY_NOT_FOUND: "Cheers does not recognise this QR code; ask the customer to show it again.",
    TRANSACTION_KEY_ALREADY_USED: "This Cheers QR code was already used; ask the customer for a new one.",
    TRANSACTION_KEY_EXPIRED: "This Cheers QR code has expired; ask the customer to refresh it.",
    IDEMPOTENCY_KEY_CONFLICT: "This request id was already used for another basket; start a new payment.",
    CURRENCY_MISMATCH: "The added items are not in the basket's currency.",
    CREDIT_TRANSACTION_NOT_FOUND: "Cheers has no record of this payment.",
    CREDIT_TRANSACTION_EXPIRED: "The Cheers preview expired; cancel and scan a new QR code.",
    CREDIT_TRANSACTION_ALREADY_FINALIZED: "This Cheers payment is already completed.",
    CREDIT_TRANSACTION_ALREADY_CANCELLED: "This Cheers payment was cancelled.",
    CREDIT_TRANSACTION_ALREADY_REFUNDED: "This Cheers payment was already refunded.",
    CREDIT_TRANSACTION_NOT_FINALIZED: "Only a completed Cheers payment can be refunded.",
    UPDATE_APPLIED_TWICE: (
        "Cheers recorded the added items twice after a lost answer. Cancel this payment"
        " and start again with a new QR code."
    ),
})

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
# Printable ASCII, no surrounding blanks: a header value that round-trips exactly.
_HEADER_SAFE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
# Provider messages are shown to cashiers and stored: never let a QR key through.
_KEY_LIKE = re.compile(r"[0-9a-fA-F]{32}")
_MAX_PROVIDER_MESSAGE = 300


# --- money and line items on the wire ----------------------------------------------------


def whole_units(money: Money) -> int:
    """``money`` in whole currency units, or ValidationError if it has a fraction."""
    units = money.to_decimal()
    if units != units.to_integral_value():
        raise ValidationError(
            f"Cheers takes whole {money.currency} amounts; {money} has a fractional part"
        )
    return int(units)


def money_of(value: Any, currency: str, field: str) -> Money:
    """A whole-unit amount from a Cheers answer; ValueError if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} is not a number")
    exact = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    if not exact.is_finite() or exact != exact.to_integral_value() or exact < 0:
        raise ValueError(f"{field} is not a whole, non-negative amount: {value!r}")
    return Money.of(int(exact), currency)


def whole_vat(item: LineItem) -> int:
    if item.vat_percent != item.vat_percent.to_integral_value():
        raise ValidationError(
            f"Cheers takes VAT as an integer percent; {item.name!r} has {item.vat_percent}"
        )
    return int(item.vat_percent)


def wire_item(item: LineItem) -> dict[str, Any]:
    """One line in the guide's field order."""
    return {
        "productId": item.product_id,
        "quantity": item.quantity,
        "unitPrice": whole_units(item.unit_price),
        "name": item.name,
        "vat": whole_vat(item),
    }


def _wire_items(items: Iterable[LineItem], currency: str) -> list[dict[str, Any]]:
    lines = []
    for item in items:
        if not isinstance(item, LineItem):
            raise ValidationError("every added line must be a LineItem")
        if item.currency != currency:
            raise ValidationError(f"{item.name!r} is in {item.currency}, the basket in {currency}")
        lines.append(wire_item(item))
    if not lines:
        raise ValidationError("add at least one line")
    return lines


def _same_line(answer: Mapping[str, Any], item: LineItem) -> bool:
    return (
        isinstance(answer, Mapping)
        and answer.get("productId") == item.product_id
        and answer.get("quantity") == item.quantity
        and money_of(answer.get("unitPrice"), item.currency, "unitPrice") == item.unit_price
    )


# --- the driver --------------------------------------------------------------------------


class CheersDriver(HttpDriver):
    """Cheers Loyalty over httpx; one instance per terminal (its ``api_key``)."""

    name = "cheers"
    environments: Mapping[str, str] = {"sandbox": SANDBOX_BASE_URL, "production": PRODUCTION_BASE_URL}
    capabilities = Capabilities(
        remote={"preview", "update", "finalize", "cancel", "refund"},
        local={"begin_payment"},
        deferred={"expire": ("release",)},
        timers=TIMERS,
        payment_types=PAYMENT_TYPES,
        not_idempotent={"update"},  # a re-sent update adds its lines again at Cheers
    )
    #: the HTTP call behind each remote event and deferred delivery (for the diagrams)
    calls: Mapping[str, str] = {
        "preview": f"POST {PREVIEW_PATH}",
        "update": "POST " + UPDATE_PATH.format(transaction_id="{id}"),
        "finalize": "POST " + FINALIZE_PATH.format(transaction_id="{id}"),
        "cancel": "POST " + CANCEL_PATH.format(transaction_id="{id}"),
        "refund": "POST " + REFUND_PATH.format(transaction_id="{id}"),
        "release": "POST " + CANCEL_PATH.format(transaction_id="{id}"),
    }

    def __init__(
        self,
        *,
        api_key: str | Secret,
        **http: Any,
    ) -> None:
        if not isinstance(api_key, (str, Secret)):
            raise ValidationError("api_key must be a string")
        self._api_key = Secret(api_key)
        if not _VISIBLE_ASCII.fullmatch(self._api_key.reveal()):
            raise ValidationError("api_key must be a non-empty string of visible ASCII characters")
        super().__init__(**http)

    # --- lifecycle events ---
    # Each public method validates eagerly (ValidationError before the engine claims
    # anything) and returns the exchange generator that talks to Cheers.

    def preview(self, request: PreviewRequest) -> Exchange[Quote]:
        transaction_key = self._transaction_key(request.customer_token)
        idempotency_key = self._idempotency_key(request.idempotency_key)
        if request.payment_type not in PAYMENT_TYPES:
            raise ValidationError(
                f"Cheers payment types are {', '.join(sorted(PAYMENT_TYPES))},"
                f" not {request.payment_type!r}"
            )
        basket = request.basket
        body = {
            "paymentType": request.payment_type,
            "currencyCode": basket.currency,
            "items": _wire_items(basket.items, basket.currency),
        }
        headers = {
            TRANSACTION_KEY_HEADER: transaction_key.reveal(),
            IDEMPOTENCY_KEY_HEADER: idempotency_key,
        }
        return self._preview(body, headers, basket.items)

    def _preview(
        self, body: dict[str, Any], headers: dict[str, str], items: tuple[LineItem, ...]
    ) -> Exchange[Quote]:
        # Documented: a duplicate X-Idempotency-Key answers the same preview.
        answer = yield from self._call(PREVIEW_PATH, body, headers, retries=TRANSPORT_RETRIES)
        return self._quote(answer, items, body["currencyCode"])

    def update(self, tx: Transaction, items: tuple[LineItem, ...], key: str) -> Exchange[Quote]:
        transaction_id = self._transaction_id(tx)
        added = tuple(items)
        body = {"currencyCode": tx.currency, "newItems": _wire_items(added, tx.currency)}
        path = UPDATE_PATH.format(transaction_id=quote(transaction_id, safe=""))
        return self._update(path, body, tx, added)

    def _update(
        self, path: str, body: dict[str, Any], tx: Transaction, added: tuple[LineItem, ...]
    ) -> Exchange[Quote]:
        # Never re-sent inline: the guide gives update no idempotency key.
        answer = yield from self._call(path, body, retries=0)
        before = tuple(line.item for line in tx.items)
        if self._applied_twice(answer, before, added):
            raise self.rejected(UPDATE_APPLIED_TWICE, CASHIER_MESSAGES[UPDATE_APPLIED_TWICE])
        return self._quote(answer, before + added, tx.currency, expected_id=tx.provider_ref)

    def finalize(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        return self._command("finalize", self._transaction_id(tx), None, tx)

    def cancel(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        return self._command("cancel", self._transaction_id(tx), None, tx)

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        if comment is not None and not isinstance(comment, str):
            raise ValidationError("a refund comment must be a string")
        # A blank comment is no comment: Cheers always gets a readable one.
        comment = (comment or "").strip() or ASSUMED_DEFAULT_REFUND_COMMENT
        return self._command("refund", self._transaction_id(tx), {"comment": comment}, tx)

    def _command(
        self,
        operation: str,
        transaction_id: str,
        body: dict[str, Any] | None,
        tx: Transaction | None,
    ) -> Exchange[Outcome]:
        path = COMMAND_PATHS[operation].format(transaction_id=quote(transaction_id, safe=""))
        retries = TRANSPORT_RETRIES if operation in ASSUMED_REPLAYED_COMMANDS else 0
        try:
            answer = yield from self._call(path, body, retries=retries)
        except ProviderRejected as refused:
            if refused.code.startswith(UNREADABLE_CODE_PREFIX):
                # A refusal whose code we cannot read may be the "already done" answer to a
                # retry: unknown, so recovery asks again rather than settling it as refused.
                raise self.unknown(f"{operation}: HTTP error without a readable code ({refused.code})") from None
            if refused.code not in ALREADY_DONE[operation]:
                raise
            # Cheers already holds the state we asked for (a retry after a lost answer,
            # or a preview that expired on its side): the command is done.
            return Outcome(provider_ref=transaction_id, details={f"cheers_{operation}": refused.code})
        self._check_confirmation(answer, transaction_id, tx, operation)
        return Outcome(provider_ref=transaction_id)

    # --- deferred delivery: free an expired preview at Cheers ---

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        if kind != "release":
            raise ValueError(f"Cheers has no {kind!r} delivery")
        return {"transactionId": self._transaction_id(tx)}

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[None]:
        for delivery in deliveries:
            if delivery.kind != "release":
                raise ValueError(f"Cheers has no {delivery.kind!r} delivery")
            # An expired or already cancelled preview is released: redelivery is a no-op.
            yield from self._command("cancel", str(delivery.payload["transactionId"]), None, None)

    # --- validation of caller input ---

    @staticmethod
    def _transaction_key(token: Secret | None) -> Secret:
        if token is None:
            raise ValidationError("Cheers needs the customer's QR transaction key")
        if not isinstance(token, Secret):
            token = Secret(token)
        if not TRANSACTION_KEY_PATTERN.fullmatch(token.reveal()):
            # Never echo the value: it is the customer's one-time key.
            raise ValidationError("the customer's transaction key must be 32 hexadecimal characters")
        return token

    @staticmethod
    def _idempotency_key(key: str) -> str:
        if not isinstance(key, str) or not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH:
            raise ValidationError(
                f"the idempotency key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters"
            )
        if not _HEADER_SAFE.fullmatch(key):
            # A header value must round-trip exactly for the replay to match.
            raise ValidationError(
                "the idempotency key must be printable ASCII without leading or trailing blanks"
            )
        return key

    @staticmethod
    def _transaction_id(tx: Transaction) -> str:
        if not tx.provider_ref:
            raise ValidationError(f"transaction {tx.id} has no Cheers transaction id")
        return tx.provider_ref

    # --- the wire ---

    def _call(
        self,
        path: str,
        body: dict[str, Any] | None,
        headers: Mapping[str, str] | None = None,
        *,
        retries: int,
    ) -> Exchange[dict[str, Any]]:
        """POST once (plus ``retries`` re-sends after a transport failure); the answer."""
        all_headers = {API_KEY_HEADER: self._api_key.reveal(), "Content-Type": "application/json"}
        all_headers.update(headers or {})
        for attempt in range(retries + 1):
            try:
                response = yield self.request("POST", path, json=body, headers=all_headers)
            except OutcomeUnknown:
                if attempt == retries:
                    raise
                continue
            return self._answer(response)
        raise AssertionError("unreachable")

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if 200 <= status < 300:
            if not response.content.strip():
                return {}
            body = self.json_of(response)
            if not isinstance(body, dict):
                raise self.unknown(f"HTTP {status} with a body that is not a JSON object")
            return body
        if 400 <= status < 500 and status != 408:
            code, message = self._error_of(response)
            raise self.rejected(code, message, retry_after=self._retry_after(response))
        # 5xx, 408, and anything a POST should never get: Cheers may have acted.
        raise self.unknown(f"HTTP {status} from Cheers")

    @staticmethod
    def _error_of(response: httpx.Response) -> tuple[str, str]:
        code_field, message_field = ASSUMED_ERROR_ENVELOPE
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        code = body.get(code_field) if isinstance(body, dict) else None
        provider_message = body.get(message_field) if isinstance(body, dict) else None
        if not isinstance(code, str) or not code.strip():
            code = f"{UNREADABLE_CODE_PREFIX}{response.status_code}"
        if code in CASHIER_MESSAGES:
            return code, CASHIER_MESSAGES[code]
        if isinstance(provider_message, str) and provider_message.strip():
            text = _KEY_LIKE.sub("***", provider_message.strip())[:_MAX_PROVIDER_MESSAGE]
            return code, f"Cheers refused the request: {text}"
        return code, f"Cheers refused the request (HTTP {response.status_code})."

    @staticmethod
    def _retry_after(response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    # --- reading answers ---

    def _quote(
        self,
        answer: Mapping[str, Any],
        items: Sequence[LineItem],
        currency: str,
        *,
        expected_id: str | None = None,
    ) -> Quote:
        """The priced basket, or ProtocolError if the answer is not ``items`` priced."""
        try:
            transaction_id = answer["transactionId"]
            if not isinstance(transaction_id, str) or not transaction_id:
                raise ValueError("transactionId is missing")
            if expected_id is not None and transaction_id != expected_id:
                raise ValueError(f"the answer is for transaction {transaction_id}")
            if answer["currencyCode"] != currency:
                raise ValueError(f"currencyCode {answer['currencyCode']!r} is not {currency}")
            answered = answer["items"]
            if not isinstance(answered, list) or len(answered) != len(items):
                raise ValueError(f"expected {len(items)} priced lines")
            lines = []
            for item, line in zip(items, answered):
                if not _same_line(line, item):
                    raise ValueError(f"the priced line for {item.name!r} does not match the basket")
                lines.append(PricedLine(
                    item=item,
                    discount=money_of(line["discount"], currency, "discount"),
                    credits=money_of(line["credits"], currency, "credits"),
                    outstanding=money_of(line["outstandingBalance"], currency, "outstandingBalance"),
                ))
            quote = Quote(lines=lines, provider_ref=transaction_id, receipt=_receipt(lines, currency))
            self._check_totals(answer, quote.lines, currency)
        except (KeyError, TypeError, ValueError) as broken:
            # ValidationError is a ValueError: parts that do not add up are never stored.
            raise self.unknown(f"unusable Cheers answer: {broken}") from None
        return quote

    @staticmethod
    def _check_totals(answer: Mapping[str, Any], lines: Sequence[PricedLine], currency: str) -> None:
        for field, part in (
            ("totalCredits", "credits"),
            ("totalDiscount", "discount"),
            ("outstandingBalance", "outstanding"),
        ):
            expected = sum((getattr(line, part) for line in lines), Money.zero(currency))
            if money_of(answer[field], currency, field) != expected:
                raise ValueError(f"{field} is not the sum of the lines' {part}")

    def _applied_twice(
        self, answer: Mapping[str, Any], before: tuple[LineItem, ...], added: tuple[LineItem, ...]
    ) -> bool:
        """True when the answer is ``before + added + added``: a re-sent update landed again."""
        answered = answer.get("items")
        if not isinstance(answered, list) or len(answered) != len(before) + 2 * len(added):
            return False
        try:
            return all(_same_line(line, item) for line, item in zip(answered, before + added + added))
        except ValueError:
            return False

    def _check_confirmation(
        self, answer: Mapping[str, Any], transaction_id: str, tx: Transaction | None, operation: str
    ) -> None:
        """The answer must be about our transaction; finalize and refund must move our credits.

        Discount and outstanding balance are not compared: they move no credits, and a
        mismatch there must not leave a committed transaction in doubt forever.
        """
        id_field, credits_field = ASSUMED_COMMAND_ANSWER
        if not answer:
            return
        answered_id = answer.get(id_field)
        if answered_id is not None and answered_id != transaction_id:
            raise self.unknown(f"Cheers answered for transaction {answered_id!r}")
        if tx is None or operation not in CREDIT_MOVING_COMMANDS or credits_field not in answer:
            return
        try:
            credits = money_of(answer[credits_field], tx.currency, credits_field)
        except ValueError as broken:
            raise self.unknown(f"unusable Cheers answer: {broken}") from None
        if credits != tx.total_credits:
            raise self.unknown(
                f"Cheers {operation}d {credits} of credits, the transaction holds {tx.total_credits}"
            )


def _receipt(lines: Sequence[PricedLine], currency: str) -> tuple[ReceiptLine, ...]:
    def total(part: str) -> Money:
        return sum((getattr(line, part) for line in lines), Money.zero(currency))

    return (
        ReceiptLine("separator", text="Cheers Loyalty"),
        ReceiptLine("name-value", name="Discount: ", value=str(total("discount"))),
        ReceiptLine("name-value", name="Credits: ", value=str(total("credits"))),
        ReceiptLine("name-value", name="To pay: ", value=str(total("outstanding"))),
    )

