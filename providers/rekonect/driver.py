"""Rekonect (white-labelled as Protel Loyalty): member benefits, loyalty payments and a
guaranteed purchase submit.

Rekonect has no "priced basket" object of its own.  A till identifies the member, asks
for the benefits a draft basket earns, optionally pays part of it with the member's
points or credit, and after the sale submits the completed purchase, for members and
non-members alike, so the loyalty engine can award points and consume gifts.

Lifecycle mapping
=================

========================  ===========================================================
event                     what the driver does
========================  ===========================================================
preview                   member: two ``POST /v1/member/details`` calls: identify the
                          member (balances, active gifts), then the benefits preview
                          (``x-return-benefits: true`` with the draft basket and the
                          member's active gifts in ``usedAssets``).  Deals and gifts
                          become line discounts; with ``SPLIT_PAYMENT`` the member's
                          points and credit then cover what they can.
                          Non-member (``customer_token=None``): no call; no benefits,
                          the whole basket is outstanding.
update                    local: fees and tips carry no discount and no points or
                          credit (the lifecycle's rule), so the engine adds them
                          unpriced.  A second benefits call could reprice lines the
                          cashier has already quoted (threshold deals), for nothing
                          the lifecycle wants.
begin_payment             local.
finalize                  ``POST /v1/payment`` ``action: pay`` when points or credit
                          are used (synchronous: ``407`` refuses it), then the
                          purchase submit ``POST /v1/transaction`` as a guaranteed
                          deferred delivery (``deferred={"finalize": ("submit",)}``):
                          ``delivery_payload`` builds the whole body at commit time,
                          ``deliver`` sends it on ``DELIVERY_SCHEDULE``.
cancel                    local: nothing is charged before finalize.
refund                    re-send the submit (idempotent: it returns the purchase's
                          confirmation code, and delivers the purchase first if the
                          queue has not yet), cancel the transaction by that code,
                          then, when points or credit paid, cancel the payment too:
                          cancelling a transaction does not cancel its payment.  A
                          purchase Rekonect refused to record (``522``, its submit
                          parked) has nothing to cancel: only the payment is.
expire                    local: Rekonect holds nothing for a preview.
========================  ===========================================================

Members are identified after the preview by the ``membershipKey`` Rekonect returns,
never by the customer's phone number: the engine keeps no customer key (it is a
``Secret``), and delivery payloads are stored in the database.

Fidelity note
=============
Stated by the integration docs (seed excerpt and the public Rekonect / Protel Loyalty
docs) and relied on here:

- headers ``x-api-key``, ``x-source-type``, ``x-source-name``, ``x-pos-id``,
  ``x-branch-id`` on every call; ``x-return-assets`` (active, inactive, all) and
  ``x-return-benefits`` (boolean) on ``/member/details``;
- ``/member/details`` takes ``member`` and an optional ``transaction``; the member
  response carries ``membershipKey``, ``points`` and ``credit``;
- ``/payment`` takes ``member``, ``payment{action, amount, confirmationCode}`` and the
  ``transaction``; ``pay`` answers ``data.confirmationCode`` and
  ``newBalance{points, credit}``; a cancel carries the confirmation code and a negative
  amount; the wallet drawn (points or credit) is chosen by the business' configuration;
- ``/transaction`` submits the purchase in the seed's shape (``member``,
  ``transaction{transactionId, openTime, totalAmount, totalTaxAmount,
  totalGeneralDiscount, items[], meansOfPayment[]}``, ``usedAssets[]``,
  ``appliedDeals[]``) for every purchase, with guaranteed delivery (retry on 5xx or a
  communication failure: two quick retries near the purchase time, then later in the
  day; a 5-10 s timeout), or cancels one by its confirmation code;
- envelope ``{status: "success", data}`` / ``{status: "error", error{code, message}}``;
  codes ``407`` (balance insufficient) and ``522`` (used asset already used);
- amounts in the smallest currency unit, discounts negative; ISO 8601 UTC times; no
  empty or null fields.  The docs' own examples send ``tags: []``; we have no tags, so
  we send no ``tags`` at all rather than an empty list.

ASSUMED (no public source states it; each is one policy constant below):

- ``ASSUMED_BASE_URL``: the dev host in the public docs' curl examples; the production
  host of a given white label is not published.  ``/v1`` comes from the same examples.
- ``ASSUMED_METHOD``: POST for every call (the docs show it for ``/member/details``).
- ``ASSUMED_ERROR_STATUS``: the HTTP status of an error envelope (the driver trusts the
  envelope, not the status, below 500).
- ``MEMBER_KEY_FIELD``: the member object accepts ``membershipKey`` as an identifier.
- ``IDEMPOTENCY_FIELD``: ``pay`` and the submit are de-duplicated by
  ``transaction.transactionId`` (a repeat answers the original confirmation code);
  guaranteed delivery with retries is only safe if this holds.  Cancels of an already
  cancelled transaction or payment answer success again.
- ``NOT_RECORDED_CODES``: a submit refused with ``522`` recorded nothing (given the
  idempotency above), so a refund has no purchase to cancel, only the payment.
- ``SUBMIT_CONFIRMATION_FIELD``: the submit answers ``data.confirmationCode`` (the seed
  shows ``data: {}`` yet says cancels use "the confirmation code received from the
  transaction response").
- ``TRANSACTION_CANCEL_SHAPE``: a transaction cancel is ``{transaction: {action:
  "cancel", confirmationCode}}``, by analogy with the payment object.
- ``BENEFITS_FIELD``: the benefits preview answers ``data.benefits{totalDiscount,
  items[{lineId, discountAmount}], appliedDeals[{key, name, appliedAmount}],
  usedAssets[{key, code, name, appliedAmount}]}``, amounts negative.
- ``WALLET_ORDER``: a payment draws credit first, then points; one point or one unit
  of credit is worth one minor unit (the docs' example pays 300 with 300 points).
- ``AUTO_REDEEM_ASSETS``: every active gift of the member is offered to the benefits
  preview; only the gifts that earn a discount are used.
- ``EXTERNAL_TENDER_TYPE``: the engine does not learn whether the outstanding balance
  was paid in cash or by card; it is reported as one external tender.
- ``TIMERS``: Rekonect holds nothing for a preview and documents no refund limit; the
  lifecycle's default deadlines apply (POS-overridable).
- Prices include VAT; ``totalTaxAmount`` is the VAT inside each line's net amount,
  rounded half up per line.  No currency is sent: an account has one currency.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx

from txengine.drivers import Capabilities, Delivery, Exchange, HttpDriver, PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected, ValidationError
from txengine.machine import TimerPolicy
from txengine.models import LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from txengine.money import Money
from txengine.secret import Secret

# --- policy: where and how ------------------------------------------------------------------

ASSUMED_BASE_URL = "https://dev-pos-api.fidelizacion.app"
API_PREFIX = "/v1"
ASSUMED_METHOD = "POST"
MEMBER_DETAILS_PATH = f"{API_PREFIX}/member/details"
PAYMENT_PATH = f"{API_PREFIX}/payment"
TRANSACTION_PATH = f"{API_PREFIX}/transaction"

#: HTTP status the provider pairs with an error envelope (the sandbox uses it).
ASSUMED_ERROR_STATUS = 400

#: the docs ask for a 5-10 s timeout
REQUEST_TIMEOUT = httpx.Timeout(8.0, connect=5.0)

#: guaranteed submit: two quick retries near the purchase time, then later in the day
DELIVERY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=10),
    timedelta(seconds=60),
    timedelta(hours=1),
    timedelta(hours=3),
    timedelta(hours=6),
)

TIMERS = TimerPolicy(
    preview_ttl=timedelta(minutes=10),
    update_extension=timedelta(minutes=10),
    refund_window=timedelta(hours=24),
)

#: read-only calls are re-sent once in the same exchange when the answer is lost
READ_RETRIES = 1

# --- policy: what the wire carries ----------------------------------------------------------

PHONE_FIELD = "phoneNumber"
MEMBER_KEY_FIELD = "membershipKey"
IDEMPOTENCY_FIELD = "transactionId"
SUBMIT_CONFIRMATION_FIELD = "confirmationCode"
TRANSACTION_CANCEL_SHAPE = ("transaction", "action", "cancel")
BENEFITS_FIELD = "benefits"
#: a submit refused with these codes was not recorded (the id is new to Rekonect), so a
#: refund has no purchase to cancel; it still returns the points or credit
NOT_RECORDED_CODES = frozenset({"522"})
WALLET_ORDER = ("credit", "points")
AUTO_REDEEM_ASSETS = True
EXTERNAL_TENDER_TYPE = "EXTERNAL"
LOYALTY_TENDER_TYPES = {"credit": "CREDIT", "points": "POINTS"}
SALE_ACTION = "sale"

#: SPLIT_PAYMENT: points and credit cover what they can; EXTERNAL_PAYMENT: benefits only
PAYMENT_TYPES = frozenset({"SPLIT_PAYMENT", "EXTERNAL_PAYMENT"})

#: what a cashier reads for the documented codes; other codes show the provider's message
CASHIER_MESSAGES = {
    "407": "The member's points or credit do not cover this payment.",
    "522": "A gift in this purchase has already been used.",
}

_PHONE = re.compile(r"^\+?[0-9]{6,15}$")
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")
_HEADER_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$")


# --- small helpers ----------------------------------------------------------------------------


def iso_utc(moment: datetime) -> str:
    """ISO 8601 UTC, second precision, ``Z`` suffix, as in the docs' examples."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def vat_inside(amount_minor: int, vat_percent: Decimal) -> int:
    """The VAT contained in a VAT-inclusive amount, rounded half up to a minor unit."""
    if not vat_percent or not amount_minor:
        return 0
    tax = Decimal(amount_minor) * vat_percent / (Decimal(100) + vat_percent)
    return int(tax.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def compact(value: Any) -> Any:
    """Drop None, "", [] and {} everywhere: the docs ask for no empty or null fields."""
    if isinstance(value, Mapping):
        kept = {key: compact(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if not _is_empty(item)}
    if isinstance(value, (list, tuple)):
        return [compact(item) for item in value if not _is_empty(compact(item))]
    return value


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def member_identifier(token: Secret) -> dict[str, str]:
    """The member object for a customer key: a phone number or a ``membershipKey``."""
    raw = token.reveal().strip()
    phone = _PHONE_SEPARATORS.sub("", raw)
    if _PHONE.match(phone):
        return {PHONE_FIELD: phone}
    try:
        return {MEMBER_KEY_FIELD: str(uuid.UUID(raw))}
    except ValueError:
        # never echo the token: it is the customer's key
        raise ValidationError(
            "customer_token must be the member's phone number or membership key"
        ) from None


def _header_value(name: str, value: Any) -> str:
    if isinstance(value, Secret):
        value = value.reveal()
    if not isinstance(value, str) or not _HEADER_VALUE.match(value):
        raise ValidationError(
            f"{name} must be 1-255 printable ASCII characters without surrounding spaces"
        )
    return value


def _int(value: Any, what: str, *, sign: int = 0) -> int:
    """An integer amount from the provider; ``sign`` -1 means <= 0, +1 means >= 0."""
    if type(value) is not int or (sign < 0 and value > 0) or (sign > 0 and value < 0):
        raise ValueError(f"{what} is {value!r}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} is {value!r}")
    return value


# --- the driver ---------------------------------------------------------------------------------


class RekonectDriver(HttpDriver):
    """Rekonect's POS API.  Credentials by keyword; every one becomes a request header."""

    name = "rekonect"
    environments: Mapping[str, str] = {"sandbox": ASSUMED_BASE_URL}
    timeout = REQUEST_TIMEOUT
    capabilities = Capabilities(
        remote={"preview", "finalize", "refund"},
        local={"update", "begin_payment", "cancel"},
        deferred={"finalize": ("submit",)},
        timers=TIMERS,
        payment_types=PAYMENT_TYPES,
        delivery_schedule=DELIVERY_SCHEDULE,
        delivery_batch=1,
    )
    #: the HTTP calls behind each remote event and deferred delivery (for the diagrams)
    calls: Mapping[str, str] = {
        "preview": f"{ASSUMED_METHOD} {MEMBER_DETAILS_PATH} (member, then benefits)",
        "finalize": f"{ASSUMED_METHOD} {PAYMENT_PATH} (pay) when points or credit are used",
        "refund": f"{ASSUMED_METHOD} {TRANSACTION_PATH} (submit, cancel)"
                  f" + {ASSUMED_METHOD} {PAYMENT_PATH} (cancel) when paid",
        "submit": f"{ASSUMED_METHOD} {TRANSACTION_PATH} (submit)",
    }

    def __init__(
        self,
        *,
        api_key: str | Secret,
        source_type: str = "POS",
        source_name: str,
        pos_id: str,
        branch_id: str,
        **http: Any,
    ) -> None:
        api_key = Secret(api_key)
        _header_value("api_key", api_key)
        self._api_key = api_key
        self.source_type = _header_value("source_type", source_type)
        self.source_name = _header_value("source_name", source_name)
        self.pos_id = _header_value("pos_id", pos_id)
        self.branch_id = _header_value("branch_id", branch_id)
        super().__init__(**http)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, source_name={self.source_name!r},"
            f" pos_id={self.pos_id!r}, branch_id={self.branch_id!r})"
        )

    # --- requests and answers ---

    def _post(self, path: str, body: Mapping[str, Any], **extra_headers: str) -> httpx.Request:
        headers = {
            "x-api-key": self._api_key.reveal(),
            "x-source-type": self.source_type,
            "x-source-name": self.source_name,
            "x-pos-id": self.pos_id,
            "x-branch-id": self.branch_id,
            **extra_headers,
        }
        return self.request(ASSUMED_METHOD, path, json=compact(body), headers=headers)

    def _call(
        self, build: Callable[[], httpx.Request], *, retries: int = 0, redact: Iterable[str] = ()
    ) -> Exchange[dict[str, Any]]:
        """Send one request and return its ``data``; re-send read-only ones when lost."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = yield build()
            except OutcomeUnknown:
                if attempt > retries:
                    raise
                continue
            if response.status_code >= 500 and attempt <= retries:
                continue
            return self._data(response, redact)

    def _data(self, response: httpx.Response, redact: Iterable[str] = ()) -> dict[str, Any]:
        if response.status_code >= 500:
            raise self.unknown(f"HTTP {response.status_code} from Rekonect")
        body = self.json_of(response)
        if not isinstance(body, dict):
            raise self.unknown(f"HTTP {response.status_code}: the answer is not a JSON object")
        if body.get("status") == "error":
            error = body.get("error")
            if not isinstance(error, dict) or error.get("code") in (None, ""):
                raise self.unknown(f"HTTP {response.status_code}: an error without a code")
            raise self._rejected(str(error["code"]), error.get("message"), redact)
        if body.get("status") != "success" or not 200 <= response.status_code < 300:
            raise self.unknown(f"HTTP {response.status_code} without a success envelope")
        data = body.get("data")
        if not isinstance(data, dict):
            raise self.unknown("a success envelope without a data object")
        return data

    def _rejected(self, code: str, message: Any, redact: Iterable[str]) -> ProviderRejected:
        text = CASHIER_MESSAGES.get(code)
        if text is None:
            said = str(message or "no message").strip()
            for secret in redact:
                if secret:
                    said = said.replace(secret, "***")
            said = "".join(ch if ch.isprintable() else " " for ch in said)[:200]
            text = f"The loyalty system refused the request: {said}"
        return self.rejected(code, text)

    # --- wire shapes ---

    @staticmethod
    def _item(line_id: int, item: LineItem, discount_minor: int) -> dict[str, Any]:
        gross = item.gross.amount_minor
        return {
            "lineId": str(line_id),
            "code": item.product_id,
            "name": item.name,
            "quantity": item.quantity,
            "grossAmount": gross,
            "netAmount": gross - discount_minor,
            "action": SALE_ACTION,
        }

    def _draft_transaction(self, request: PreviewRequest) -> dict[str, Any]:
        """The basket before benefits: what the benefits preview prices."""
        items = request.basket.items
        return {
            IDEMPOTENCY_FIELD: request.tx_id,
            "openTime": iso_utc(request.now),
            "totalAmount": request.basket.gross.amount_minor,
            "totalTaxAmount": sum(vat_inside(i.gross.amount_minor, i.vat_percent) for i in items),
            "items": [self._item(n, item, 0) for n, item in enumerate(items, start=1)],
        }

    def _completed_transaction(self, tx: Transaction) -> dict[str, Any]:
        """The purchase as paid: line discounts, loyalty tenders, the external tender."""
        lines = tx.items
        net = [line.gross.amount_minor - line.discount.amount_minor for line in lines]
        split = tx.details.get("loyalty_payment") or {}
        tenders = [
            {"type": LOYALTY_TENDER_TYPES[wallet], "amount": int(split.get(wallet, 0))}
            for wallet in WALLET_ORDER
        ]
        tenders.append({"type": EXTERNAL_TENDER_TYPE, "amount": tx.outstanding.amount_minor})
        return {
            IDEMPOTENCY_FIELD: tx.id,
            "openTime": iso_utc(tx.created_at),
            "totalAmount": sum(net),
            "totalTaxAmount": sum(vat_inside(n, line.vat_percent) for n, line in zip(net, lines)),
            # Deals and gifts are attributed to lines; nothing is a receipt-level discount.
            "totalGeneralDiscount": 0,
            "items": [
                self._item(n, line.item, line.discount.amount_minor)
                for n, line in enumerate(lines, start=1)
            ],
            "meansOfPayment": [tender for tender in tenders if tender["amount"]],
        }

    @staticmethod
    def _member_of(tx: Transaction) -> dict[str, str] | None:
        key = tx.details.get("member_key")
        return {MEMBER_KEY_FIELD: key} if key else None

    def _submit_body(self, tx: Transaction) -> dict[str, Any]:
        return compact({
            "member": self._member_of(tx),
            "transaction": self._completed_transaction(tx),
            "usedAssets": [
                {"key": a["key"], "code": a["code"], "appliedAmount": a["appliedAmount"]}
                for a in tx.details.get("used_assets") or ()
            ],
            "appliedDeals": [
                {"key": d["key"], "appliedAmount": d["appliedAmount"]}
                for d in tx.details.get("applied_deals") or ()
            ],
        })

    # --- preview ---

    def preview(self, request: PreviewRequest) -> Exchange[Quote]:
        if request.payment_type not in PAYMENT_TYPES:
            raise ValidationError(
                f"payment_type must be one of {sorted(PAYMENT_TYPES)}, got {request.payment_type!r}"
            )
        if request.customer_token is None:
            return self._non_member_quote(request)
        member = member_identifier(request.customer_token)
        redact = (request.customer_token.reveal(), *member.values())

        identified = yield from self._call(
            lambda: self._post(MEMBER_DETAILS_PATH, {"member": member}, **{"x-return-assets": "active"}),
            retries=READ_RETRIES, redact=redact,
        )
        offered = self._active_assets(identified) if AUTO_REDEEM_ASSETS else []
        body = {"member": member, "transaction": self._draft_transaction(request), "usedAssets": offered}
        priced = yield from self._call(
            lambda: self._post(MEMBER_DETAILS_PATH, body, **{"x-return-benefits": "true"}),
            retries=READ_RETRIES, redact=redact,
        )
        return self._member_quote(request, priced)

    def _non_member_quote(self, request: PreviewRequest) -> Quote:
        return Quote(
            lines=[PricedLine.unpriced(item) for item in request.basket.items],
            details={"member": False},
        )

    def _active_assets(self, data: dict[str, Any]) -> list[dict[str, str]]:
        assets = data.get("assets") or []
        try:
            return [
                {"key": _text(asset["key"], "asset key"), "code": _text(asset["code"], "asset code")}
                for asset in assets
                if asset.get("status", "active") == "active"
            ]
        except (KeyError, TypeError, AttributeError, ValueError) as broken:
            raise self.unknown(f"unusable member assets: {broken}") from None

    def _member_quote(self, request: PreviewRequest, data: dict[str, Any]) -> Quote:
        basket = request.basket
        currency = basket.currency
        try:
            member = data["member"]
            member_key = _text(member[MEMBER_KEY_FIELD], "membershipKey")
            balance = {wallet: _int(member.get(wallet, 0), wallet, sign=1) for wallet in WALLET_ORDER}
            discounts, deals, assets = self._benefits(data[BENEFITS_FIELD], basket)
        except (KeyError, TypeError, AttributeError, ValueError) as broken:
            raise self.unknown(f"unusable benefits preview: {broken}") from None

        spendable = sum(balance.values()) if request.payment_type == "SPLIT_PAYMENT" else 0
        lines = []
        for item, discount in zip(basket.items, discounts):
            credits = min(spendable, item.gross.amount_minor - discount)
            spendable -= credits
            lines.append(PricedLine(
                item=item,
                discount=Money(discount, currency),
                credits=Money(credits, currency),
                outstanding=Money(item.gross.amount_minor - discount - credits, currency),
            ))
        paid = sum(line.credits.amount_minor for line in lines)
        split, rest = {}, paid
        for wallet in WALLET_ORDER:
            split[wallet] = min(balance[wallet], rest)
            rest -= split[wallet]

        receipt = [
            ReceiptLine("name-value", name=offer.get("name") or offer["key"],
                        value=str(Money(offer["appliedAmount"], currency)))
            for offer in (*deals, *assets)
        ]
        if paid:
            receipt.append(ReceiptLine("name-value", name="Paid with points/credit",
                                       value=str(Money(-paid, currency))))
        return Quote(
            lines=lines,
            receipt=receipt,
            details={
                "member": True,
                "member_key": member_key,
                "balance": balance,
                "loyalty_payment": split,
                "applied_deals": deals,
                "used_assets": assets,
            },
        )

    def _benefits(
        self, benefits: dict[str, Any], basket
    ) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
        """Per-line discounts (positive minor units), the deals and the gifts applied.

        Every figure must agree: line discounts sum to ``totalDiscount``, which is what
        the deals and gifts add up to, and no line is discounted below zero.
        """
        gross = [item.gross.amount_minor for item in basket.items]
        discounts = [0] * len(gross)
        for entry in benefits.get("items") or []:
            index = int(_text(entry["lineId"], "lineId")) - 1
            if not 0 <= index < len(gross):
                raise ValueError(f"unknown lineId {entry['lineId']!r}")
            discounts[index] += -_int(entry.get("discountAmount", 0), "discountAmount", sign=-1)
        deals = [
            {"key": _text(deal["key"], "deal key"), "name": deal.get("name") or "",
             "appliedAmount": _int(deal["appliedAmount"], "deal appliedAmount", sign=-1)}
            for deal in benefits.get("appliedDeals") or []
        ]
        assets = [
            {"key": _text(asset["key"], "asset key"), "code": _text(asset["code"], "asset code"),
             "name": asset.get("name") or "",
             "appliedAmount": _int(asset["appliedAmount"], "asset appliedAmount", sign=-1)}
            for asset in benefits.get("usedAssets") or []
        ]
        deals = [deal for deal in deals if deal["appliedAmount"]]
        assets = [asset for asset in assets if asset["appliedAmount"]]
        total = -_int(benefits.get("totalDiscount", 0), "totalDiscount", sign=-1)
        offered = -sum(offer["appliedAmount"] for offer in (*deals, *assets))
        if sum(discounts) != total or offered != total:
            raise ValueError(
                f"line discounts {sum(discounts)}, deals and gifts {offered}, total {total} disagree"
            )
        if any(discount > line for discount, line in zip(discounts, gross)):
            raise ValueError("a line is discounted beyond its price")
        return discounts, deals, assets

    # --- finalize and refund (update and cancel are local) ---

    def finalize(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        loyalty = tx.total_credits.amount_minor
        if not loyalty:
            # Nothing to charge now; the purchase submit is queued by the engine.
            return Outcome(details={"loyalty_paid": False})
        member = self._require_member(tx, "pay with points or credit")
        body = {
            "member": member,
            "payment": {"action": "pay", "amount": loyalty},
            "transaction": self._completed_transaction(tx),
        }
        data = yield from self._call(lambda: self._post(PAYMENT_PATH, body))
        try:
            code = _text(data["confirmationCode"], "confirmationCode")
            balance = self._balance(data["newBalance"])
        except (KeyError, TypeError, AttributeError, ValueError) as broken:
            raise self.unknown(f"unusable payment answer: {broken}") from None
        return Outcome(
            provider_ref=code,
            receipt=[
                ReceiptLine("name-value", name="Paid with points/credit",
                            value=str(tx.total_credits)),
                ReceiptLine("name-value", name="Points left", value=str(balance["points"])),
                ReceiptLine("name-value", name="Credit left",
                            value=str(Money(balance["credit"], tx.currency))),
            ],
            details={"loyalty_paid": True, "payment_confirmation_code": code, "balance": balance},
        )

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        # The queued submit may not have been delivered yet; re-sending it is idempotent
        # and answers the purchase's confirmation code either way.
        details: dict[str, Any] = {}
        receipt: list[ReceiptLine] = []
        purchase_code = yield from self._purchase_code(tx)
        if purchase_code is not None:
            container, field, value = TRANSACTION_CANCEL_SHAPE
            cancel = {container: {field: value, "confirmationCode": purchase_code}}
            yield from self._call(lambda: self._post(TRANSACTION_PATH, cancel))
            details.update(purchase_confirmation_code=purchase_code, purchase_cancelled=True)
            receipt.append(ReceiptLine("textline", text="Loyalty purchase cancelled"))
        else:
            details.update(purchase_cancelled=False)
        payment_code = tx.details.get("payment_confirmation_code")
        if payment_code:
            # Cancelling the transaction does not return the points or credit it used.
            body = {
                "member": self._require_member(tx, "return points or credit"),
                "payment": {
                    "action": "cancel",
                    "confirmationCode": payment_code,
                    "amount": -tx.total_credits.amount_minor,
                },
            }
            data = yield from self._call(lambda: self._post(PAYMENT_PATH, body))
            try:
                balance = self._balance(data["newBalance"])
            except (KeyError, TypeError, AttributeError, ValueError) as broken:
                raise self.unknown(f"unusable payment cancel answer: {broken}") from None
            details.update(payment_cancelled=True, balance=balance)
            receipt.append(ReceiptLine("name-value", name="Returned to points/credit",
                                       value=str(tx.total_credits)))
        return Outcome(receipt=receipt, details=details)

    def _purchase_code(self, tx: Transaction) -> Exchange[str | None]:
        """The purchase's confirmation code, or None when Rekonect refused to record it."""
        submit = self._submit_body(tx)
        try:
            submitted = yield from self._call(lambda: self._post(TRANSACTION_PATH, submit))
        except ProviderRejected as refusal:
            if refusal.code in NOT_RECORDED_CODES:
                return None  # its queued submit is parked for the same reason
            raise
        try:
            return _text(submitted[SUBMIT_CONFIRMATION_FIELD], "confirmationCode")
        except (KeyError, TypeError, ValueError) as broken:
            raise self.unknown(f"unusable submit answer: {broken}") from None

    def _require_member(self, tx: Transaction, purpose: str) -> dict[str, str]:
        member = self._member_of(tx)
        if member is None:
            raise ValidationError(
                f"cannot {purpose}: transaction {tx.id} has no Rekonect member",
                tx_id=tx.id, state=tx.state,
            )
        return member

    @staticmethod
    def _balance(value: Any) -> dict[str, int]:
        return {wallet: _int(value[wallet], f"newBalance.{wallet}", sign=1) for wallet in WALLET_ORDER}

    # --- the guaranteed submit ---

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        if kind != "submit":
            raise ValueError(f"Rekonect has no {kind!r} delivery")
        return self._submit_body(tx)

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[None]:
        for delivery in deliveries:
            if delivery.kind != "submit":
                raise ValueError(f"Rekonect has no {delivery.kind!r} delivery")
            payload = _plain(delivery.payload)
            yield from self._call(lambda: self._post(TRANSACTION_PATH, payload))


def _plain(value: Any) -> Any:
    """Stored payloads may come back as read-only mappings and tuples; JSON wants dicts."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
