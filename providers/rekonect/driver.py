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
                          become line discounts; with ``SPLIT_PAYMENT`` the wallet the
                          business pays with (``payment_asset``) covers what it can.
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
refund                    re-send the submit (idempotent; it delivers the purchase
                          first if the queue has not yet); when its answer carries
                          the purchase's confirmation code, cancel the transaction by
                          it (the documented answer, ``data: {}``, carries none: the
                          purchase record stays, said on the receipt).  Then, when
                          points or credit paid, cancel the payment by its own code:
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
Sources:

- [seed] ``/work/shared/seeds/001_275983c781b9ee73.txt``: the ``/transaction`` call
  (submit and cancel flows, request example, answer ``{"status": "success", "data": {}}``,
  error ``522``, guaranteed delivery).
- [format] https://docs.rekonect.works/docs/overview/communication-format and
  https://docs.protelloyalty.com/docs/overview/communication-format: every call is an
  HTTPS POST with a JSON body to ``https://pos-api.fidelizacion.app/v1/{apiCall}``;
  headers ``x-api-key`` (which the seed's table omits), ``x-branch-id``, ``x-pos-id``,
  ``x-source-type``, ``x-source-name``; errors ``{"status": "error", "error": {"code",
  "message", "path"}}``, e.g. ``4001012`` "Member not found" at
  ``body.member.phoneNumber``.
- [flow] https://docs.rekonect.works/docs/flows/general-flow: member details, then the
  benefits preview (a transaction and ``x-return-benefits: true``), an optional
  ``/payment`` ``pay`` whose asset (points or credit) "is determined automatically
  based on business' configuration", then the mandatory ``/transaction`` submit for
  members and non-members; payment cancels are separate.
- [member] https://bade-docs.netlify.app/docs/api-calls/member-details and [payment]
  https://bade-docs.netlify.app/docs/api-calls/payment (the same API's docs, another
  deployment): the ``/member/details`` and ``/payment`` bodies carry ``transaction
  {transactionId, dateTime, totalAmount, items[{lineId, code, name, quantity,
  subtotal, total}], payments[{type, amount}], employee}``; ``pay`` answers
  ``data{confirmationCode, newBalance{points, credit}}`` (example: 300 paid with points,
  new balance 1700 points, 0 credit) and ``407`` when the balance is short; a cancel
  sends ``action: "cancel"`` with the ``confirmationCode`` (a reimbursement is a
  negative amount).  The docs' example members: ``530229344`` (John Doe, membership key
  ``0fe31b8b-5ad5-48af-81e9-4adc7d596042``) and ``5511122233`` (2000 points before
  the payment example).  That deployment's member-details *answer* (``status: "ok"``,
  member at the top level) and host (``api.prod.bcomo.com/api/v4``) are a different
  API generation; we follow the ``fidelizacion.app`` envelope of [format] and [payment].

Settled there and relied on: the hosts in ``ENVIRONMENTS``; POST everywhere; the five
headers; the public basket shape for ``/member/details`` and ``/payment`` and the seed's
shape for ``/transaction`` (each call gets its own); the envelope and ``407``, ``522``,
``4001012``; amounts in minor units, discounts negative, ISO 8601 UTC times, no empty
or null fields (the docs' own ``tags: []``: we have no tags and send none).

ASSUMED (no public source states it; each is one policy constant below, and tested):

- ``ASSUMED_METHOD``: POST also for ``/payment`` and ``/transaction`` ([format] says all
  calls; no per-call page shows the method).
- ``ASSUMED_ERROR_STATUS``: the HTTP status of an error envelope (the driver trusts the
  envelope, not the status, below 500).
- ``MEMBER_KEY_FIELD``: the member object accepts ``membershipKey`` as an identifier
  (the ``customer`` field page lists it; the ``member`` object is assumed alike).
- ``IDEMPOTENCY_FIELD``: ``pay`` and the submit are de-duplicated by
  ``transaction.transactionId`` (a repeat answers the original confirmation code);
  guaranteed delivery with retries is only safe if this holds.  Cancels of an already
  cancelled transaction or payment answer success again.
- ``NOT_RECORDED_CODES``: a submit refused with ``522`` recorded nothing (given the
  idempotency above), so a refund has no purchase to cancel, only the payment.
- ``SUBMIT_CONFIRMATION_FIELD``: the seed documents the submit's answer as ``data: {}``
  yet cancels "using the confirmation code received from the transaction response".
  The driver accepts both: with ``data.confirmationCode`` a refund cancels the purchase
  by it; with the documented empty ``data`` the refund still returns the points or
  credit (the payment has its own code) and records ``NO_PURCHASE_CODE_REASON``
  instead of an unknown outcome.  Answers of the cancels are read as success envelopes
  whose ``data`` may be empty; a code in them must be the one cancelled.
- ``TRANSACTION_CANCEL_SHAPE``: a transaction cancel is ``{transaction: {action:
  "cancel", confirmationCode}}``, by analogy with the payment object.
- ``BENEFITS_FIELD``: the benefits preview answers ``data.benefits{totalDiscount,
  items[{lineId, discountAmount}], appliedDeals[{key, name, appliedAmount}],
  usedAssets[{key, code, name, appliedAmount}]}``, amounts negative; ``data.member``
  repeats the member (its ``membershipKey`` must be the one first identified).
- ``ASSUMED_DEFAULT_PAYMENT_ASSET``: which wallet pays is business configuration the
  API does not expose, so the operator passes ``payment_asset`` ("points" or
  "credit"); the default is points, as in [payment]'s example.  The quote spends only
  that wallet, so it never promises what ``pay`` refuses with ``407``.  One point or
  one unit of credit is worth one minor unit (the example pays 300 with 300 points).
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

from txengine.answers import Answer
from txengine.drivers import Capabilities, Delivery, Exchange, HttpDriver, PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected, ValidationError
from txengine.machine import TimerPolicy
from txengine.models import LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from txengine.money import Money
from txengine.secret import Secret

# --- policy: where and how ------------------------------------------------------------------

#: published hosts (docs.rekonect.works/docs/overview/communication-format and the dev host
#: of the docs' curl examples); paths are ``/v1/{apiCall}``
DEV_BASE_URL = "https://dev-pos-api.fidelizacion.app"
PRODUCTION_BASE_URL = "https://pos-api.fidelizacion.app"
ENVIRONMENTS: Mapping[str, str] = {"sandbox": DEV_BASE_URL, "production": PRODUCTION_BASE_URL}
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

#: no documented answer comes near this; a bigger body is not a Rekonect answer
ANSWER_LIMIT_BYTES = 1_000_000

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
#: the member's two wallets, as ``/member/details`` and ``newBalance`` name them
WALLETS = ("credit", "points")
#: "The type of asset (e.g., points or credit) is determined automatically based on
#: business' configuration" (general-flow): the operator tells the driver which one
PAYMENT_ASSETS = frozenset(WALLETS)
#: the docs' payment example pays 300 with points (newBalance points 1700, credit 0)
ASSUMED_DEFAULT_PAYMENT_ASSET = "points"
PAID_WITH = {"points": "Paid with points", "credit": "Paid with credit"}
RETURNED_TO = {"points": "Returned to points", "credit": "Returned to credit"}
AUTO_REDEEM_ASSETS = True
EXTERNAL_TENDER_TYPE = "EXTERNAL"
LOYALTY_TENDER_TYPES = {"credit": "CREDIT", "points": "POINTS"}
SALE_ACTION = "sale"

#: SPLIT_PAYMENT: points and credit cover what they can; EXTERNAL_PAYMENT: benefits only
PAYMENT_TYPES = frozenset({"SPLIT_PAYMENT", "EXTERNAL_PAYMENT"})

#: communication-format: ``{"code": "4001012", "message": "Member not found", "path": ...}``
MEMBER_NOT_FOUND = "4001012"

#: a refund whose submit answered the documented ``data: {}`` has no code to cancel by
NO_PURCHASE_CODE_REASON = (
    "Rekonect's submit answer carried no confirmation code (the documented answer is"
    " an empty data object), so the purchase record could not be cancelled"
)
NO_PURCHASE_CODE_RECEIPT = "Loyalty purchase record kept (no confirmation code to cancel by)"

#: what a cashier reads for the documented codes; other codes show the provider's message
CASHIER_MESSAGES = {
    "407": "The member's points or credit do not cover this payment.",
    "522": "A gift in this purchase has already been used.",
    MEMBER_NOT_FOUND: "No loyalty member has this phone number or membership key.",
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


# --- the driver ---------------------------------------------------------------------------------


class RekonectDriver(HttpDriver):
    """Rekonect's POS API.  Credentials by keyword; every one becomes a request header."""

    name = "rekonect"
    environments: Mapping[str, str] = ENVIRONMENTS
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
        payment_asset: str = ASSUMED_DEFAULT_PAYMENT_ASSET,
        employee: str | None = None,
        **http: Any,
    ) -> None:
        api_key = Secret(api_key)
        _header_value("api_key", api_key)
        self._api_key = api_key
        self.source_type = _header_value("source_type", source_type)
        self.source_name = _header_value("source_name", source_name)
        self.pos_id = _header_value("pos_id", pos_id)
        self.branch_id = _header_value("branch_id", branch_id)
        if payment_asset not in PAYMENT_ASSETS:
            raise ValidationError(
                f"payment_asset must be one of {sorted(PAYMENT_ASSETS)} (the wallet this business's"
                f" Rekonect configuration draws), got {payment_asset!r}"
            )
        self.payment_asset = payment_asset
        if employee is not None and (not isinstance(employee, str) or not employee.strip()):
            raise ValidationError("employee must be a non-empty name, or None")
        self.employee = employee
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
        self, build: Callable[[], httpx.Request], where: str, *, retries: int = 0,
        redact: Iterable[str] = (),
    ) -> Exchange[Answer]:
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
            return self._data(response, where, redact)

    def _data(self, response: httpx.Response, where: str, redact: Iterable[str] = ()) -> Answer:
        """The ``data`` of a success envelope, a typed refusal, or ``ProtocolError``.

        A success needs HTTP 2xx, ``status: "success"`` and a ``data`` object; a refusal
        needs ``status: "error"`` with an ``error`` object whose ``code`` is a string.
        Anything else (``{}``, ``{"status": "error", "code": ...}`` without the error
        object, ``"ok"``, a list...) may hide an action: the outcome is unknown.
        """
        if response.status_code >= 500:
            raise self.unknown(f"{where}: HTTP {response.status_code} from Rekonect")
        if len(response.content) > ANSWER_LIMIT_BYTES:
            raise self.unknown(f"{where}: an answer of {len(response.content)} bytes")
        envelope = Answer(self.json_of(response), provider=self.name, where=where)
        status = envelope.raw("status", None)
        if status == "error":
            error = envelope.obj("error")
            raise self._rejected(error.text("code"), error.raw("message", None), redact)
        if status != "success" or not 200 <= response.status_code < 300:
            raise self.unknown(f"{where}: HTTP {response.status_code} without a success envelope")
        return envelope.obj("data")

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
        """An item of the purchase submit (the seed's ``/transaction`` shape)."""
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

    @staticmethod
    def _basket_item(line_id: int, item: LineItem, discount_minor: int) -> dict[str, Any]:
        """An item of ``/member/details`` and ``/payment`` (the public pages' shape)."""
        gross = item.gross.amount_minor
        return {
            "lineId": str(line_id),
            "code": item.product_id,
            "name": item.name,
            "quantity": item.quantity,
            "subtotal": gross,
            "total": gross - discount_minor,
        }

    def _draft_transaction(self, request: PreviewRequest) -> dict[str, Any]:
        """The basket before benefits, in the public ``/member/details`` shape."""
        return {
            IDEMPOTENCY_FIELD: request.tx_id,
            "dateTime": iso_utc(request.now),
            "totalAmount": request.basket.gross.amount_minor,
            "items": [self._basket_item(n, item, 0) for n, item in enumerate(request.basket.items, 1)],
            "employee": self.employee,
        }

    def _tenders(self, tx: Transaction) -> list[dict[str, Any]]:
        split = tx.details.get("loyalty_payment") or {}
        tenders = [
            {"type": LOYALTY_TENDER_TYPES[wallet], "amount": int(split.get(wallet, 0))}
            for wallet in WALLETS
        ]
        tenders.append({"type": EXTERNAL_TENDER_TYPE, "amount": tx.outstanding.amount_minor})
        return [tender for tender in tenders if tender["amount"]]

    def _paid_basket(self, tx: Transaction) -> dict[str, Any]:
        """The purchase as paid, in the public ``/payment`` shape."""
        lines = tx.items
        return {
            IDEMPOTENCY_FIELD: tx.id,
            "dateTime": iso_utc(tx.created_at),
            "totalAmount": sum(line.gross.amount_minor - line.discount.amount_minor for line in lines),
            "items": [
                self._basket_item(n, line.item, line.discount.amount_minor)
                for n, line in enumerate(lines, start=1)
            ],
            "payments": self._tenders(tx),
            "employee": self.employee,
        }

    def _completed_transaction(self, tx: Transaction) -> dict[str, Any]:
        """The purchase as paid, in the seed's ``/transaction`` shape."""
        lines = tx.items
        net = [line.gross.amount_minor - line.discount.amount_minor for line in lines]
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
            "meansOfPayment": self._tenders(tx),
            "employee": self.employee,
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
            "member details", retries=READ_RETRIES, redact=redact,
        )
        member_key = self._identified_member(identified, member)
        offered = self._active_assets(identified) if AUTO_REDEEM_ASSETS else []
        body = {"member": member, "transaction": self._draft_transaction(request), "usedAssets": offered}
        priced = yield from self._call(
            lambda: self._post(MEMBER_DETAILS_PATH, body, **{"x-return-benefits": "true"}),
            "benefits preview", retries=READ_RETRIES, redact=redact,
        )
        return self._member_quote(request, priced, member_key)

    def _non_member_quote(self, request: PreviewRequest) -> Quote:
        return Quote(
            lines=[PricedLine.unpriced(item) for item in request.basket.items],
            details={"member": False},
        )

    @staticmethod
    def _identified_member(data: Answer, asked: Mapping[str, str]) -> str:
        """The member's ``membershipKey``; the answer must be about the member asked for."""
        member = data.obj("member")
        for field, value in asked.items():
            if field in member:
                member.expect(field, value)
        for wallet in WALLETS:  # the documented balances, even if the preview re-reads them
            member.integer(wallet, optional=True, minimum=0)
        return member.text(MEMBER_KEY_FIELD)

    @staticmethod
    def _active_assets(data: Answer) -> list[dict[str, str]]:
        return [
            {"key": asset.text("key"), "code": asset.text("code")}
            for asset in data.objects("assets", optional=True)
            if (asset.text("status", optional=True) or "active") == "active"
        ]

    def _member_quote(self, request: PreviewRequest, data: Answer, member_key: str) -> Quote:
        basket = request.basket
        currency = basket.currency
        member = data.obj("member")
        member.expect(MEMBER_KEY_FIELD, member_key)
        balance = {wallet: member.integer(wallet, optional=True, minimum=0) or 0 for wallet in WALLETS}
        discounts, deals, assets = self._benefits(data.obj(BENEFITS_FIELD), basket)

        # Only the wallet the business configured pays: promising the other one would
        # quote a payment Rekonect refuses with 407.
        asset = self.payment_asset
        spendable = balance[asset] if request.payment_type == "SPLIT_PAYMENT" else 0
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
        split = {wallet: paid if wallet == asset else 0 for wallet in WALLETS}

        receipt = [
            ReceiptLine("name-value", name=offer.get("name") or offer["key"],
                        value=str(Money(offer["appliedAmount"], currency)))
            for offer in (*deals, *assets)
        ]
        if paid:
            receipt.append(ReceiptLine("name-value", name=PAID_WITH[asset],
                                       value=str(Money(-paid, currency))))
        return Quote(
            lines=lines,
            receipt=receipt,
            details={
                "member": True,
                "member_key": member_key,
                "balance": balance,
                "payment_asset": asset,
                "loyalty_payment": split,
                "applied_deals": deals,
                "used_assets": assets,
            },
        )

    @staticmethod
    def _benefits(
        benefits: Answer, basket
    ) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
        """Per-line discounts (positive minor units), the deals and the gifts applied.

        Every figure must agree: line discounts sum to ``totalDiscount``, which is what
        the deals and gifts add up to, and no line is discounted below zero.
        """
        gross = [item.gross.amount_minor for item in basket.items]
        discounts = [0] * len(gross)
        seen: set[str] = set()
        for entry in benefits.objects("items", optional=True):
            line_id = entry.text("lineId")
            if line_id in seen or not line_id.isdigit() or not 1 <= int(line_id) <= len(gross):
                raise entry.fail("lineId is not a line of this basket")
            seen.add(line_id)
            discounts[int(line_id) - 1] = -_not_positive(entry, "discountAmount", optional=True)
        deals = [
            {"key": deal.text("key"), "name": deal.text("name", optional=True) or "",
             "appliedAmount": _not_positive(deal, "appliedAmount")}
            for deal in benefits.objects("appliedDeals", optional=True)
        ]
        assets = [
            {"key": asset.text("key"), "code": asset.text("code"),
             "name": asset.text("name", optional=True) or "",
             "appliedAmount": _not_positive(asset, "appliedAmount")}
            for asset in benefits.objects("usedAssets", optional=True)
        ]
        deals = [deal for deal in deals if deal["appliedAmount"]]
        assets = [asset for asset in assets if asset["appliedAmount"]]
        total = -_not_positive(benefits, "totalDiscount", optional=True)
        offered = -sum(offer["appliedAmount"] for offer in (*deals, *assets))
        if sum(discounts) != total or offered != total:
            raise benefits.fail("line discounts, deals and gifts and totalDiscount disagree")
        if any(discount > line for discount, line in zip(discounts, gross)):
            raise benefits.fail("a line is discounted beyond its price")
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
            "transaction": self._paid_basket(tx),
        }
        data = yield from self._call(lambda: self._post(PAYMENT_PATH, body), "payment pay")
        code = data.text(SUBMIT_CONFIRMATION_FIELD)
        balance = self._balance(data.obj("newBalance"))
        return Outcome(
            provider_ref=code,
            receipt=[
                ReceiptLine("name-value", name=PAID_WITH[self._asset_of(tx)],
                            value=str(tx.total_credits)),
                ReceiptLine("name-value", name="Points left", value=str(balance["points"])),
                ReceiptLine("name-value", name="Credit left",
                            value=str(Money(balance["credit"], tx.currency))),
            ],
            details={"loyalty_paid": True, "payment_confirmation_code": code, "balance": balance},
        )

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        """Cancel the purchase when Rekonect told us its code; always return points or credit.

        The seed documents the submit's answer as ``data: {}``, yet cancels a purchase by
        "the confirmation code received from the transaction response".  The submit is
        re-sent (idempotent, and it delivers the purchase if the queue has not yet): when
        its answer carries ``confirmationCode`` the purchase is cancelled by it; when it
        is the documented empty ``data`` there is no code to cancel by, and the refund
        says so on its receipt instead of guessing.  A loyalty payment has its own code
        (from ``pay``) and is cancelled either way.
        """
        details: dict[str, Any] = {}
        receipt: list[ReceiptLine] = []
        recorded, purchase_code = yield from self._purchase_code(tx)
        if purchase_code is not None:
            container, field, value = TRANSACTION_CANCEL_SHAPE
            cancel = {container: {field: value, "confirmationCode": purchase_code}}
            data = yield from self._call(lambda: self._post(TRANSACTION_PATH, cancel), "transaction cancel")
            if SUBMIT_CONFIRMATION_FIELD in data:
                data.expect(SUBMIT_CONFIRMATION_FIELD, purchase_code)
            details.update(purchase_confirmation_code=purchase_code, purchase_cancelled=True)
            receipt.append(ReceiptLine("textline", text="Loyalty purchase cancelled"))
        else:
            details.update(purchase_cancelled=False)
            if recorded:
                details.update(purchase_not_cancelled=NO_PURCHASE_CODE_REASON)
                receipt.append(ReceiptLine("textline", text=NO_PURCHASE_CODE_RECEIPT))
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
            data = yield from self._call(lambda: self._post(PAYMENT_PATH, body), "payment cancel")
            if SUBMIT_CONFIRMATION_FIELD in data:
                data.expect(SUBMIT_CONFIRMATION_FIELD, payment_code)
            details.update(payment_cancelled=True)
            if "newBalance" in data:
                details.update(balance=self._balance(data.obj("newBalance")))
            receipt.append(ReceiptLine("name-value", name=RETURNED_TO[self._asset_of(tx)],
                                       value=str(tx.total_credits)))
        return Outcome(receipt=receipt, details=details)

    def _purchase_code(self, tx: Transaction) -> Exchange[tuple[bool, str | None]]:
        """Whether Rekonect recorded the purchase, and its confirmation code when it said."""
        submit = self._submit_body(tx)
        try:
            submitted = yield from self._call(lambda: self._post(TRANSACTION_PATH, submit), "transaction submit")
        except ProviderRejected as refusal:
            if refusal.code in NOT_RECORDED_CODES:
                return False, None  # its queued submit is parked for the same reason
            raise
        return True, submitted.text(SUBMIT_CONFIRMATION_FIELD, optional=True)

    def _require_member(self, tx: Transaction, purpose: str) -> dict[str, str]:
        member = self._member_of(tx)
        if member is None:
            raise ValidationError(
                f"cannot {purpose}: transaction {tx.id} has no Rekonect member",
                tx_id=tx.id, state=tx.state,
            )
        return member

    def _asset_of(self, tx: Transaction) -> str:
        # transactions previewed before payment_asset existed drew either wallet
        return tx.details.get("payment_asset") or "points"

    @staticmethod
    def _balance(value: Answer) -> dict[str, int]:
        return {wallet: value.integer(wallet, minimum=0) for wallet in WALLETS}

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
            data = yield from self._call(lambda: self._post(TRANSACTION_PATH, payload), "transaction submit")
            # The documented answer is an empty data object; a code, when sent, is a string.
            data.text(SUBMIT_CONFIRMATION_FIELD, optional=True)


def _not_positive(answer: Answer, name: str, *, optional: bool = False) -> int:
    """A discount amount: an integer, zero or negative (the docs' sign for discounts)."""
    value = answer.integer(name, optional=optional)
    if value is None:
        return 0
    if value > 0:
        raise answer.fail(f"{name} is positive")
    return value


def _plain(value: Any) -> Any:
    """Stored payloads may come back as read-only mappings and tuples; JSON wants dicts."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
