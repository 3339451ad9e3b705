"""secuconnect Smart Transactions (secucard loyalty cards): the driver.

A secucard is a merchant's customer card with a stored cash balance.  The till builds a
*Smart Transaction* (the basket plus the card as an ident), asks secuconnect to apply
the card balance (``preTransaction``: what is still missing), takes the missing sum at
the register, then starts the transaction, which books the loyalty transaction and
returns receipt lines to print.

Lifecycle mapping
=================
============== ======================================================================
event          secuconnect
============== ======================================================================
preview        ``POST /api/v2/Smart/Transactions`` (basket, ``basket_info``, the card
               ident) then ``POST .../{id}/preTransaction`` (``missing_sum``).  With
               ``EXTERNAL_PAYMENT`` the card balance is not applied: no preTransaction.
update         ``PUT .../{id}`` with the whole basket (resets the prepared state), then
               ``preTransaction`` again
begin_payment  local
finalize       ``GET .../{id}`` (already ``ok``? then that was our commit: report it;
               still prepared for the quoted ``missing_sum``?), then
               ``POST .../{id}/start/loyalty`` when the card covers everything, else
               ``POST .../{id}/start/cash`` (card balance redeemed in full, the missing
               sum paid at the register)
cancel         ``POST .../{id}/abort``
refund         ``POST .../{id}/cancel`` (reverses the loyalty transaction)
expire         a deferred ``release`` delivery: ``POST .../{id}/abort``
============== ======================================================================

Retries: ``GET``, ``PUT``, ``preTransaction``, ``abort`` and ``cancel`` are safe to
repeat (the first three change nothing twice; the last two by
``ASSUMED_IDEMPOTENT_CALLS``), so an unknown outcome on one of them is re-sent once
before the engine hears of it; so is a token request.  ``create`` and ``start`` are
never re-sent here: a retried preview makes a new Smart Transaction (the lost one
moves no money and expires), and a retried finalize reads the status before starting.

Credits are spread over the lines deterministically, in basket order: the card balance
applied (``basket_info.sum - missing_sum``) covers the first line in full, then the
next, and so on; the line where it runs out is covered partly; later lines are fully
outstanding.  secuconnect applies no discounts, so ``discount`` is always zero and
``gross == credits + outstanding`` on every line.

Payment types: ``SPLIT_PAYMENT`` (the default) applies the card balance as above.
``EXTERNAL_PAYMENT`` is the seed's own example: the card only collects the turnover,
no ``preTransaction``, everything outstanding, finalized with ``start/cash``.

Refusals the driver raises itself, before anything is committed, carry these codes:
``IDENT_INVALID`` (the card is not known: the half-made transaction is aborted),
``STATUS_CANCELLED``/``STATUS_FAILED`` (the transaction is dead at secuconnect), and at
finalize ``BASKET_CHANGED``, ``NOT_PREPARED`` or ``MISSING_SUM_CHANGED`` (the
provider's basket or applied balance no longer matches what the POS collected: update
or preview again).  Every other code is secuconnect's ``code`` field, passed through.

Fidelity note
=============
Sources: seed 003 (the integration excerpt); developer.secuconnect.com/integration/
(OAuth, applying the loyalty card, paying the missing sum or the full amount, status
flow, error handling, error codes); the official SDKs github.com/secuconnect/
secuconnect-php-sdk 2.63.0 (maintained; run as a real client against our served sandbox
in tests/providers/test_secuconnect_php_sdk.py) and secuconnect-js-sdk (archived).
What they settle:

- ``POST /oauth/token`` with ``grant_type=client_credentials``, ``client_id``,
  ``client_secret`` returns a bearer ``access_token`` with ``expires_in`` 1200 s
  (``DOCUMENTED_TOKEN_LIFETIME``) and a ``scope``.  The SDKs re-authenticate on a 401
  (``REAUTH_STATUS``); the error-handling page answers an expired token with HTTP 403,
  code 2003 (``EXPIRED_TOKEN_STATUS``/``EXPIRED_TOKEN_CODE``): on either the driver
  forgets the token, logs in again and resends once.  It also refreshes ahead of
  expiry on its own clock (``TOKEN_REFRESH_MARGIN``; the PHP SDK keeps a 10 s margin).
- Hosts: ``connect-testing.secuconnect.com`` (seed 003, "sandbox") and
  ``connect.secucard.com`` (the SDKs' default host, "production").
- The header is ``Authorization: Bearer`` (the SDKs; ``ASSUMED_AUTH_HEADER`` keeps its
  old name); the seed's ``Authenticate`` spelling is accepted by the sandbox too.
- The paths, the basket fields (``products[]`` with ``id, articleNumber, ean, desc,
  quantity, priceOne, tax``; ``basket_info{sum, currency}``; ``idents[{type: card,
  value}]``), ``transactionRef``, the statuses (``created, processing, approved,
  pending, ok, failed, cancelled``), ``transactions[]``, ``trans_id`` and ``receipt[]``
  lines (``separator`` with ``caption``, ``textline`` with ``text``, ``name-value``
  with ``name``/``value``, ``space``; ``decoration`` such as ``important``).
- Money in the smallest currency unit (``priceOne``, ``sum``, ``missing_sum``) with
  ``basket_info.currency``; ``tax`` an integer percent in every example.
- Errors are ``{status: "error", error, error_details, error_user, code, supportId}``;
  ``error_user`` is the German text for the cashier (the rejection's message, with the
  ``supportId`` for the help desk); ``code`` becomes ``ProviderRejected.code``.  Such an
  envelope with a 2xx status is self-contradictory: an unknown outcome.
- ``preTransaction`` answers only ``{missing_sum, bonus_products}`` (the docs and the PHP
  SDK's ``SmartTransactionsPreTransactionModel``); the status is then ``processing``
  (``PRE_TRANSACTION_STATUS``) and ``basket_info.missing_sum`` appears on later reads
  (it is absent before).  Bonus products become negative basket lines when bonus
  balance is spent: not modelled; a preTransaction offering any is refused
  (``BONUS_PRODUCTS_UNSUPPORTED``) and the Smart Transaction aborted.
- A success proves itself: a start (``ok``) or cancel (``cancelled``) answer must name
  our Smart Transaction and carry our basket (``basket_info`` sum and currency, the
  line count of ``basket.products``); anything else is an unknown outcome.
- The seed's transaction was started 25:45 after it was created (``created``
  09:18:14, ``updated`` 09:43:59): a Smart Transaction outlives a token, and
  ``ASSUMED_SMART_TRANSACTION_LIFETIME`` (30 min) is consistent with it.
- Not used (documented, outside our lifecycle): ``start/cashless`` and ``/canceltrx``.

ASSUMED (no public source says so; each is one constant below, tested as such):

- ``ASSUMED_PREVIEW_TTL``, ``ASSUMED_UPDATE_EXTENSION``: how long a priced basket is
  honoured.  secuconnect documents no lifetime for a Smart Transaction; the sandbox
  drops un-started ones ``ASSUMED_SMART_TRANSACTION_LIFETIME`` after their last change,
  longer than the engine's own deadline, and the engine aborts expired ones itself.
- ``ASSUMED_REFUND_WINDOW``: how long ``cancel`` reverses a completed transaction.
- ``ASSUMED_IDEMPOTENT_CALLS``: repeating ``start`` on a transaction already ``ok``
  returns the first result (nothing is booked twice); repeating ``abort`` on an aborted
  or expired transaction, or ``cancel`` on a reversed one, succeeds again.  Retries
  and redelivered releases rely on it (finalize also reads the status first).
- ``PUT`` without ``idents`` keeps the card ident: the driver never stores the card
  number, so it cannot resend it.
- The token request body is JSON, as the spec writes it (the PHP SDK sends it form
  encoded); the sandbox accepts both.
- A ``LineItem`` carries one product id: it is sent as ``articleNumber``; ``ean`` is
  sent empty.
- secuconnect's own codes for the cases the sandbox refuses (unknown card, locked
  card, balance spent elsewhere, wrong status, expired, refund window closed): the
  sandbox's ``ERRORS`` table is assumed, codes, statuses and texts, except the
  expired token (2003, documented).  The public error-code list (1xxx internal, 2xxx
  authentication, ...) has not been mapped onto these cases yet.
- ``tax`` must be an integer percent (``ValidationError`` otherwise, before any call);
  a card number is 16 digits (``ASSUMED_CARD_NUMBER``, the seed's shape).
- HTTP statuses of errors: the driver relies only on 401 and 403/2003 (re-authenticate
  once) and 5xx (outcome unknown); every other error is read from the body.
- The seed's ``start/cash`` example answers ``missing_sum: 0`` and an unchanged card
  balance of 10,00 EUR although its text says the balance is redeemed in full.  The
  sandbox reproduces that answer exactly for a ``start/cash`` without
  ``preTransaction`` (turnover recorded, nothing redeemed), and redeems the prepared
  amount when the balance was applied.

Security: the card number is the customer's key.  It is sent only as the ident value
on create, never kept in ``Quote``/``Outcome`` details, and masked (all but the last
``CARD_MASK_KEEP`` digits) in the receipt lines we store and in any provider text that
reaches an exception message: the seed's receipt prints ``Kartennummer: 9276...``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import attrs
import httpx

from txengine.answers import Answer
from txengine.clock import Clock, SystemClock
from txengine.drivers import Capabilities, Delivery, Exchange, HttpDriver, PreviewRequest
from txengine.errors import EngineError, OutcomeUnknown, ProviderRejected, ValidationError
from txengine.machine import TimerPolicy
from txengine.models import RECEIPT_LINE_KINDS, LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from txengine.money import Money
from txengine.secret import Secret

DEFAULT_BASE_URL = "https://connect-testing.secuconnect.com"
#: the official SDKs' default host (secuconnect-js-sdk ConnectionConfig, the PHP SDK's examples)
PRODUCTION_BASE_URL = "https://connect.secucard.com"
TOKEN_PATH = "/oauth/token"
TRANSACTIONS_PATH = "/api/v2/Smart/Transactions"

# --- documented ------------------------------------------------------------------------
#: ``expires_in`` of an access token; used when an answer leaves it out
DOCUMENTED_TOKEN_LIFETIME = timedelta(seconds=1200)
#: the SDKs fetch a new token once and resend when a call answers this
REAUTH_STATUS = 401
#: developer.secuconnect.com/integration/ error handling: an expired token answers HTTP
#: 403 with code 2003 (ProductNotAllowedException); we log in again and resend once
EXPIRED_TOKEN_STATUS = 403
EXPIRED_TOKEN_CODE = 2003
#: preTransaction answers only these (the docs and the PHP SDK's
#: SmartTransactionsPreTransactionModel); the status is then ``processing``
PRE_TRANSACTION_STATUS = "processing"

# --- our policy --------------------------------------------------------------------------
#: fetch a new token this long before the current one ends, so none expires in flight
TOKEN_REFRESH_MARGIN = timedelta(seconds=60)
#: receipt lines keep the last digits of a card number; the rest become ``*``
CARD_MASK_KEEP = 4
#: a digit run this long (spaces or dashes between digits allowed) is a card number
CARD_NUMBER_MIN_DIGITS = 12

# --- assumed (see the fidelity note) ---------------------------------------------------------
ASSUMED_AUTH_HEADER = "Authorization"
#: the spelling in the seed's request; the sandbox accepts it as well
SEED_AUTH_HEADER = "Authenticate"
ASSUMED_PREVIEW_TTL = timedelta(minutes=10)
ASSUMED_UPDATE_EXTENSION = timedelta(minutes=10)
ASSUMED_REFUND_WINDOW = timedelta(hours=24)
ASSUMED_SMART_TRANSACTION_LIFETIME = timedelta(minutes=30)
ASSUMED_IDEMPOTENT_CALLS = frozenset({"start", "abort", "cancel"})
ASSUMED_CARD_NUMBER = re.compile(r"[0-9]{16}")
#: our code: preTransaction offered bonus products (negative basket lines; not modelled)
BONUS_PRODUCTS_UNSUPPORTED = "BONUS_PRODUCTS_UNSUPPORTED"

#: card balance first, the missing sum at the register (start/loyalty or start/cash)
SPLIT_PAYMENT = "SPLIT_PAYMENT"
#: the card only collects turnover: no preTransaction, nothing redeemed, start/cash
EXTERNAL_PAYMENT = "EXTERNAL_PAYMENT"

TIMERS = TimerPolicy(
    preview_ttl=ASSUMED_PREVIEW_TTL,
    update_extension=ASSUMED_UPDATE_EXTENSION,
    refund_window=ASSUMED_REFUND_WINDOW,
)

#: statuses after which a Smart Transaction can no longer be started
_DEAD = frozenset({"failed", "cancelled"})
#: statuses of a payment still under way: its outcome is not known yet
_UNDER_WAY = frozenset({"approved", "pending"})
_JSON_HEADERS = {"Accept": "application/json"}
_CARD_DIGITS = re.compile(r"\d(?:[ -]?\d){%d,}" % (CARD_NUMBER_MIN_DIGITS - 1))


def mask_card_numbers(text: str) -> str:
    """``9276004429942845`` -> ``************2845``, wherever it appears in ``text``."""

    def mask(match: re.Match[str]) -> str:
        run = match.group()
        digits = sum(ch.isdigit() for ch in run)
        hidden = digits - CARD_MASK_KEEP
        out = []
        for ch in run:
            if ch.isdigit() and hidden > 0:
                out.append("*")
                hidden -= 1
            else:
                out.append(ch)
        return "".join(out)

    return _CARD_DIGITS.sub(mask, text)


@attrs.frozen
class _Token:
    value: Secret
    refresh_at: datetime


class SecuconnectDriver(HttpDriver):
    """secuconnect Smart Transactions with a secucard as the customer's key."""

    name = "secuconnect"
    environments: Mapping[str, str] = {"sandbox": DEFAULT_BASE_URL, "production": PRODUCTION_BASE_URL}
    capabilities = Capabilities(
        remote={"preview", "update", "finalize", "cancel", "refund"},
        local={"begin_payment"},
        deferred={"expire": ("release",)},
        timers=TIMERS,
        payment_types={SPLIT_PAYMENT, EXTERNAL_PAYMENT},
        not_idempotent={"preview"},  # a re-sent create makes a second Smart Transaction
    )
    #: the HTTP calls behind each remote event and deferred delivery (for the diagrams)
    calls: Mapping[str, str] = {
        "preview": f"POST {TRANSACTIONS_PATH} + POST {TRANSACTIONS_PATH}/{{id}}/preTransaction",
        "update": f"PUT {TRANSACTIONS_PATH}/{{id}} + POST {TRANSACTIONS_PATH}/{{id}}/preTransaction",
        "finalize": f"GET {TRANSACTIONS_PATH}/{{id}} + POST {TRANSACTIONS_PATH}/{{id}}/start/loyalty or /start/cash",
        "cancel": f"POST {TRANSACTIONS_PATH}/{{id}}/abort",
        "refund": f"POST {TRANSACTIONS_PATH}/{{id}}/cancel",
        "release": f"POST {TRANSACTIONS_PATH}/{{id}}/abort",
    }

    def __init__(
        self,
        *,
        client_id: str | Secret,
        client_secret: str | Secret,
        clock: Clock | None = None,
        **http: Any,
    ) -> None:
        super().__init__(**http)
        self._client_id = Secret(client_id)
        self._client_secret = Secret(client_secret)
        self._clock = clock or SystemClock()
        self._token: _Token | None = None
        self._token_lock = threading.Lock()

    # --- authentication --------------------------------------------------------------------

    def _bearer(self) -> Exchange[Secret]:
        """The current access token, fetching a new one when it is close to its end."""
        with self._token_lock:
            token = self._token
        if token is not None and self._clock.now() < token.refresh_at:
            return token.value
        asked_at = self._clock.now()
        body = {
            "grant_type": "client_credentials",
            "client_id": self._client_id.reveal(),
            "client_secret": self._client_secret.reveal(),
        }
        token_request = self.request("POST", TOKEN_PATH, json=body, headers=_JSON_HEADERS)
        try:
            response = yield token_request
        except OutcomeUnknown:
            # A token request commits nothing: asking once more is safe.
            response = yield token_request
        answer = self._answer(response)
        access_token = answer.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise self.unknown("the token answer has no access_token")
        lifetime = answer.get("expires_in", int(DOCUMENTED_TOKEN_LIFETIME.total_seconds()))
        if type(lifetime) is not int or lifetime <= 0:
            raise self.unknown("the token answer has no usable expires_in")
        # Counted from before we asked: the provider's clock started no earlier.
        token = _Token(Secret(access_token), asked_at + timedelta(seconds=lifetime) - TOKEN_REFRESH_MARGIN)
        with self._token_lock:
            self._token = token
        return token.value

    def _forget(self, token: Secret) -> None:
        with self._token_lock:
            if self._token is not None and self._token.value == token:
                self._token = None

    def _call(self, method: str, path: str, body: Any = None, *,
              resend: bool = False) -> Exchange[dict[str, Any]]:
        """One authorized API call.  ``resend``: the call is safe to repeat, so an unknown
        outcome (lost answer, 5xx, garbage) is retried once before it reaches the engine."""
        if resend:
            try:
                return (yield from self._call_once(method, path, body))
            except OutcomeUnknown:
                pass  # one more try; if that fails too, the outcome is the engine's to resolve
        return (yield from self._call_once(method, path, body))

    def _call_once(self, method: str, path: str, body: Any) -> Exchange[dict[str, Any]]:
        """A refused token (401, or 403 code 2003: expired) is forgotten, a new one fetched
        once and the call resent: the provider refused before acting."""
        token = yield from self._bearer()
        response = yield self._authorized(method, path, body, token)
        if _token_refused(response):
            self._forget(token)
            token = yield from self._bearer()
            response = yield self._authorized(method, path, body, token)
        return self._answer(response)

    def _authorized(self, method: str, path: str, body: Any, token: Secret) -> httpx.Request:
        headers = {**_JSON_HEADERS, ASSUMED_AUTH_HEADER: f"Bearer {token.reveal()}"}
        return self.request(method, path, json=body if body is not None else None, headers=headers)

    # --- reading answers ---------------------------------------------------------------------

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if status >= 500:
            raise self.unknown(f"HTTP {status} from secuconnect")
        body = self.json_of(response)
        if not isinstance(body, dict):
            raise self.unknown(f"HTTP {status} with a JSON body that is not an object")
        if body.get("status") == "error":
            if status < 400:
                # An error envelope with a success status contradicts itself: the call may
                # have acted, so the outcome is unknown (recover() asks again).
                raise self.unknown(f"HTTP {status} carrying an error envelope")
            raise self._refusal(body, response)
        if status >= 400:
            if isinstance(body.get("error"), str):  # OAuth: {error, error_description}
                message = _text(body.get("error_description")) or _text(body["error"])
                raise self.rejected(body["error"], message, retry_after=_retry_after(response))
            raise self.rejected(f"HTTP_{status}", f"secuconnect answered HTTP {status}",
                                retry_after=_retry_after(response))
        if not 200 <= status < 300:
            raise self.unknown(f"unexpected HTTP {status} from secuconnect")
        return body

    def _refusal(self, body: Mapping[str, Any], response: httpx.Response) -> ProviderRejected:
        code = body.get("code")
        if code is None or code == "" or isinstance(code, (dict, list, bool)):
            code = body.get("error") or f"HTTP_{response.status_code}"
        message = (_text(body.get("error_user")) or _text(body.get("error_details"))
                   or _text(body.get("error")) or "secuconnect refused the request")
        support = _text(body.get("supportId"))
        if support:
            message = f"{message} (supportId {support})"
        return self.rejected(str(code), message, retry_after=_retry_after(response))

    def _smart_transaction(self, body: Mapping[str, Any], expected_id: str | None = None) -> str:
        stx_id = body.get("id")
        if not isinstance(stx_id, str) or not stx_id:
            raise self.unknown("the answer names no smart transaction id")
        if expected_id is not None and stx_id != expected_id:
            raise self.unknown(f"asked about {expected_id}, the answer is about {stx_id}")
        return stx_id

    def _check_basket_info(self, body: Mapping[str, Any], gross: Money) -> Mapping[str, Any]:
        info = body.get("basket_info")
        if not isinstance(info, dict):
            raise self.unknown("the answer has no basket_info")
        if info.get("currency") != gross.currency or _int(info.get("sum")) != gross.amount_minor:
            raise self.unknown(
                f"the provider holds a basket of {info.get('sum')} {info.get('currency')},"
                f" not the {gross.amount_minor} {gross.currency} sent"
            )
        return info

    def _missing_sum(self, body: Mapping[str, Any], gross: Money) -> int:
        """A read's ``missing_sum`` (``basket_info``, after a preTransaction), checked."""
        info = self._check_basket_info(body, gross)
        missing = body.get("missing_sum", info.get("missing_sum"))
        if "missing_sum" in body and "missing_sum" in info and info["missing_sum"] != missing:
            raise self.unknown("the answer gives two different missing sums")
        missing = _int(missing)
        if missing is None or not 0 <= missing <= gross.amount_minor:
            raise self.unknown(f"missing_sum {body.get('missing_sum')!r} is not between 0 and the basket sum")
        return missing

    def _status(self, body: Mapping[str, Any]) -> str:
        status = body.get("status")
        if not isinstance(status, str):
            raise self.unknown("the answer has no status")
        return status

    def _card_facts(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Provider ids worth keeping (card, merchant card), the card masked; never the number."""
        idents = body.get("idents")
        if not isinstance(idents, list) or not idents or not isinstance(idents[0], dict):
            raise self.unknown("the answer carries no card ident")
        ident = idents[0]
        facts: dict[str, Any] = {"card_valid": ident.get("valid") is True}
        value = ident.get("value")
        if isinstance(value, str) and len(value) > CARD_MASK_KEEP:
            facts["card_masked"] = "*" * (len(value) - CARD_MASK_KEEP) + value[-CARD_MASK_KEEP:]
        merchantcard = ident.get("merchantcard")
        if isinstance(merchantcard, dict):
            if isinstance(merchantcard.get("id"), str):
                facts["merchantcard_id"] = merchantcard["id"]
            card = merchantcard.get("card")
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                facts["card_id"] = card["id"]
        return facts

    def _receipt(self, body: Mapping[str, Any]) -> tuple[tuple[ReceiptLine, ...], int]:
        """Receipt lines to print, card numbers masked; and how many we could not read.

        A line we cannot read is skipped, not fatal: the money has moved by then, and a
        cosmetic defect must not turn a committed payment into an unknown outcome.
        """
        raw = body.get("receipt") or []
        if not isinstance(raw, list):
            return (), 1
        lines: list[ReceiptLine] = []
        skipped = 0
        for entry in raw:
            line = _receipt_line(entry)
            if line is None:
                skipped += 1
            else:
                lines.append(line)
        return tuple(lines), skipped

    # --- pricing -----------------------------------------------------------------------------

    @staticmethod
    def _products(items: tuple[LineItem, ...]) -> list[dict[str, Any]]:
        products = []
        for position, item in enumerate(items, start=1):
            tax = item.vat_percent
            if tax != tax.to_integral_value():
                raise ValidationError(
                    f"secuconnect takes an integer tax percent; line {item.name!r} has {tax}"
                )
            products.append({
                "id": position,
                "articleNumber": item.product_id or "",
                "ean": "",
                "desc": item.name,
                "quantity": item.quantity,
                "priceOne": item.unit_price.amount_minor,
                "tax": int(tax),
            })
        return products

    @staticmethod
    def _basket_info(gross: Money) -> dict[str, Any]:
        return {"sum": gross.amount_minor, "currency": gross.currency}

    def _quote(self, items: tuple[LineItem, ...], gross: Money, missing_sum: int, stx_id: str,
               details: Mapping[str, Any]) -> Quote:
        """Spread the applied card balance over the lines in basket order (see the module doc)."""
        currency = gross.currency
        zero = Money.zero(currency)
        remaining = gross.amount_minor - missing_sum
        lines = []
        for item in items:
            credit = min(remaining, item.gross.amount_minor)
            remaining -= credit
            lines.append(PricedLine(item, discount=zero, credits=Money(credit, currency),
                                    outstanding=item.gross - Money(credit, currency)))
        return Quote(lines=lines, provider_ref=stx_id,
                     details={**details, "smart_transaction_id": stx_id, "basket_sum": gross.amount_minor,
                              "missing_sum": missing_sum})

    @staticmethod
    def _gross(items: tuple[LineItem, ...]) -> Money:
        total = Money.zero(items[0].currency)
        for item in items:
            total += item.gross
        return total

    def _card(self, token: Secret | None) -> Secret:
        if token is None:
            raise ValidationError("secuconnect needs the customer's card number as customer_token")
        if not ASSUMED_CARD_NUMBER.fullmatch(token.reveal()):
            raise ValidationError("the customer_token is not a secucard number (16 digits)")
        return token

    # --- the lifecycle -----------------------------------------------------------------------

    def preview(self, request: PreviewRequest) -> Exchange[Quote]:
        if request.payment_type not in self.capabilities.payment_types:
            raise ValidationError(f"secuconnect has no payment type {request.payment_type!r}")
        card = self._card(request.customer_token)
        items = request.basket.items
        gross = request.basket.gross
        body = {
            "basket": {"products": self._products(items)},
            "basket_info": self._basket_info(gross),
            "idents": [{"type": "card", "value": card.reveal()}],
            "transactionRef": request.tx_id,
        }
        created = yield from self._call("POST", TRANSACTIONS_PATH, body)
        stx_id = self._smart_transaction(created)
        self._check_basket_info(created, gross)
        facts = self._card_facts(created)
        try:
            if not facts["card_valid"]:
                raise self.rejected("IDENT_INVALID", "Die Karte ist ungültig (card not accepted)")
            if request.payment_type == EXTERNAL_PAYMENT:
                missing, status = gross.amount_minor, self._status(created)
            else:
                missing, status = yield from self._apply_balance(stx_id, gross)
        except ProviderRejected:
            # Leave nothing half-made at the provider; the refusal is what the POS must see.
            yield from self._abort_quietly(stx_id)
            raise
        facts.update(card_applied=request.payment_type != EXTERNAL_PAYMENT, smart_transaction_status=status)
        return self._quote(items, gross, missing, stx_id, facts)

    def update(self, tx: Transaction, items: tuple[LineItem, ...], key: str) -> Exchange[Quote]:
        stx_id = self._provider_ref(tx)
        basket = tuple(line.item for line in tx.items) + tuple(items)
        gross = self._gross(basket)
        body = {"basket": {"products": self._products(basket)}, "basket_info": self._basket_info(gross)}
        updated = yield from self._call("PUT", f"{TRANSACTIONS_PATH}/{stx_id}", body, resend=True)
        self._smart_transaction(updated, stx_id)
        self._check_basket_info(updated, gross)
        applied = tx.payment_type != EXTERNAL_PAYMENT
        if applied:
            missing, status = yield from self._apply_balance(stx_id, gross)
        else:
            missing, status = gross.amount_minor, self._status(updated)
        return self._quote(basket, gross, missing, stx_id,
                           {"card_applied": applied, "smart_transaction_status": status})

    def _apply_balance(self, stx_id: str, gross: Money) -> Exchange[tuple[int, str]]:
        """``preTransaction``: the card balance applied; the missing sum and the new status.

        The documented answer is only ``{missing_sum, bonus_products}``: nothing in it names
        the transaction, so the sum is checked against the basket we sent.
        """
        prepared = yield from self._call("POST", f"{TRANSACTIONS_PATH}/{stx_id}/preTransaction", {},
                                         resend=True)
        answer = Answer(prepared, provider=self.name, where="preTransaction")
        missing = answer.number("missing_sum")  # cents; 296.0 is 296 (JSON has one number type)
        if missing != missing.to_integral_value() or not 0 <= missing <= gross.amount_minor:
            raise answer.fail("missing_sum is not a whole number of cents between 0 and the basket sum")
        if answer.array("bonus_products", optional=True):
            # Bonus products become negative basket lines at secuconnect; we do not model
            # them yet, so a quote built without them would be wrong: refuse it clearly.
            raise self.rejected(BONUS_PRODUCTS_UNSUPPORTED,
                                "secuconnect offers bonus products for this card, which txengine"
                                " does not redeem yet; use EXTERNAL_PAYMENT or another card")
        return int(missing), PRE_TRANSACTION_STATUS

    def finalize(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        stx_id = self._provider_ref(tx)
        # Read first: a retry after a lost answer finds our own commit here, and a basket
        # whose prepared state was lost (a failed update) is refused before money moves.
        current = yield from self._call("GET", f"{TRANSACTIONS_PATH}/{stx_id}", resend=True)
        self._smart_transaction(current, stx_id)
        status = self._status(current)
        if status == "ok":
            return self._outcome(current, stx_id, tx)
        self._refuse_dead(status)
        if status in _UNDER_WAY:
            raise self.unknown(f"the smart transaction is {status}: a start is under way")
        info = current.get("basket_info")
        if (not isinstance(info, dict) or info.get("currency") != tx.currency
                or _int(info.get("sum")) != tx.gross.amount_minor):
            raise self.rejected("BASKET_CHANGED", "secuconnect holds another basket for this transaction;"
                                                  " update it or preview again")
        applied = tx.payment_type != EXTERNAL_PAYMENT
        if applied:
            if status != "processing":
                raise self.rejected("NOT_PREPARED", "the card balance is no longer applied to this basket;"
                                                    " update the transaction or preview again")
            missing = self._missing_sum(current, tx.gross)
            if missing != tx.outstanding.amount_minor:
                raise self.rejected("MISSING_SUM_CHANGED",
                                    f"secuconnect now expects {missing} at the register, not"
                                    f" {tx.outstanding.amount_minor}; preview again")
        method = "loyalty" if applied and tx.outstanding.amount_minor == 0 else "cash"
        started = yield from self._call("POST", f"{TRANSACTIONS_PATH}/{stx_id}/start/{method}", {})
        self._smart_transaction(started, stx_id)
        status = self._status(started)
        if status != "ok":
            self._refuse_dead(status)
            raise self.unknown(f"start/{method} answered status {status!r}, not ok")
        return self._outcome(started, stx_id, tx)

    def cancel(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        stx_id = self._provider_ref(tx)
        aborted = yield from self._abort(stx_id)
        return Outcome(provider_ref=stx_id, details={"smart_transaction_status": self._status(aborted)})

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        stx_id = self._provider_ref(tx)
        reversed_ = yield from self._call("POST", f"{TRANSACTIONS_PATH}/{stx_id}/cancel", {}, resend=True)
        self._smart_transaction(reversed_, stx_id)
        status = self._status(reversed_)
        if status != "cancelled":
            raise self.unknown(f"cancel answered status {status!r}, not cancelled")
        self._settled(reversed_, stx_id, tx, "cancelled", "cancel")
        receipt, skipped = self._receipt(reversed_)
        details: dict[str, Any] = {"smart_transaction_status": status}
        if skipped:
            details["receipt_lines_skipped"] = skipped
        return Outcome(provider_ref=stx_id, receipt=receipt, details=details)

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        if kind != "release":
            raise ValueError(f"secuconnect has no {kind!r} delivery")
        return {"smart_transaction_id": self._provider_ref(tx)}

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[None]:
        for delivery in deliveries:
            if delivery.kind != "release":
                raise ValueError(f"secuconnect has no {delivery.kind!r} delivery")
            yield from self._abort(str(delivery.payload["smart_transaction_id"]))

    # --- helpers -----------------------------------------------------------------------------

    def _abort(self, stx_id: str) -> Exchange[dict[str, Any]]:
        aborted = yield from self._call("POST", f"{TRANSACTIONS_PATH}/{stx_id}/abort", {}, resend=True)
        self._smart_transaction(aborted, stx_id)
        status = self._status(aborted)
        if status != "cancelled":
            raise self.unknown(f"abort answered status {status!r}, not cancelled")
        return aborted

    def _abort_quietly(self, stx_id: str) -> Exchange[None]:
        try:
            yield from self._abort(stx_id)
        except EngineError:
            pass  # best effort: an un-started Smart Transaction moves no money

    def _refuse_dead(self, status: str) -> None:
        if status in _DEAD:
            raise self.rejected(f"STATUS_{status.upper()}",
                                f"the smart transaction is {status} at secuconnect")

    def _settled(self, body: Mapping[str, Any], stx_id: str, tx: Transaction, status: str, where: str) -> None:
        """A success proves itself: our Smart Transaction, the awaited status, our basket
        (sum, currency and line count), read strictly; anything else may have acted."""
        answer = Answer(body, provider=self.name, where=where)
        answer.expect("id", stx_id)
        answer.expect("status", status)
        info = answer.obj("basket_info")
        info.expect("currency", tx.currency)
        info.expect("sum", tx.gross.amount_minor)
        basket = answer.obj("basket", optional=True)
        if basket is not None:
            basket.array("products", length=len(tx.items))

    def _outcome(self, body: Mapping[str, Any], stx_id: str, tx: Transaction) -> Outcome:
        self._settled(body, stx_id, tx, "ok", "start")
        details: dict[str, Any] = {"smart_transaction_status": "ok"}
        method = body.get("payment_method")
        if isinstance(method, str):
            details["payment_method"] = method
        trans_id = body.get("trans_id")
        if isinstance(trans_id, (str, int)) and not isinstance(trans_id, bool):
            details["trans_id"] = str(trans_id)
        transactions = body.get("transactions")
        if isinstance(transactions, list):
            loyalty = [entry.get("id") for entry in transactions
                       if isinstance(entry, dict) and entry.get("object") == "loyalty.transactions"
                       and isinstance(entry.get("id"), str)]
            if loyalty:
                details["loyalty_transaction_id"] = loyalty[0]
        info = body.get("basket_info")
        if isinstance(info, dict) and _int(info.get("missing_sum")) is not None:
            details["missing_sum"] = _int(info["missing_sum"])
        receipt, skipped = self._receipt(body)
        if skipped:
            details["receipt_lines_skipped"] = skipped
        return Outcome(provider_ref=stx_id, receipt=receipt, details=details)

    def _provider_ref(self, tx: Transaction) -> str:
        if not tx.provider_ref:
            raise ValidationError(f"transaction {tx.id} has no secuconnect smart transaction id")
        return tx.provider_ref


# --- small pure helpers --------------------------------------------------------------------------


def _token_refused(response: httpx.Response) -> bool:
    """401, or the documented expired-token answer (HTTP 403, code 2003)."""
    if response.status_code == REAUTH_STATUS:
        return True
    if response.status_code != EXPIRED_TOKEN_STATUS:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("code") in (EXPIRED_TOKEN_CODE, str(EXPIRED_TOKEN_CODE))


def _int(value: Any) -> int | None:
    """An integer amount; ``796.0`` is accepted as 796 (JSON has one number type)."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _text(value: Any) -> str:
    return mask_card_numbers(value.strip()) if isinstance(value, str) else ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        seconds = float(Decimal(value)) if value else None
    except ArithmeticError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def _receipt_line(entry: Any) -> ReceiptLine | None:
    if not isinstance(entry, dict) or entry.get("type") not in RECEIPT_LINE_KINDS:
        return None
    kind = entry["type"]
    value = entry.get("value") or {}
    if not isinstance(value, dict):
        return None
    decoration = value.get("decoration") or ()
    if not isinstance(decoration, (list, tuple)) or not all(isinstance(d, str) for d in decoration):
        return None
    fields = {"caption": value.get("caption"), "text": value.get("text"),
              "name": value.get("name"), "value": value.get("value")}
    if any(field is not None and not isinstance(field, str) for field in fields.values()):
        return None
    if kind == "separator":
        return ReceiptLine("separator", text=_text_keep(fields["caption"]), decoration=decoration)
    if kind == "space":
        return ReceiptLine("space")
    if kind == "name-value":
        return ReceiptLine("name-value", name=_text_keep(fields["name"]), value=_text_keep(fields["value"]),
                           decoration=decoration)
    return ReceiptLine("textline", text=_text_keep(fields["text"]), decoration=decoration)


def _text_keep(value: str | None) -> str:
    """Receipt text as printed (spacing matters: ``"Kartennummer: "``), card numbers masked."""
    return mask_card_numbers(value) if value else ""
