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
Sources (stored copies are reachable with the ``search`` tool):

- SEED: Cheers' integration guide (``/work/shared/seeds/000_919258d34161637c.txt``);
- AUTH: https://integration.cheersapp.io/docs/integrations/cheers-loyalty/authentication
  (headers and their formats, the environments table, the POS product endpoint);
- FLOW: https://integration.cheersapp.io/docs/integrations/cheers-loyalty/integration-flow
  (the seed's worked example, word for word);
- OVERVIEW: https://integration.cheersapp.io/docs/integrations/cheers-loyalty/overview
  (payment types, 1 credit = 1 unit of local currency, the endpoint summary).
No public client library exists.  Contract tests name their source:
``tests/providers/test_cheers.py`` (SEED/FLOW, field by field) and
``tests/providers/test_cheers_public_docs.py`` (AUTH, FLOW).

Settled by those sources and relied on:

- the five paths above, their methods and API versions; the three headers (AUTH); the
  hosts: sandbox ``api.dev.votesess.com``, production ``api.uniqpon.com`` (AUTH's
  environments table, ``CheersDriver.environments``);
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
  ``CREDIT_TRANSACTION_CAN_NO_LONGER_BE_REFUNDED_BY_EXTERNAL_DEVICE``;
- AUTH: "Your POS must expose a product query endpoint so Cheers can synchronize product
  data for discount validation", each product with name, product id, gross price and
  VAT rate.  txengine serves no HTTP of its own; it offers ``product_catalog`` (with
  ``CatalogProduct``), which renders the POS's products as that list for the POS to
  return from its own endpoint.  The URL, method and authentication of that endpoint
  are agreed with Cheers at onboarding: not published.

ASSUMED (no public source states it; each is one policy constant below, tested as such):

- ``ASSUMED_PREVIEW_LIFETIME``: a preview lives 10 minutes (from the product design;
  AUTH says only that a QR key "has an expiration window");
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
  preview's shape (the guide says the POS then has everything to print the receipt).
  The driver requires it: an empty 2xx body proves nothing and is an unknown outcome;
- ``ASSUMED_CATALOG_FIELDS``: the field names of the product list (AUTH names the
  contents only; we reuse the API's own names for the same facts);
- ``ASSUMED_DEFAULT_REFUND_COMMENT``: sent when the POS gives no refund comment (the guide
  always shows one, so we never omit it);
- a cancel of a preview that already expired at Cheers (``CREDIT_TRANSACTION_EXPIRED``)
  freed it as surely as the cancel would have, so cancel and the release delivery
  count it as done.

A success must prove itself: every 2xx answer is read through ``txengine.answers.Answer``
as the documented transaction (types exact: no numbers as strings, no booleans for
numbers; amounts whole and non-negative; each line's credits + discount + outstanding is
its gross; the totals are the lines' sums) and must agree with the call: the
transaction id (beyond the preview, which names it), the currency, and the lines (the
preview's and update's exactly ours; a command's begin with ours, and lines after ours
may only be uncredited ones a re-sent update added).  Finalize, cancel and refund must
show exactly the credits the transaction holds.  Anything else is a ``ProtocolError``
(an unknown outcome: recovery asks again), never a commit.

Retries and the update that is not idempotent: after a transport failure the driver
re-sends a safe call once, at once (``TRANSPORT_RETRIES``): the preview under its
idempotency key, and the replayed commands.  ``update`` has no idempotency key and no
status query exists, so the driver never re-sends it; when the engine does (after a
lost answer), Cheers adds the lines again and extends its own deadline.  Every update
answer carries Cheers' whole basket, so ``reconcile_update`` (pure) decides from it how
often the added lines are there: once is a clean success (the first send had not
landed); twice, n times, or a basket that is not ours plus whole copies of the new lines
raises ``UpdateNotReconciled`` (a ``ProviderRejected`` with our own code
``UPDATE_APPLIED_TWICE``, ``UPDATE_APPLIED_REPEATEDLY`` or ``UPDATE_BASKET_DIVERGED``)
carrying Cheers' basket, and we never store a basket Cheers does not hold.  The cashier
cancels (cancel is accepted on such a basket); the credits at stake are unaffected,
added lines never carry credits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import attrs
import httpx

from txengine.answers import Answer
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
#: the driver requires all of these fields (an empty 2xx body is an unknown outcome).
ASSUMED_COMMAND_ANSWER = (
    "transactionId", "totalCredits", "totalDiscount", "outstandingBalance", "currencyCode", "items",
)

#: ASSUMED: the comment sent with a refund when the POS gives none.
ASSUMED_DEFAULT_REFUND_COMMENT = "Refunded at the point of sale"

# --- driver policy ----------------------------------------------------------------------

#: Immediate re-sends after a transport failure, for calls that are safe to repeat.
TRANSPORT_RETRIES = 1

#: The code of a 4xx whose body names none (``HTTP_403``).  For finalize, cancel and
#: refund it is an unknown outcome, not a refusal: it might hide an ``ALREADY_...`` answer.
UNREADABLE_CODE_PREFIX = "HTTP_"

# Our own codes (not Cheers'): the answer to an update shows a basket that is not ours
# plus the new lines once (see ``reconcile_update``).
UPDATE_APPLIED_TWICE = "UPDATE_APPLIED_TWICE"
UPDATE_APPLIED_REPEATEDLY = "UPDATE_APPLIED_REPEATEDLY"
UPDATE_BASKET_DIVERGED = "UPDATE_BASKET_DIVERGED"

#: ASSUMED: the field names of the POS's product list.  The authentication page names
#: the contents (name, product id, gross price, VAT rate), not the fields; these reuse
#: the names Cheers' own API gives the same facts.
ASSUMED_CATALOG_FIELDS = ("productId", "name", "unitPrice", "vat")

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
    UPDATE_APPLIED_REPEATEDLY: (
        "Cheers recorded the added items several times after lost answers. Cancel this"
        " payment and start again with a new QR code."
    ),
    UPDATE_BASKET_DIVERGED: (
        "Cheers holds a different basket than the till after adding items. Cancel this"
        " payment and start again with a new QR code."
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


# --- what Cheers holds: its answers, read strictly ----------------------------------------


def _whole(answer: Answer, field: str) -> int:
    """A whole, non-negative amount (Cheers counts whole currency units and credits)."""
    value = answer.number(field)
    if value != value.to_integral_value() or value < 0:
        raise answer.fail(f"{field} is not a whole, non-negative amount")
    return int(value)


@attrs.frozen
class ProviderLine:
    """One line of a basket as Cheers holds it: an entry of an answer's ``items``."""

    product_id: str | None
    name: str
    unit_price: int
    quantity: int
    credits: int
    discount: int
    outstanding: int
    vat: int | None

    def is_item(self, item: LineItem) -> bool:
        """The line Cheers priced for ``item`` (same product, quantity and unit price)."""
        return (
            self.product_id == item.product_id
            and self.quantity == item.quantity
            and Money.of(self.unit_price, item.currency) == item.unit_price
        )

    def priced(self, item: LineItem) -> PricedLine:
        currency = item.currency
        return PricedLine(
            item=item,
            discount=Money.of(self.discount, currency),
            credits=Money.of(self.credits, currency),
            outstanding=Money.of(self.outstanding, currency),
        )


def _provider_line(line: Answer) -> ProviderLine:
    product_id = line.raw("productId")  # documented as present, possibly null
    if product_id is not None and (not isinstance(product_id, str) or not product_id.strip()):
        raise line.fail("productId is neither a string nor null")
    read = ProviderLine(
        product_id=product_id,
        name=line.text("name"),
        unit_price=_whole(line, "unitPrice"),
        quantity=line.integer("quantity", minimum=1),
        credits=_whole(line, "credits"),
        discount=_whole(line, "discount"),
        outstanding=_whole(line, "outstandingBalance"),
        vat=line.integer("vat", optional=True, minimum=0),
    )
    if read.credits + read.discount + read.outstanding != read.unit_price * read.quantity:
        raise line.fail("credits + discount + outstandingBalance is not unitPrice x quantity")
    return read


@attrs.frozen
class ProviderBasket:
    """A whole transaction as Cheers answered it (every answer carries the full basket)."""

    transaction_id: str
    lines: tuple[ProviderLine, ...]

    @property
    def total_credits(self) -> int:
        return sum(line.credits for line in self.lines)


# --- reconciling an update Cheers may have applied more than once -----------------------


@attrs.frozen
class Reconciled:
    """What an update answer says about how often Cheers applied the added lines.

    ``times_applied`` is 1 for the clean case (Cheers holds our lines plus the new ones
    once), n when it holds them n times, and None when its basket is not ours plus
    whole copies of the new lines.  ``provider_basket`` is Cheers' basket, as answered.
    """

    times_applied: int | None
    provider_basket: tuple[ProviderLine, ...]

    @property
    def clean(self) -> bool:
        return self.times_applied == 1


def reconcile_update(
    answer_items: Sequence[ProviderLine], before: Sequence[LineItem], added: Sequence[LineItem]
) -> Reconciled:
    """How many times Cheers applied ``added`` on top of ``before``, from its answered basket.

    Pure: a re-sent update (Cheers gives it no idempotency key) adds its lines again, so
    the answer to the re-send shows ``before`` followed by ``added`` once (the first
    send never landed), twice (it did), or more.  Added lines never carry discount or
    credits at Cheers; a copy that does is not one of ours.
    """
    basket = tuple(answer_items)
    diverged = Reconciled(None, basket)
    if not added or len(basket) < len(before):
        return diverged
    if not all(line.is_item(item) for line, item in zip(basket, before)):
        return diverged
    rest = basket[len(before):]
    if len(rest) % len(added):
        return diverged
    for index, line in enumerate(rest):
        if not line.is_item(added[index % len(added)]) or line.credits or line.discount:
            return diverged
    return Reconciled(len(rest) // len(added), basket)


class UpdateNotReconciled(ProviderRejected):
    """Cheers' basket is not ours plus the added lines once: the update needs attention.

    Raised (instead of storing a basket Cheers does not hold) when an update re-sent
    after a lost answer landed again, or the answered basket is otherwise not ours.
    ``reconciled`` carries Cheers' basket and how often the lines were applied.  Our
    transaction keeps its basket; the cashier cancels at Cheers (which deducts nothing)
    and starts again.  No secret is in it: baskets hold products and amounts.
    """

    def __init__(self, reconciled: Reconciled, *, provider: str) -> None:
        self.reconciled = reconciled
        times = reconciled.times_applied
        if times == 2:
            code = UPDATE_APPLIED_TWICE
        elif times is not None and times > 2:
            code = UPDATE_APPLIED_REPEATEDLY
        else:
            code = UPDATE_BASKET_DIVERGED
        super().__init__(CASHIER_MESSAGES[code], code=code, provider=provider)


# --- the POS's product list, which Cheers synchronises ------------------------------------


@attrs.frozen
class CatalogProduct:
    """A product as the POS sells it, for Cheers' product synchronisation.

    The public authentication page requires the POS to expose a product query endpoint
    with each product's name, product id, gross price and VAT rate.
    """

    product_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    gross_price: Money = attrs.field(validator=attrs.validators.instance_of(Money))
    vat_percent: int = attrs.field(validator=attrs.validators.instance_of(int))

    def __attrs_post_init__(self) -> None:
        if not self.product_id.strip() or not self.name.strip():
            raise ValidationError("a catalog product needs a product id and a name")
        if isinstance(self.vat_percent, bool) or not 0 <= self.vat_percent <= 100:
            raise ValidationError(f"the VAT of {self.name!r} must be an integer percent")
        if self.gross_price.amount_minor < 0:
            raise ValidationError(f"the price of {self.name!r} must not be negative")


def product_catalog(products: Iterable[CatalogProduct]) -> list[dict[str, Any]]:
    """The body of the POS's product query endpoint, in ``ASSUMED_CATALOG_FIELDS``.

    txengine serves no HTTP itself: the POS returns this list as JSON from its own web
    framework at the URL it registers with Cheers.  Prices are whole units, as in
    every Cheers call; a product id appears once (Cheers matches discounts by it).
    """
    catalog, seen = [], set()
    for product in products:
        if not isinstance(product, CatalogProduct):
            raise ValidationError("every catalog entry must be a CatalogProduct")
        if product.product_id in seen:
            raise ValidationError(f"product id {product.product_id!r} appears twice")
        seen.add(product.product_id)
        product_id, name, price, vat = ASSUMED_CATALOG_FIELDS
        catalog.append({
            product_id: product.product_id,
            name: product.name,
            price: whole_units(product.gross_price),
            vat: product.vat_percent,
        })
    return catalog


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
        currency = body["currencyCode"]
        return self._quote(self._basket(answer, "preview", None, currency), items, currency, "preview")

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
        basket = self._basket(answer, "update", tx.provider_ref, tx.currency)
        before = tuple(line.item for line in tx.items)
        reconciled = reconcile_update(basket.lines, before, added)
        if not reconciled.clean:
            raise UpdateNotReconciled(reconciled, provider=self.name)
        return self._quote(basket, before + added, tx.currency, "update")

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
        currency: str | None = None,
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
        self._check_confirmation(answer, transaction_id, tx, operation, currency)
        return Outcome(provider_ref=transaction_id)

    # --- deferred delivery: free an expired preview at Cheers ---

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        if kind != "release":
            raise ValueError(f"Cheers has no {kind!r} delivery")
        # The currency lets the release check Cheers' answer without the transaction.
        return {"transactionId": self._transaction_id(tx), "currencyCode": tx.currency}

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[None]:
        for delivery in deliveries:
            if delivery.kind != "release":
                raise ValueError(f"Cheers has no {delivery.kind!r} delivery")
            # An expired or already cancelled preview is released: redelivery is a no-op.
            payload = delivery.payload
            yield from self._command("cancel", str(payload["transactionId"]), None, None,
                                     payload.get("currencyCode"))  # absent from older payloads

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
            # Every success carries the transaction: an empty body proves nothing.
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
    # Every success answer is read through ``Answer``: the documented shape, field by
    # field, and then it must agree with the transaction.  Anything else may hide a
    # commit, so it is ProtocolError (an unknown outcome), never a success.

    def _basket(self, body: Mapping[str, Any], where: str, transaction_id: str | None,
                currency: str | None) -> ProviderBasket:
        """The transaction Cheers answers (preview, update, finalize, cancel, refund)."""
        answer = Answer(body, provider=self.name, where=f"cheers {where}")
        if transaction_id is None:
            answered_id = answer.text("transactionId")
        else:
            answer.expect("transactionId", transaction_id)
            answered_id = transaction_id
        if currency is None:  # a release knows only the id: any currency, but one
            answer.text("currencyCode")
        else:
            answer.expect("currencyCode", currency)
        lines = tuple(_provider_line(line) for line in answer.objects("items"))
        if not lines:
            raise answer.fail("items is empty")
        for field, part in (("totalCredits", "credits"), ("totalDiscount", "discount"),
                            ("outstandingBalance", "outstanding")):
            if _whole(answer, field) != sum(getattr(line, part) for line in lines):
                raise answer.fail(f"{field} is not the sum of the lines' {part}")
        return ProviderBasket(transaction_id=answered_id, lines=lines)

    def _quote(self, basket: ProviderBasket, items: Sequence[LineItem], currency: str,
               where: str) -> Quote:
        """``items`` priced as ``basket`` says, or ProtocolError if it is another basket."""
        if len(basket.lines) != len(items) or not all(
            line.is_item(item) for line, item in zip(basket.lines, items)
        ):
            raise self.unknown(f"cheers {where}: the priced lines are not the basket's lines")
        try:
            lines = [line.priced(item) for line, item in zip(basket.lines, items)]
            return Quote(lines=lines, provider_ref=basket.transaction_id, receipt=_receipt(lines, currency))
        except ValueError as broken:  # ValidationError: parts that do not add up
            raise self.unknown(f"cheers {where}: unusable priced line ({broken})") from None

    def _check_confirmation(
        self, body: Mapping[str, Any], transaction_id: str, tx: Transaction | None, operation: str,
        currency: str | None = None,
    ) -> None:
        """The answer must be our transaction, in the preview's shape, with our credits.

        It must show the lines we know first and exactly the credits the transaction
        holds.  Lines after ours are tolerated only without credits: they are what a
        re-sent update added at Cheers (see ``reconcile_update``); refusing them would
        leave a committed finalize, or the cancel that clears such a basket, in doubt
        for ever.
        """
        basket = self._basket(body, operation, transaction_id, tx.currency if tx else currency)
        if tx is None:  # a release knows the id and the currency, not the lines
            return
        ours = tuple(line.item for line in tx.items)
        known, extra = basket.lines[:len(ours)], basket.lines[len(ours):]
        if len(known) != len(ours) or not all(line.is_item(item) for line, item in zip(known, ours)):
            raise self.unknown(f"cheers {operation}: the answered lines are not the transaction's")
        if any(line.credits for line in extra):
            raise self.unknown(f"cheers {operation}: lines we never sent carry credits")
        if Money.of(basket.total_credits, tx.currency) != tx.total_credits:
            raise self.unknown(f"cheers {operation}: the credits moved are not the transaction's")


def _receipt(lines: Sequence[PricedLine], currency: str) -> tuple[ReceiptLine, ...]:
    def total(part: str) -> Money:
        return sum((getattr(line, part) for line in lines), Money.zero(currency))

    return (
        ReceiptLine("separator", text="Cheers Loyalty"),
        ReceiptLine("name-value", name="Discount: ", value=str(total("discount"))),
        ReceiptLine("name-value", name="Credits: ", value=str(total("credits"))),
        ReceiptLine("name-value", name="To pay: ", value=str(total("outstanding"))),
    )

