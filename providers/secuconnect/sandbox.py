"""A faithful simulator of secuconnect Smart Transactions with secucard loyalty cards.

Business rules (the driver's fidelity note says which are documented and which assumed):

- OAuth client credentials (``POST /oauth/token``, JSON or form body): bearer tokens
  that die ``expires_in`` (1200 s) later on the sandbox clock.  Every other call needs
  ``Authorization: Bearer`` (the SDKs' spelling) or ``Authenticate: Bearer`` (the
  seed's); an unknown token answers 401 ``invalid_token``, an expired one HTTP 403
  code 2003 (documented).  The token answer carries ``scope`` (``TOKEN_SCOPE``'s value
  is assumed).
- ``preTransaction`` answers only ``{missing_sum, bonus_products}`` (never any bonus
  products); ``basket_info.missing_sum`` is absent until it ran.
- Cards hold a cash balance in minor units.  ``preTransaction`` applies it:
  ``missing_sum = max(0, sum - balance)``, status ``processing``.  ``PUT`` replaces the
  basket and resets the transaction to ``created`` (apply the balance again).
- ``start/loyalty`` needs the balance applied and ``missing_sum == 0``;
  ``start/cash`` redeems the applied balance in full (the rest is paid at the register)
  or, without ``preTransaction``, only records the turnover: the seed's example answer.
  Either refuses when the card no longer holds the applied amount.  A completed start
  books one loyalty transaction and answers receipt lines; starting it again answers
  the same (``ASSUMED_IDEMPOTENT_CALLS``).
- ``abort`` drops an un-started transaction (again: success); ``cancel`` reverses a
  completed one within ``ASSUMED_REFUND_WINDOW`` and returns the redeemed balance.
- Un-started transactions expire ``ASSUMED_SMART_TRANSACTION_LIFETIME`` after their
  last change (status ``cancelled``).
- Receipt lines follow the seed's (``Kundenkarte``, ``Kartennummer``, ``TA Code`` =
  ``trans_id``, ``Umsatz erfasst``, ``Aktuelles Guthaben``); the lines for a redeemed
  balance (``Guthaben eingelöst``) and a reversal (``Storno erfasst``, ``Guthaben
  gutgeschrieben``) are ASSUMED wording.
- Errors use secuconnect's envelope ``{status: "error", error, error_details,
  error_user, code, supportId}``.  The codes, exception names and HTTP statuses in
  ``ERRORS`` are ASSUMED except ``token_expired`` (403, 2003, documented).
- For a newcomer: ``seed_demo()`` (the seed's card), ``credentials()`` (the driver's
  client id and secret) and ``issue_customer()`` (a new card holding 10,00 EUR).

Inspection for tests: ``card_balance``, ``opening_balances``, ``loyalty_transactions``,
``smart_transaction``, ``tokens_issued``; set-up: ``add_card``, ``lock_card``,
``revoke_tokens``.  One API client is registered unless ``clients`` says otherwise:
``DEFAULT_CLIENT_ID`` / ``DEFAULT_CLIENT_SECRET``.  ``demo=True`` (the default) enrols the seed's card
9276004429942845 with 10,00 EUR at the seed's merchant, John's Bakery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import parse_qsl

import attrs

from txengine.clock import Clock
from txengine.money import CURRENCY_EXPONENTS

from txengine.testing.sandbox import BadRequest, Sandbox, SandboxRequest, SandboxResponse, route
from .driver import (
    ASSUMED_AUTH_HEADER,
    ASSUMED_IDEMPOTENT_CALLS,
    ASSUMED_REFUND_WINDOW,
    ASSUMED_SMART_TRANSACTION_LIFETIME,
    DOCUMENTED_TOKEN_LIFETIME,
    EXPIRED_TOKEN_CODE,
    EXPIRED_TOKEN_STATUS,
    SEED_AUTH_HEADER,
    TOKEN_PATH,
    TRANSACTIONS_PATH,
)

HOST = "connect-testing.secuconnect.com"
DEFAULT_CLIENT_ID = "sandbox-client-id"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret"

# The seed's merchant, device, store and card (``demo=True``).
MERCHANT_ID = "MRC_35SZ3R5GGQQP4T0U2T5GFAN9P6C4PG"
MERCHANT_NAME = "John's Bakery"
DEVICE_ID = "SDV_2YJDXYESB2YBHECVB5GQGSYPNM8UA6"
STORE_ID = "STO_2ZCZRU9V6U8QA7B49K94667UP6C4PJ"
DEMO_CARD_NUMBER = "9276004429942845"
DEMO_CARD_BALANCE = 1000
DEMO_CARDGROUP_PICTURE = "https://connect.secucard.com/ds_g/8e79737df1e2513db48908b342c3cc436edf501a"
CARD_PREFIX = "9276"
CARD_NAME = "secucard Kundenkarte"
FIRST_TRANS_ID = 29187332

#: ASSUMED value: the docs show the token answer carries ``scope``, not our client's scope
TOKEN_SCOPE = "https://scope.secucard.com/e/api"
#: what ``issue_customer`` loads on a new card (10,00 EUR, like the seed's card)
NEW_CUSTOMER_BALANCE = 1000

MAX_PRODUCTS = 1000
OPEN = ("created", "processing")  # not started yet: may be changed, applied, started, aborted


@attrs.frozen
class ErrorKind:
    """One refusal: its HTTP status, secuconnect exception name, code and cashier text."""

    status: int
    error: str
    code: int
    user: str


#: ASSUMED codes, exception names and statuses (see the module docstring)
ERRORS: dict[str, ErrorKind] = {
    "invalid_request": ErrorKind(400, "ProductFormatException", 4001, "Ungültige Anfrage"),
    "method_unsupported": ErrorKind(400, "ProductFormatException", 4002,
                                    "Diese Zahlart wird nicht unterstützt"),
    "not_found": ErrorKind(404, "ProductNotFoundException", 4004, "Transaktion nicht gefunden"),
    "card_invalid": ErrorKind(400, "ProductNotAllowedException", 4010, "Karte ungültig"),
    "card_locked": ErrorKind(403, "ProductNotAllowedException", 4011, "Karte gesperrt"),
    "insufficient_balance": ErrorKind(409, "ProductNotAllowedException", 4020,
                                      "Das Kartenguthaben reicht nicht aus"),
    "balance_changed": ErrorKind(409, "ProductNotAllowedException", 4021,
                                 "Das Kartenguthaben hat sich geändert"),
    "wrong_status": ErrorKind(409, "ProductNotAllowedException", 4030,
                              "Im aktuellen Status nicht möglich"),
    "expired": ErrorKind(409, "ProductNotAllowedException", 4031, "Die Transaktion ist abgelaufen"),
    "refund_window_closed": ErrorKind(409, "ProductNotAllowedException", 4032,
                                      "Die Stornofrist ist abgelaufen"),
    # documented (developer.secuconnect.com/integration/, error handling): not assumed
    "token_expired": ErrorKind(EXPIRED_TOKEN_STATUS, "ProductNotAllowedException", EXPIRED_TOKEN_CODE,
                               "Die Sitzung ist abgelaufen"),
}


def _fail(kind: str, details: str) -> NoReturn:
    raise BadRequest(details, ERRORS[kind].status, kind)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _amount(minor: int, currency: str) -> str:
    """German receipt style: ``7,96 EUR``, ``1.234,50 EUR``."""
    exponent = CURRENCY_EXPONENTS[currency]
    text = f"{Decimal(minor).scaleb(-exponent):,.{exponent}f}"
    return text.replace(",", "_").replace(".", ",").replace("_", ".") + f" {currency}"


@attrs.define
class Card:
    """A secucard at this merchant (``loyalty.merchantcards``)."""

    number: str
    cash_balance: int
    bonus_balance: int = 0
    locked: bool = False
    merchantcard_id: str = ""
    card_id: str = ""
    card_created: str = "2015-09-28T16:01:20+02:00"
    customer: dict[str, Any] = attrs.field(factory=dict)
    cardgroup: dict[str, Any] = attrs.field(factory=dict)
    last_usage: str | None = None
    last_charge: str | None = None

    @property
    def balance(self) -> int:
        return self.cash_balance + self.bonus_balance


@attrs.define
class LoyaltyTransaction:
    """One booking on a card (``loyalty.transactions``): the ledger entry."""

    id: str
    smart_transaction_id: str
    card_number: str
    turnover: int
    redeemed: int
    booked_at: datetime
    reversed_at: datetime | None = None


@attrs.define
class SmartTransaction:
    id: str
    created: datetime
    updated: datetime
    touched: datetime
    products: list[dict[str, Any]]
    sum: int
    currency: str
    card_number: str | None
    transaction_ref: str | None = None
    merchant_ref: str | None = None
    status: str = "created"
    missing_sum: int | None = None
    prepared_redeem: int | None = None
    payment_method: str | None = None
    trans_id: str | None = None
    loyalty: LoyaltyTransaction | None = None
    receipt: list[dict[str, Any]] = attrs.field(factory=list)
    expired: bool = False
    started_at: datetime | None = None
    start_response: SandboxResponse | None = None
    cancel_response: SandboxResponse | None = None


class SecuconnectSandbox(Sandbox):
    """Smart Transactions, secucards with balances, expiring tokens and transactions."""

    name = "secuconnect"
    host = HOST

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        clients: Mapping[str, str] | None = None,
        demo: bool = True,
    ) -> None:
        super().__init__(clock)
        self.clients = dict(clients) if clients is not None else {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
        self.cards: dict[str, Card] = {}
        self.opening_balances: dict[str, int] = {}
        self.smart_transactions: dict[str, SmartTransaction] = {}
        self.loyalty_transactions: list[LoyaltyTransaction] = []
        self.tokens_issued = 0
        self._tokens: dict[str, datetime] = {}
        self._ids = itertools.count(1)
        self._trans_ids = itertools.count(FIRST_TRANS_ID)
        if demo:
            self._enrol_demo_card()

    # --- set-up and inspection, for tests and the demo ----------------------------------------

    def add_card(self, number: str, cash_balance: int = 0, *, bonus_balance: int = 0,
                 locked: bool = False) -> Card:
        with self.lock:
            card = Card(
                number=number, cash_balance=cash_balance, bonus_balance=bonus_balance, locked=locked,
                merchantcard_id=self._new_id("MCD"), card_id=self._new_id("CRD"),
                customer=_customer(self._new_id("CUS"), "Erika", "Musterfrau", "1990-01-01T00:00:00+00:00",
                                   "2020-01-01T10:00:00+01:00"),
                cardgroup=_cardgroup(self._new_id("CRG"), "Kundenkarte"),
            )
            self.cards[number] = card
            self.opening_balances[number] = cash_balance
            return card

    def lock_card(self, number: str, locked: bool = True) -> None:
        with self.lock:
            self.cards[number].locked = locked

    def card_balance(self, number: str) -> int:
        with self.lock:
            return self.cards[number].cash_balance

    def smart_transaction(self, stx_id: str) -> dict[str, Any]:
        """The transaction as ``GET`` would answer it."""
        with self.lock:
            return self._render(self._find(stx_id))

    def revoke_tokens(self) -> None:
        """Invalidate every issued token (a provider-side logout or key rotation)."""
        with self.lock:
            self._tokens.clear()

    # --- for a newcomer: demo accounts, the driver's credentials, fresh customers ----------------

    def credentials(self) -> dict[str, str]:
        """The ``SecuconnectDriver`` keyword arguments (besides base_url) for this sandbox."""
        client_id, client_secret = next(iter(self.clients.items()))
        return {"client_id": client_id, "client_secret": client_secret}

    def seed_demo(self) -> list[dict[str, str]]:
        """The seed's card (9276004429942845, 10,00 EUR at John's Bakery); idempotent."""
        with self.lock:
            if DEMO_CARD_NUMBER not in self.cards:
                self._enrol_demo_card()
        return [self._customer(DEMO_CARD_NUMBER, "the seed's secucard")]

    def issue_customer(self) -> dict[str, str]:
        """A new secucard holding ``NEW_CUSTOMER_BALANCE``, usable for a sale right away."""
        number = DEMO_CARD_NUMBER
        while number in self.cards:
            number = f"{CARD_PREFIX}{secrets.randbelow(10**12):012d}"
        self.add_card(number, NEW_CUSTOMER_BALANCE)
        return self._customer(number, "a new secucard")

    def _customer(self, number: str, label: str) -> dict[str, str]:
        balance = self.card_balance(number)
        return {"customer_token": number,
                "description": f"{label}: balance {_amount(balance, 'EUR')}"}

    def _enrol_demo_card(self) -> None:
        self.cards[DEMO_CARD_NUMBER] = Card(
            number=DEMO_CARD_NUMBER, cash_balance=DEMO_CARD_BALANCE,
            merchantcard_id="MCD_2RXTNXPRM2YG9922UMBHHAEWEGN6AJ",
            card_id="CRD_2U7MTNAMM3PMBPAB50C9G2AEHA9GPJ",
            card_created="2015-09-28T16:01:20+02:00",
            customer=_customer("CUS_2YBREKK0A2MNAXJ752TSDD9DH3PKAJ", "Max", "Mustermann",
                               "2018-02-14T00:00:00+00:00", "2018-05-03T10:14:06+02:00"),
            cardgroup={**_cardgroup("CRG_2BESGJNETJJRZVVYS8R7JWGVWK4PRZ", "Geschenkgutschein"),
                       "picture": DEMO_CARDGROUP_PICTURE},
            last_usage="2020-09-24T15:51:06+02:00",
            last_charge="2020-09-24T14:40:57+02:00",
        )
        self.opening_balances[DEMO_CARD_NUMBER] = DEMO_CARD_BALANCE

    # --- the provider's error shapes --------------------------------------------------------------

    def error(self, status: int, code: str, message: str, **extra: Any) -> SandboxResponse:
        kind = ERRORS.get(code, ERRORS["invalid_request"])
        return SandboxResponse.json(status, {
            "status": "error",
            "error": kind.error,
            "error_details": message,
            "error_user": kind.user,
            "code": kind.code,
            "supportId": uuid.uuid4().hex,
        })

    def not_found(self, request: SandboxRequest) -> SandboxResponse:
        return self.error(404, "not_found", f"no route for {request.method} {request.path}")

    @staticmethod
    def _oauth_error(status: int, error: str, description: str) -> SandboxResponse:
        return SandboxResponse.json(status, {"error": error, "error_description": description})

    def authorize(self, request: SandboxRequest, operation: str) -> SandboxResponse | None:
        if operation == "token":
            return None
        header = request.header(ASSUMED_AUTH_HEADER) or request.header(SEED_AUTH_HEADER) or ""
        scheme, _, token = header.partition(" ")
        with self.lock:
            expires_at = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if expires_at is None:
                return self._oauth_error(401, "invalid_token", "The access token provided is invalid")
            if self.clock.now() >= expires_at:
                # the error-handling page: an expired token is HTTP 403, code 2003
                return self.error(EXPIRED_TOKEN_STATUS, "token_expired", "The access token has expired")
        return None

    # --- OAuth ----------------------------------------------------------------------------------

    @route("POST", TOKEN_PATH, "token")
    def issue_token(self, request: SandboxRequest) -> SandboxResponse:
        if (request.header("content-type") or "").startswith("application/x-www-form-urlencoded"):
            params: Any = dict(parse_qsl(request.body.decode(errors="replace")))
        else:
            params = request.json()
        if not isinstance(params, dict):
            return self._oauth_error(400, "invalid_request", "the body must be an object")
        if params.get("grant_type") != "client_credentials":
            return self._oauth_error(400, "unsupported_grant_type", "only client_credentials is enabled")
        expected = self.clients.get(str(params.get("client_id")))
        offered = params.get("client_secret")
        if expected is None or not isinstance(offered, str) or not hmac.compare_digest(expected, offered):
            return self._oauth_error(401, "invalid_client", "Client authentication failed")
        token = secrets.token_hex(13)
        self._tokens[token] = self.clock.now() + DOCUMENTED_TOKEN_LIFETIME
        self.tokens_issued += 1
        return SandboxResponse.json(200, {
            "access_token": token,
            "expires_in": int(DOCUMENTED_TOKEN_LIFETIME.total_seconds()),
            "token_type": "bearer",
            "scope": TOKEN_SCOPE,
        })

    # --- Smart Transactions -------------------------------------------------------------------

    @route("POST", TRANSACTIONS_PATH, "create")
    def create(self, request: SandboxRequest) -> SandboxResponse:
        body = self._object(request)
        products, total, currency = self._basket(body)
        card_number = self._idents(body.get("idents", []))
        now = self.clock.now()
        stx = SmartTransaction(
            id=self._new_id("STX"), created=now, updated=now, touched=now, products=products, sum=total,
            currency=currency, card_number=card_number,
            transaction_ref=self._ref(body, "transactionRef"), merchant_ref=self._ref(body, "merchantRef"),
        )
        self.smart_transactions[stx.id] = stx
        return self._view(stx)

    @route("GET", TRANSACTIONS_PATH + "/{stx_id}", "get")
    def get(self, request: SandboxRequest, stx_id: str) -> SandboxResponse:
        return self._view(self._find(stx_id))

    @route("PUT", TRANSACTIONS_PATH + "/{stx_id}", "update")
    def update(self, request: SandboxRequest, stx_id: str) -> SandboxResponse:
        stx = self._open(stx_id)
        body = self._object(request)
        if "basket" in body or "basket_info" in body:
            stx.products, stx.sum, stx.currency = self._basket(body)
        if "idents" in body:
            stx.card_number = self._idents(body["idents"])
        if "transactionRef" in body:
            stx.transaction_ref = self._ref(body, "transactionRef")
        if "merchantRef" in body:
            stx.merchant_ref = self._ref(body, "merchantRef")
        # A changed basket must be priced again: the applied balance no longer holds.
        stx.status, stx.missing_sum, stx.prepared_redeem = "created", None, None
        self._touch(stx)
        return self._view(stx)

    @route("POST", TRANSACTIONS_PATH + "/{stx_id}/preTransaction", "preTransaction")
    def pre_transaction(self, request: SandboxRequest, stx_id: str) -> SandboxResponse:
        stx = self._open(stx_id)
        card = self._card_of(stx)
        if card is None:
            _fail("card_invalid", "the smart transaction has no card ident")
        redeem = min(card.cash_balance, stx.sum)
        stx.status, stx.prepared_redeem, stx.missing_sum = "processing", redeem, stx.sum - redeem
        self._touch(stx)
        # The documented answer: only these two fields (the PHP SDK's
        # SmartTransactionsPreTransactionModel); the sandbox offers no bonus products.
        return SandboxResponse.json(200, {"missing_sum": stx.missing_sum, "bonus_products": []})

    @route("POST", TRANSACTIONS_PATH + "/{stx_id}/start/{method}", "start")
    def start(self, request: SandboxRequest, stx_id: str, method: str) -> SandboxResponse:
        stx = self._find(stx_id)
        if method not in ("loyalty", "cash"):
            _fail("method_unsupported", f"payment method {method!r} is not available for this device")
        if stx.start_response is not None:
            if stx.payment_method == method and "start" in ASSUMED_IDEMPOTENT_CALLS:
                return stx.start_response
            _fail("wrong_status", f"the transaction was already started with {stx.payment_method}")
        self._require_open(stx)
        card = self._card_of(stx)
        applied = stx.status == "processing"
        if method == "loyalty":
            if card is None or not applied:
                _fail("wrong_status", "apply the card balance (preTransaction) before start/loyalty")
            if stx.missing_sum:
                _fail("insufficient_balance", "the card does not cover the basket; use start/cash")
        redeem = stx.prepared_redeem if applied else 0
        if card is not None and card.cash_balance < redeem:
            _fail("balance_changed", "the card no longer holds the applied balance; apply it again")
        now = self.clock.now()
        if not applied:
            stx.missing_sum = 0  # turnover only: nothing is missing from the card's side (the seed)
        stx.trans_id = str(next(self._trans_ids))
        if card is not None:
            card.cash_balance -= redeem
            card.last_usage = _iso(now)
            stx.loyalty = LoyaltyTransaction(self._new_id("LTX"), stx.id, card.number, stx.sum, redeem, now)
            self.loyalty_transactions.append(stx.loyalty)
            stx.receipt = self._receipt(stx, card, "Umsatz erfasst:", "Guthaben eingelöst:", redeem)
        stx.status, stx.payment_method, stx.started_at, stx.updated = "ok", method, now, now
        stx.start_response = self._view(stx)
        return stx.start_response

    @route("POST", TRANSACTIONS_PATH + "/{stx_id}/abort", "abort")
    def abort(self, request: SandboxRequest, stx_id: str) -> SandboxResponse:
        stx = self._find(stx_id)
        if stx.status == "cancelled" and stx.start_response is None and "abort" in ASSUMED_IDEMPOTENT_CALLS:
            return self._view(stx)  # already aborted or expired
        if stx.status not in OPEN:
            _fail("wrong_status", f"a transaction in status {stx.status} cannot be aborted; cancel it")
        stx.status, stx.updated = "cancelled", self.clock.now()
        return self._view(stx)

    @route("POST", TRANSACTIONS_PATH + "/{stx_id}/cancel", "cancel")
    def cancel(self, request: SandboxRequest, stx_id: str) -> SandboxResponse:
        stx = self._find(stx_id)
        if stx.cancel_response is not None and "cancel" in ASSUMED_IDEMPOTENT_CALLS:
            return stx.cancel_response
        if stx.status != "ok":
            _fail("wrong_status", f"only a completed transaction can be cancelled, this one is {stx.status}")
        now = self.clock.now()
        if now >= stx.started_at + ASSUMED_REFUND_WINDOW:
            _fail("refund_window_closed", "the transaction is too old to be cancelled")
        if stx.loyalty is not None:
            card = self.cards[stx.loyalty.card_number]
            card.cash_balance += stx.loyalty.redeemed
            stx.loyalty.reversed_at = now
            stx.receipt = self._receipt(stx, card, "Storno erfasst:", "Guthaben gutgeschrieben:",
                                        stx.loyalty.redeemed)
        stx.status, stx.updated = "cancelled", now
        stx.cancel_response = self._view(stx)
        return stx.cancel_response

    # --- rules ----------------------------------------------------------------------------------

    def _find(self, stx_id: str) -> SmartTransaction:
        stx = self.smart_transactions.get(stx_id)
        if stx is None:
            _fail("not_found", f"no smart transaction {stx_id}")
        ends = stx.touched + ASSUMED_SMART_TRANSACTION_LIFETIME
        if stx.status in OPEN and self.clock.now() >= ends:
            stx.status, stx.expired, stx.updated = "cancelled", True, ends
        return stx

    def _require_open(self, stx: SmartTransaction) -> None:
        if stx.expired:
            _fail("expired", "the smart transaction expired before it was started")
        if stx.status not in OPEN:
            _fail("wrong_status", f"the smart transaction is {stx.status}")

    def _open(self, stx_id: str) -> SmartTransaction:
        stx = self._find(stx_id)
        self._require_open(stx)
        return stx

    def _touch(self, stx: SmartTransaction) -> None:
        stx.updated = stx.touched = self.clock.now()

    def _card_of(self, stx: SmartTransaction) -> Card | None:
        if stx.card_number is None:
            return None
        card = self.cards.get(stx.card_number)
        if card is None:
            _fail("card_invalid", "the card is not known at this merchant")
        if card.locked:
            _fail("card_locked", "the card is locked")
        return card

    # --- parsing requests -------------------------------------------------------------------------

    @staticmethod
    def _object(request: SandboxRequest) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict):
            _fail("invalid_request", "the body must be a JSON object")
        return body

    @staticmethod
    def _basket(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int, str]:
        basket, info = body.get("basket"), body.get("basket_info")
        if not isinstance(basket, dict) or not isinstance(info, dict):
            _fail("invalid_request", "basket and basket_info are required")
        products = basket.get("products")
        if not isinstance(products, list) or not 0 < len(products) <= MAX_PRODUCTS:
            _fail("invalid_request", f"basket.products must hold 1 to {MAX_PRODUCTS} products")
        normalized, seen, total = [], set(), 0
        for product in products:
            if not isinstance(product, dict):
                _fail("invalid_request", "every product is an object")
            number, desc = product.get("id"), product.get("desc")
            quantity, price, tax = product.get("quantity"), product.get("priceOne"), product.get("tax")
            if type(number) is not int or number in seen:
                _fail("invalid_request", "every product needs a unique integer id")
            if not isinstance(desc, str) or not desc.strip():
                _fail("invalid_request", f"product {number}: desc is required")
            if type(quantity) is not int or quantity < 1:
                _fail("invalid_request", f"product {number}: quantity must be a positive integer")
            if type(price) is not int or price < 0:
                _fail("invalid_request", f"product {number}: priceOne must be a non-negative integer (cents)")
            if type(tax) is not int or not 0 <= tax <= 100:
                _fail("invalid_request", f"product {number}: tax must be an integer percent")
            article, ean = product.get("articleNumber", ""), product.get("ean", "")
            if not isinstance(article, str) or not isinstance(ean, str):
                _fail("invalid_request", f"product {number}: articleNumber and ean are strings")
            seen.add(number)
            total += price * quantity
            normalized.append({
                "id": number, "parent": None, "articleNumber": article, "ean": ean, "desc": desc,
                "quantity": quantity, "priceOne": price, "tax": tax, "group": [], "serialNumber": None,
                "item_type": "article", "reference_id": None, "contract_id": None, "sum": None,
            })
        currency = info.get("currency")
        if currency not in CURRENCY_EXPONENTS:
            _fail("invalid_request", "basket_info.currency must be an ISO 4217 code")
        if type(info.get("sum")) is not int or info["sum"] != total:
            _fail("invalid_request", f"basket_info.sum must be the basket's total ({total})")
        return normalized, total, currency

    @staticmethod
    def _idents(idents: Any) -> str | None:
        if not isinstance(idents, list) or len(idents) > 1:
            _fail("invalid_request", "idents must be a list with at most one card")
        if not idents:
            return None
        ident = idents[0]
        if not isinstance(ident, dict) or ident.get("type") != "card" \
                or not isinstance(ident.get("value"), str):
            _fail("invalid_request", "an ident is {type: card, value}")
        return ident["value"]

    @staticmethod
    def _ref(body: Mapping[str, Any], field: str) -> str | None:
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            _fail("invalid_request", f"{field} must be a string")
        return value

    # --- rendering answers --------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        digest = hashlib.sha256(f"secuconnect:{prefix}:{next(self._ids)}".encode()).digest()
        return f"{prefix}_{base64.b32encode(digest).decode()[:30]}"

    def _view(self, stx: SmartTransaction) -> SandboxResponse:
        return SandboxResponse.json(200, self._render(stx))

    def _render(self, stx: SmartTransaction) -> dict[str, Any]:
        loyalty = [{"object": "loyalty.transactions", "id": stx.loyalty.id}] if stx.loyalty else []
        return {
            "object": "smart.transactions",
            "id": stx.id,
            "merchant": {"object": "general.merchants", "id": MERCHANT_ID, "companyname": MERCHANT_NAME},
            "device_source": {"object": "smart.devices", "id": DEVICE_ID},
            "transactions": loyalty,
            "created": _iso(stx.created),
            "updated": _iso(stx.updated),
            "status": stx.status,
            "merchantRef": stx.merchant_ref,
            "transactionRef": stx.transaction_ref,
            "intent": None,
            "basket": {"products": [dict(p) for p in stx.products], "texts": [], "type": "default"},
            "receipt": [dict(line) for line in stx.receipt],
            # missing_sum appears only once a preTransaction has computed it
            "basket_info": {"sum": stx.sum, "currency": stx.currency, "gratuity": None,
                            **({} if stx.missing_sum is None else {"missing_sum": stx.missing_sum})},
            "idents": [self._ident(stx.card_number)] if stx.card_number is not None else [],
            "payment_method": stx.payment_method,
            "trans_id": stx.trans_id,
            "is_demo": True,
            "application_context": {"locks": {"customer": False}, "return_urls": None, "iframe_opts": None},
            "checkout_links": None,
            "payment_links": None,
        }

    def _ident(self, number: str) -> dict[str, Any]:
        card = self.cards.get(number)
        ident: dict[str, Any] = {
            "object": "smart.idents", "id": "smi_1", "prefix": CARD_PREFIX, "name": CARD_NAME,
            "type": "card", "value": number, "valid": card is not None,
        }
        if card is None:
            ident["merchantcard"] = None
            return ident
        merchant = {"object": "general.merchants", "id": MERCHANT_ID}
        ident["merchantcard"] = {
            "object": "loyalty.merchantcards",
            "id": card.merchantcard_id,
            "merchant": dict(merchant),
            "created_for_merchant": dict(merchant),
            "card": {"object": "loyalty.cards", "id": card.card_id, "cardnumber": card.number,
                     "created": card.card_created},
            "cardgroup": dict(card.cardgroup),
            "created_for_store": {"object": "general.stores", "id": STORE_ID},
            "customer": _copy_customer(card.customer),
            "is_base_card": True,
            "points": 0,
            "cash_balance": card.cash_balance,
            "bonus_balance": card.bonus_balance,
            "balance": card.balance,
            "last_usage": card.last_usage,
            "last_charge": card.last_charge,
            "stock_status": "active",
            "lock_status": "locked" if card.locked else "unlocked",
            "passcode": 0,
            "expiry_date": None,
        }
        ident["customer"] = _copy_customer(card.customer)
        return ident

    @staticmethod
    def _receipt(stx: SmartTransaction, card: Card, booked: str, moved: str,
                 redeemed: int) -> list[dict[str, Any]]:
        """The lines the seed shows, plus the balance moved when there was one."""

        def text(value: str, *decoration: str) -> dict[str, Any]:
            return {"type": "textline", "value": {"text": value, "decoration": list(decoration)}}

        def name_value(name: str, value: str) -> dict[str, Any]:
            return {"type": "name-value", "value": {"name": name, "value": value, "decoration": []}}

        lines = [
            {"type": "separator", "value": {"caption": "Kundenkarte"}},
            name_value("Kartennummer: ", card.number),
            name_value("TA Code: ", stx.trans_id),
            {"type": "space"},
            text(booked),
            text(_amount(stx.sum, stx.currency), "important"),
        ]
        if redeemed:
            lines += [{"type": "space"}, text(moved), text(_amount(redeemed, stx.currency), "important")]
        balance = _amount(card.balance, stx.currency)
        lines += [{"type": "space"}, text("Aktuelles Guthaben"), text(balance, "important")]
        return lines


def _customer(customer_id: str, forename: str, surname: str, dob: str, created: str) -> dict[str, Any]:
    return {
        "object": "loyalty.customers",
        "id": customer_id,
        "contact": {"name": f"{forename} {surname}", "forename": forename, "surname": surname, "dob": dob},
        "created": created,
        "consent_for_communication": True,
    }


def _copy_customer(customer: Mapping[str, Any]) -> dict[str, Any]:
    return {**customer, "contact": dict(customer.get("contact", {}))}


def _cardgroup(cardgroup_id: str, name: str) -> dict[str, Any]:
    return {
        "object": "loyalty.cardgroups", "id": cardgroup_id, "display_name": name, "display_name_raw": name,
        "stock_warn_limit": 0, "picture": None,
    }
