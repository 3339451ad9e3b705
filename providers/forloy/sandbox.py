"""A faithful Forloy simulator: staff logins, cards of the three types, and their rules.

What it keeps, on its own ``clock``:

- staff accounts that log in with email and password; access tokens that expire after
  ``expires_in`` (3600 s), refresh tokens that rotate (``ASSUMED_REFRESH_PATH``);
- punch cards (requirement, carried-over punches, rewards pending claim, the one-minute
  cooldown per card), cashback cards (balance, rate by tier, ``tier_changed``) and
  discount cards (rate by tier, on lifetime spend), each with a secret QR payload and a
  numeric barcode;
- idempotency: a repeated ``idempotency_key`` returns the original result with
  ``"idempotent": true`` (refusals are not remembered, so they can be retried);
- offline sync batches of 1 to 100 records, each judged at its ``client_timestamp``;
- rewards claimed oldest first; a paged, filtered transaction history.

Amounts are Decimals in the merchant's currency (``currency=``, default EUR), rounded
half up to its minor unit.  Every assumption it shares with the driver is a constant in
``txengine.providers.forloy.driver`` (see its fidelity note).

Set-up and inspection for tests and the demo: ``add_staff``, ``add_location``,
``add_punch_card``, ``add_cashback_card``, ``add_discount_card`` (each returns the
``Card``, with its ``qr_code_data`` and ``barcode_value``), ``card(id)``,
``transactions``, ``transactions_for(id)``, ``rewards_of(id)``, ``revoke_tokens()``.
For a newcomer: ``seed_demo()`` (a punch, a cashback and a discount card, the QR guide's
``forloy_enr_abc123def456`` among them), ``credentials()`` (the driver's staff login,
location and staff id) and ``issue_customer()`` (a new cashback card holding 5.00).
Lookups answer seed 002's nested ``balance``, or the rewards guide's flat shape with
``flat_lookup=True``; offline sync requires ``qr_code_data`` per record (the guide).
"""

from __future__ import annotations

import base64
import hmac
import itertools
import json
import math
import secrets
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import attrs

from txengine.clock import Clock
from txengine.money import currency_exponent
from txengine.testing.sandbox import Sandbox, SandboxRequest, SandboxResponse, route

from .driver import (
    ACCESS_TOKEN_TTL,
    API_PREFIX,
    ASSUMED_CARD_INACTIVE,
    ASSUMED_CARD_INACTIVE_STATUS,
    ASSUMED_CARD_NOT_FOUND_STATUS,
    CASHBACK_BALANCE_FIELD,
    ASSUMED_CURRENCY,
    ASSUMED_HISTORY_MAX_PAGE_SIZE,
    ASSUMED_NO_PENDING_REWARDS,
    ASSUMED_NO_PENDING_REWARDS_STATUS,
    ASSUMED_REFRESH_PATH,
    ASSUMED_REFRESH_TOKEN_TTL,
    ASSUMED_RETRY_AFTER_FIELD,
    ASSUMED_ROUNDING,
    ASSUMED_SYNC_RECORDS_FIELD,
    ASSUMED_SYNC_RESULTS_FIELD,
    TIER_FIELD,
    ASSUMED_VALIDATION_ERROR,
    ASSUMED_VALIDATION_STATUS,
    CARD_NOT_FOUND,
    CARD_TYPES,
    COOLDOWN_ACTIVE,
    COOLDOWN_STATUS,
    HISTORY_DEFAULT_PAGE_SIZE,
    PUNCH_COOLDOWN,
    SYNC_BATCH_LIMIT,
    TOKEN_EXPIRED,
    UNAUTHORIZED,
    UNAUTHORIZED_STATUS,
    ForloyDriver,
    dumps,
    loads,
    wire_timestamp,
)

HOST = "api.forloy.com"


class _Refused(Exception):
    """A definite refusal: the error envelope's status, code and message."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _invalid(message: str) -> _Refused:
    return _Refused(ASSUMED_VALIDATION_STATUS, ASSUMED_VALIDATION_ERROR, message)


def _decimal(value: str | int | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


@attrs.frozen
class Tier:
    """A card tier: reached at ``min_spend`` lifetime spend, gives ``rate``."""

    name: str
    min_spend: Decimal = attrs.field(converter=_decimal)
    rate: Decimal = attrs.field(converter=_decimal)


def _tiers(value: Iterable[Tier | tuple]) -> tuple[Tier, ...]:
    tiers = sorted((tier if isinstance(tier, Tier) else Tier(*tier) for tier in value),
                   key=lambda tier: tier.min_spend)
    if tiers and tiers[0].min_spend != 0:
        raise ValueError("the lowest tier must start at a lifetime spend of 0")
    return tuple(tiers)


@attrs.define
class Card:
    """One customer's card and its balance, as the sandbox keeps it."""

    card_instance_id: str
    card_type: str
    card_title: str
    customer_name: str
    qr_code_data: str = attrs.field(repr=False)  # the customer's secret key
    barcode_value: str
    status: str = "active"
    # punch cards
    punch_requirement: int = 0
    current_punches: int = 0
    lifetime_punches: int = 0
    reward_title: str = ""
    reward_description: str = ""
    punch_times: list[datetime] = attrs.field(factory=list)
    # cashback and discount cards
    balance: Decimal = Decimal(0)
    lifetime_spend: Decimal = Decimal(0)
    tiers: tuple[Tier, ...] = attrs.field(default=(), converter=_tiers)

    def tier(self) -> Tier:
        return [tier for tier in self.tiers if tier.min_spend <= self.lifetime_spend][-1]


@attrs.define
class Reward:
    reward_id: str
    card_instance_id: str
    title: str
    description: str
    earned_at: datetime
    status: str = "pending_claim"
    claimed_at: datetime | None = None


@attrs.frozen
class RecordedTransaction:
    """A purchase Forloy committed: what exactly-once and ledger checks count."""

    transaction_id: str
    card_instance_id: str
    card_type: str
    purchase_amount: Decimal
    location_id: str
    staff_user_id: str
    created_at: datetime  # when the purchase happened (client_timestamp when synced)
    recorded_at: datetime  # when Forloy learned of it
    via: str  # "record" or "sync"
    punches_added: int = 0
    cashback_earned: Decimal | None = None
    discount_amount: Decimal | None = None
    idempotency_key: str | None = None
    pos_reference_id: str | None = None
    pos_terminal_id: str | None = None
    transaction_notes: str | None = None


@attrs.define
class StaffAccount:
    email: str
    password: str = attrs.field(repr=False)
    staff_user_id: str
    name: str
    role: str = "staff"


@attrs.frozen
class _Token:
    staff: StaffAccount
    expires_at: datetime


_DEMO_CASHBACK_QR = "forloy_enr_cashback00001"
_DEMO_DISCOUNT_QR = "forloy_enr_discount00001"


class ForloySandbox(Sandbox):
    """Forloy's API with its business rules; see the module docstring."""

    name = "forloy"
    host = HOST
    merchant_name = "Bean & Brew"
    STAFF_EMAIL = "alex@beanandbrew.example"
    STAFF_PASSWORD = "espresso-doppio-42"
    STAFF_USER_ID = "staff_042"
    STAFF_NAME = "Alex M."
    LOCATION_ID = "loc_001"
    LOCATION_NAME = "Downtown Branch"

    def __init__(self, clock: Clock | None = None, *, currency: str = ASSUMED_CURRENCY,
                 flat_lookup: bool = False) -> None:
        super().__init__(clock)
        self.currency = currency
        #: answer lookups flat, as the rewards guide shows them, instead of seed 002's nesting
        self.flat_lookup = flat_lookup
        self._quantum = Decimal(1).scaleb(-currency_exponent(currency))
        self.staff: dict[str, StaffAccount] = {}
        self.locations: dict[str, str] = {}
        self.cards: dict[str, Card] = {}
        self.rewards: list[Reward] = []
        self.transactions: list[RecordedTransaction] = []
        self.logins = 0
        self.refreshes = 0
        self._by_qr: dict[str, str] = {}
        self._by_barcode: dict[str, str] = {}
        self._results: dict[str, dict[str, Any]] = {}  # idempotency_key -> original data
        self._access: dict[str, _Token] = {}
        self._refresh: dict[str, _Token] = {}
        self._barcodes = itertools.count(1234567890)
        self.add_staff(self.STAFF_EMAIL, self.STAFF_PASSWORD, self.STAFF_USER_ID, self.STAFF_NAME)
        self.add_location(self.LOCATION_ID, self.LOCATION_NAME)

    @property
    def base_url(self) -> str:
        return f"https://{self.host}{API_PREFIX}"

    # --- set-up and inspection ---

    def add_staff(self, email: str, password: str, staff_user_id: str, name: str) -> StaffAccount:
        account = StaffAccount(email, password, staff_user_id, name)
        self.staff[email.lower()] = account
        return account

    def add_location(self, location_id: str, name: str) -> None:
        self.locations[location_id] = name

    def _new_card(self, card_type: str, *, card_title: str, customer_name: str,
                  status: str, qr_code_data: str | None = None, **rules: Any) -> Card:
        card_id = str(uuid.uuid4())
        if qr_code_data is None:
            key = json.dumps({"card_instance_id": card_id, "key": secrets.token_hex(16)},
                             separators=(",", ":"))
            qr_code_data = base64.b64encode(key.encode()).decode()
        card = Card(
            card_instance_id=card_id, card_type=card_type, card_title=card_title,
            customer_name=customer_name, status=status,
            qr_code_data=qr_code_data,
            barcode_value=f"9000{next(self._barcodes):010d}", **rules,
        )
        with self.lock:
            self.cards[card_id] = card
            self._by_qr[card.qr_code_data] = card_id
            self._by_barcode[card.barcode_value] = card_id
        return card

    def add_punch_card(
        self, *, punch_requirement: int = 10, current_punches: int = 0,
        lifetime_punches: int | None = None, reward_title: str = "Free Coffee",
        reward_description: str = "One free drink of your choice",
        card_title: str = "Coffee Rewards", customer_name: str = "Jane Doe",
        status: str = "active", qr_code_data: str | None = None,
    ) -> Card:
        return self._new_card(
            "punch", card_title=card_title, customer_name=customer_name, status=status,
            qr_code_data=qr_code_data,
            punch_requirement=punch_requirement, current_punches=current_punches,
            lifetime_punches=current_punches if lifetime_punches is None else lifetime_punches,
            reward_title=reward_title, reward_description=reward_description,
        )

    def add_cashback_card(
        self, *, balance: str | Decimal = "0.00", cashback_rate: str | Decimal = "0.05",
        tiers: Iterable[Tier | tuple] | None = None, lifetime_spend: str | Decimal = "0",
        card_title: str = "Cashback Club", customer_name: str = "Jane Doe", status: str = "active",
        qr_code_data: str | None = None,
    ) -> Card:
        return self._new_card(
            "cashback", card_title=card_title, customer_name=customer_name, status=status,
            qr_code_data=qr_code_data,
            balance=_decimal(balance), lifetime_spend=_decimal(lifetime_spend),
            tiers=tiers if tiers is not None else [("Standard", "0", cashback_rate)],
        )

    def add_discount_card(
        self, *, discount_rate: str | Decimal = "0.10",
        tiers: Iterable[Tier | tuple] | None = None, lifetime_spend: str | Decimal = "0",
        card_title: str = "VIP Discount", customer_name: str = "Jane Doe", status: str = "active",
        qr_code_data: str | None = None,
    ) -> Card:
        return self._new_card(
            "discount", card_title=card_title, customer_name=customer_name, status=status,
            qr_code_data=qr_code_data,
            lifetime_spend=_decimal(lifetime_spend),
            tiers=tiers if tiers is not None else [("Member", "0", discount_rate)],
        )

    def card(self, card_instance_id: str) -> Card:
        return self.cards[card_instance_id]

    # --- for a newcomer: demo accounts, the driver's credentials, fresh customers ---

    #: the QR payload of the public QR guide's example, seeded so the docs' example scans
    DOCS_QR_EXAMPLE = "forloy_enr_abc123def456"

    def credentials(self) -> dict[str, str]:
        """The ``ForloyDriver`` keyword arguments (besides base_url) for this sandbox."""
        return {"email": self.STAFF_EMAIL, "password": self.STAFF_PASSWORD,
                "location_id": self.LOCATION_ID, "staff_user_id": self.STAFF_USER_ID}

    def seed_demo(self) -> list[dict[str, str]]:
        """One card of each type, the QR guide's example among them; idempotent."""
        with self.lock:
            by_qr = {card.qr_code_data: card for card in self.cards.values()}
        if self.DOCS_QR_EXAMPLE not in by_qr:
            by_qr[self.DOCS_QR_EXAMPLE] = self.add_punch_card(current_punches=9,
                                                              qr_code_data=self.DOCS_QR_EXAMPLE)
            by_qr[_DEMO_CASHBACK_QR] = self.add_cashback_card(balance="5.00", qr_code_data=_DEMO_CASHBACK_QR)
            by_qr[_DEMO_DISCOUNT_QR] = self.add_discount_card(qr_code_data=_DEMO_DISCOUNT_QR)
        return [self._customer(by_qr[qr]) for qr in (self.DOCS_QR_EXAMPLE, _DEMO_CASHBACK_QR, _DEMO_DISCOUNT_QR)]

    def issue_customer(self) -> dict[str, str]:
        """A new cashback card holding 5.00, usable for a sale right away."""
        card = self.add_cashback_card(balance="5.00", qr_code_data=f"forloy_enr_{secrets.token_hex(6)}")
        return self._customer(card)

    @staticmethod
    def _customer(card: Card) -> dict[str, str]:
        if card.card_type == "punch":
            holds = f"{card.current_punches} of {card.punch_requirement} punches"
        elif card.card_type == "cashback":
            holds = f"cashback balance {card.balance}"
        else:
            holds = "a member discount"
        return {"customer_token": card.qr_code_data,
                "description": f"{card.card_title} ({card.card_type} card of {card.customer_name}): {holds}"}

    def transactions_for(self, card_instance_id: str) -> list[RecordedTransaction]:
        return [tx for tx in self.transactions if tx.card_instance_id == card_instance_id]

    def rewards_of(self, card_instance_id: str, status: str | None = None) -> list[Reward]:
        return [r for r in self.rewards if r.card_instance_id == card_instance_id
                and (status is None or r.status == status)]

    def revoke_tokens(self) -> None:
        """Forget every issued token (a server-side logout): the next call is UNAUTHORIZED."""
        with self.lock:
            self._access.clear()
            self._refresh.clear()

    # --- envelope ---

    def _meta(self) -> dict[str, str]:
        return {"request_id": f"req_{secrets.token_hex(6)}",
                "timestamp": wire_timestamp(self.clock.now())}

    def _ok(self, data: Mapping[str, Any], status: int = 200) -> SandboxResponse:
        body = {"success": True, "data": data, "meta": self._meta()}
        return SandboxResponse(status, dumps(body), (("content-type", "application/json"),))

    def error(self, status: int, code: str, message: str, **extra: Any) -> SandboxResponse:
        error = {"code": code, "message": message, **extra}
        headers = [("content-type", "application/json")]
        if extra.get(ASSUMED_RETRY_AFTER_FIELD) is not None:
            headers.append(("retry-after", str(extra[ASSUMED_RETRY_AFTER_FIELD])))
        body = {"success": False, "error": error, "meta": self._meta()}
        return SandboxResponse(status, dumps(body), tuple(headers))

    def _refusal(self, refused: _Refused) -> SandboxResponse:
        extra = {} if refused.retry_after is None else {ASSUMED_RETRY_AFTER_FIELD: refused.retry_after}
        return self.error(refused.status, refused.code, refused.message, **extra)

    @staticmethod
    def _body(request: SandboxRequest) -> dict[str, Any]:
        try:
            body = loads(request.body or b"{}")
        except ValueError:
            raise _invalid("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _invalid("the body must be a JSON object")
        return body

    def _answer(self, produce) -> SandboxResponse:
        try:
            return produce()
        except _Refused as refused:
            return self._refusal(refused)

    # --- authentication ---

    def authorize(self, request: SandboxRequest, operation: str) -> SandboxResponse | None:
        if operation in ("login", "refresh"):
            return None
        try:
            self._staff_of(request)
        except _Refused as refused:
            return self._refusal(refused)
        return None

    def _staff_of(self, request: SandboxRequest) -> StaffAccount:
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        with self.lock:
            issued = self._access.get(token) if scheme.lower() == "bearer" else None
        if issued is None:
            raise _Refused(UNAUTHORIZED_STATUS, UNAUTHORIZED, "Missing or invalid access token")
        if self.clock.now() >= issued.expires_at:
            raise _Refused(UNAUTHORIZED_STATUS, TOKEN_EXPIRED, "The access token has expired")
        return issued.staff

    def _issue(self, staff: StaffAccount) -> dict[str, Any]:
        now = self.clock.now()
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._access[access] = _Token(staff, now + ACCESS_TOKEN_TTL)
        self._refresh[refresh] = _Token(staff, now + ASSUMED_REFRESH_TOKEN_TTL)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": int(ACCESS_TOKEN_TTL.total_seconds()),
            "user": self._profile(staff),
        }

    def _profile(self, staff: StaffAccount) -> dict[str, Any]:
        return {"id": staff.staff_user_id, "email": staff.email, "name": staff.name,
                "role": staff.role, "merchant_name": self.merchant_name,
                "location_ids": sorted(self.locations)}

    @route("POST", f"{API_PREFIX}/auth/login", "login")
    def login(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            body = self._body(request)
            email, password = body.get("email"), body.get("password")
            if not isinstance(email, str) or not isinstance(password, str):
                raise _invalid("email and password are required")
            staff = self.staff.get(email.lower())
            if staff is None or not hmac.compare_digest(staff.password.encode(), password.encode()):
                raise _Refused(UNAUTHORIZED_STATUS, UNAUTHORIZED, "Invalid email or password")
            self.logins += 1
            return self._ok(self._issue(staff))

        return self._answer(produce)

    @route("POST", f"{API_PREFIX}{ASSUMED_REFRESH_PATH}", "refresh")
    def refresh(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            token = self._body(request).get("refresh_token")
            if not isinstance(token, str):
                raise _invalid("refresh_token is required")
            issued = self._refresh.pop(token, None)  # rotation: a refresh token works once
            if issued is None:
                raise _Refused(UNAUTHORIZED_STATUS, UNAUTHORIZED, "Invalid refresh token")
            if self.clock.now() >= issued.expires_at:
                raise _Refused(UNAUTHORIZED_STATUS, TOKEN_EXPIRED, "The refresh token has expired")
            self.refreshes += 1
            return self._ok(self._issue(issued.staff))

        return self._answer(produce)

    @route("GET", f"{API_PREFIX}/auth/me", "me")
    def me(self, request: SandboxRequest) -> SandboxResponse:
        return self._answer(lambda: self._ok(self._profile(self._staff_of(request))))

    # --- cards ---

    def _card_view(self, card: Card) -> dict[str, Any]:
        if card.card_type == "punch":
            pending = len(self.rewards_of(card.card_instance_id, "pending_claim"))
            balance: dict[str, Any] = {
                "current_punches": card.current_punches,
                "punch_requirement": card.punch_requirement,
                "pending_rewards": pending,
                "lifetime_punches": card.lifetime_punches,
            }
        elif card.card_type == "cashback":
            balance = {CASHBACK_BALANCE_FIELD: self._amount(card.balance),
                       "cashback_rate": card.tier().rate, TIER_FIELD: card.tier().name}
        else:
            balance = {"discount_rate": card.tier().rate, TIER_FIELD: card.tier().name,
                       "lifetime_spend": self._amount(card.lifetime_spend)}
        if self.flat_lookup:  # the rewards guide's shape
            return {"card_instance_id": card.card_instance_id, "card_type": card.card_type,
                    "card_name": card.card_title, **balance, "status": card.status}
        return {  # seed 002's shape
            "card_instance_id": card.card_instance_id,
            "card_type": card.card_type,
            "card_title": card.card_title,
            "merchant_name": self.merchant_name,
            "customer_name": card.customer_name,
            "status": card.status,
            "balance": balance,
        }

    def _find(self, *, qr_code_data: Any = None, barcode_value: Any = None,
              card_instance_id: Any = None) -> Card:
        given = [v for v in (qr_code_data, barcode_value, card_instance_id) if v is not None]
        if len(given) != 1 or not isinstance(given[0], str) or not given[0]:
            raise _invalid("identify the card by exactly one of its identifiers")
        if qr_code_data is not None:
            card_id = self._by_qr.get(qr_code_data)
        elif barcode_value is not None:
            card_id = self._by_barcode.get(barcode_value)
        else:
            card_id = card_instance_id
        card = self.cards.get(card_id)
        if card is None:
            raise _Refused(ASSUMED_CARD_NOT_FOUND_STATUS, CARD_NOT_FOUND, "Card not found")
        return card

    @route("POST", f"{API_PREFIX}/cards/lookup", "lookup")
    def lookup(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            body = self._body(request)
            card = self._find(qr_code_data=body.get("qr_code_data"),
                              barcode_value=body.get("barcode_value"))
            return self._ok(self._card_view(card))

        return self._answer(produce)

    # --- recording purchases ---

    def _amount(self, value: Decimal) -> Decimal:
        return value.quantize(self._quantum, rounding=ASSUMED_ROUNDING)

    def _purchase_amount(self, value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            raise _invalid("purchase_amount must be a number")
        amount = Decimal(value)
        if not amount.is_finite() or amount < 0:
            raise _invalid("purchase_amount must be zero or positive")
        if amount != amount.quantize(self._quantum):
            raise _invalid(f"purchase_amount has more decimals than {self.currency} allows")
        return self._amount(amount)

    @staticmethod
    def _optional_text(body: Mapping[str, Any], field: str) -> str | None:
        value = body.get(field)
        if value is not None and (not isinstance(value, str) or not value or len(value) > 255):
            raise _invalid(f"{field} must be a string of 1 to 255 characters")
        return value

    def _moment(self, body: Mapping[str, Any]) -> datetime | None:
        value = body.get("client_timestamp")
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise _invalid("client_timestamp must be an ISO 8601 time with a zone")
        return moment

    def _record(self, body: Mapping[str, Any], via: str, *, key_required: bool = False) -> dict[str, Any]:
        """Validate and commit one purchase; the answer's data, or ``_Refused``."""
        location_id, staff_user_id = body.get("location_id"), body.get("staff_user_id")
        if location_id not in self.locations:
            raise _invalid("location_id is required and must name one of the merchant's locations")
        staff = {s.staff_user_id: s for s in self.staff.values()}.get(staff_user_id)
        if staff is None:
            raise _invalid("staff_user_id is required and must name a staff member")
        amount = self._purchase_amount(body.get("purchase_amount"))
        punch_count = body.get("punch_count", 1)
        if isinstance(punch_count, bool) or not isinstance(punch_count, int) or punch_count < 1:
            raise _invalid("punch_count must be a positive integer")
        key = self._optional_text(body, "idempotency_key")
        if key is None and key_required:
            raise _invalid("every synced record needs an idempotency_key")
        texts = {field: self._optional_text(body, field)
                 for field in ("pos_reference_id", "pos_terminal_id")}
        notes = body.get("transaction_notes")
        if notes is not None and not isinstance(notes, str):
            raise _invalid("transaction_notes must be a string")
        moment = self._moment(body)
        if key is not None and key in self._results:
            return {**self._results[key], "idempotent": True}
        card = self._find(qr_code_data=body.get("qr_code_data"),
                          card_instance_id=body.get("card_instance_id"))
        if card.status != "active":
            raise _Refused(ASSUMED_CARD_INACTIVE_STATUS, ASSUMED_CARD_INACTIVE,
                           f"The card is {card.status}")
        now = self.clock.now()
        # A synced record happened at its client_timestamp; an online one happens now.
        when = (moment or now) if via == "sync" else now
        transaction_id = f"txn_{uuid.uuid4()}"
        data: dict[str, Any] = {"transaction_id": transaction_id, "card_type": card.card_type}
        recorded: dict[str, Any] = {}
        if card.card_type == "punch":
            data.update(self._punch(card, punch_count, when))
            recorded["punches_added"] = punch_count
        elif card.card_type == "cashback":
            data.update(self._cashback(card, amount))
            recorded["cashback_earned"] = data["cashback_earned"]
        else:
            data.update(self._discount(card, amount))
            recorded["discount_amount"] = data["discount_amount"]
        self.transactions.append(RecordedTransaction(
            transaction_id=transaction_id, card_instance_id=card.card_instance_id,
            card_type=card.card_type, purchase_amount=amount, location_id=location_id,
            staff_user_id=staff.staff_user_id, created_at=moment or now, recorded_at=now, via=via,
            idempotency_key=key, transaction_notes=notes, **texts, **recorded,
        ))
        if key is not None:
            self._results[key] = data
        return data

    def _punch(self, card: Card, count: int, when: datetime) -> dict[str, Any]:
        # The cooldown is exclusive: exactly one minute later, a punch is accepted.
        waits = [last + PUNCH_COOLDOWN - when for last in card.punch_times
                 if abs(when - last) < PUNCH_COOLDOWN]
        if waits:
            seconds = math.ceil(max(waits).total_seconds())
            raise _Refused(COOLDOWN_STATUS, COOLDOWN_ACTIVE,
                           f"This card was punched less than a minute ago; retry in {seconds} s",
                           retry_after=seconds)
        card.punch_times.append(when)
        total = card.current_punches + count
        earned = total // card.punch_requirement
        card.current_punches = total % card.punch_requirement  # punches carry over
        card.lifetime_punches += count
        reward = None
        for _ in range(earned):
            reward = Reward(f"rwd_{secrets.token_hex(6)}", card.card_instance_id,
                            card.reward_title, card.reward_description, earned_at=when)
            self.rewards.append(reward)
        return {
            "punches_added": count,
            "new_punch_count": total,
            "reward_earned": reward is not None,
            "reward": None if reward is None else {
                "reward_id": reward.reward_id, "title": reward.title,
                "description": reward.description, "status": reward.status,
            },
        }

    def _cashback(self, card: Card, amount: Decimal) -> dict[str, Any]:
        tier = card.tier()
        earned = self._amount(amount * tier.rate)
        card.balance = self._amount(card.balance + earned)
        card.lifetime_spend += amount
        return {
            "purchase_amount": amount,
            "cashback_rate": tier.rate,
            "cashback_earned": earned,
            "new_balance": card.balance,
            "tier_changed": card.tier() != tier,
        }

    def _discount(self, card: Card, amount: Decimal) -> dict[str, Any]:
        rate = card.tier().rate
        discount = self._amount(amount * rate)
        card.lifetime_spend += amount
        return {
            "purchase_amount": amount,
            "discount_rate": rate,
            "discount_amount": discount,
            "final_amount": amount - discount,
        }

    @route("POST", f"{API_PREFIX}/transactions/record", "record")
    def record(self, request: SandboxRequest) -> SandboxResponse:
        return self._answer(lambda: self._ok(self._record(self._body(request), "record")))

    @route("POST", f"{API_PREFIX}/transactions/sync", "sync")
    def sync(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            records = self._body(request).get(ASSUMED_SYNC_RECORDS_FIELD)
            if not isinstance(records, list) or not 1 <= len(records) <= SYNC_BATCH_LIMIT:
                raise _invalid(f"{ASSUMED_SYNC_RECORDS_FIELD} must hold 1 to {SYNC_BATCH_LIMIT} records")
            results = []
            for record in records:
                key = record.get("idempotency_key") if isinstance(record, dict) else None
                try:
                    if not isinstance(record, dict):
                        raise _invalid("each record must be a JSON object")
                    if not isinstance(record.get("qr_code_data"), str):
                        # the offline-sync guide: qr_code_data is required per record
                        raise _invalid("every synced record needs qr_code_data")
                    data = self._record(record, "sync", key_required=True)
                    results.append({"idempotency_key": key, "success": True, "data": data})
                except _Refused as refused:
                    error = {"code": refused.code, "message": refused.message}
                    if refused.retry_after is not None:
                        error[ASSUMED_RETRY_AFTER_FIELD] = refused.retry_after
                    results.append({"idempotency_key": key, "success": False, "error": error})
            synced = sum(1 for result in results if result["success"])
            return self._ok({ASSUMED_SYNC_RESULTS_FIELD: results, "synced_count": synced,
                             "failed_count": len(results) - synced})

        return self._answer(produce)

    # --- rewards and history ---

    @route("POST", f"{API_PREFIX}/rewards/claim", "claim")
    def claim(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            body = self._body(request)
            if body.get("location_id") not in self.locations:
                raise _invalid("location_id must name one of the merchant's locations")
            card = self._find(card_instance_id=body.get("card_instance_id"))
            pending = sorted(self.rewards_of(card.card_instance_id, "pending_claim"),
                             key=lambda reward: reward.earned_at)
            if not pending:
                raise _Refused(ASSUMED_NO_PENDING_REWARDS_STATUS, ASSUMED_NO_PENDING_REWARDS,
                               "This card has no pending reward")
            reward = pending[0]  # oldest first
            reward.status, reward.claimed_at = "claimed", self.clock.now()
            # the rewards guide's documented claim answer
            return self._ok({
                "transaction_id": f"txn_{uuid.uuid4()}", "reward_id": reward.reward_id,
                "reward_name": reward.title, "reward_amount": 1,
                "earned_at": wire_timestamp(reward.earned_at),
                "pending_rewards_remaining": len(pending) - 1,
            })

        return self._answer(produce)

    @staticmethod
    def _positive(query: Mapping[str, str], name: str, default: int, most: int | None = None) -> int:
        raw = query.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < 1 or (most is not None and int(raw) > most):
            raise _invalid(f"{name} must be an integer from 1" + (f" to {most}" if most else ""))
        return int(raw)

    def _date(self, query: Mapping[str, str], name: str) -> datetime | None:
        if query.get(name) is None:
            return None
        return self._moment({"client_timestamp": query[name]})

    @route("GET", f"{API_PREFIX}/transactions/history", "history")
    def history(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            query = request.query
            card = self._find(card_instance_id=query.get("card_instance_id"))
            page = self._positive(query, "page", 1)
            size = self._positive(query, "page_size", HISTORY_DEFAULT_PAGE_SIZE,
                                  ASSUMED_HISTORY_MAX_PAGE_SIZE)
            kind = query.get("transaction_type")
            if kind is not None and kind not in CARD_TYPES:
                raise _invalid(f"transaction_type must be one of {', '.join(CARD_TYPES)}")
            since, until = self._date(query, "from_date"), self._date(query, "to_date")
            matching = [
                tx for tx in self.transactions_for(card.card_instance_id)
                if (kind is None or tx.card_type == kind)
                and (since is None or tx.created_at >= since)
                and (until is None or tx.created_at <= until)
            ]
            matching.sort(key=lambda tx: tx.created_at, reverse=True)
            names = {s.staff_user_id: s.name for s in self.staff.values()}
            return self._ok({
                "transactions": [self._history_entry(tx, names)
                                 for tx in matching[(page - 1) * size: page * size]],
                "pagination": {"page": page, "page_size": size, "total_count": len(matching),
                               "total_pages": math.ceil(len(matching) / size)},
            })

        return self._answer(produce)

    def _history_entry(self, tx: RecordedTransaction, staff_names: Mapping[str, str]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "transaction_id": tx.transaction_id,
            "transaction_type": tx.card_type,
            "purchase_amount": tx.purchase_amount,
        }
        if tx.card_type == "punch":
            entry["punches_added"] = tx.punches_added
        elif tx.card_type == "cashback":
            entry["cashback_earned"] = tx.cashback_earned
        else:
            entry["discount_amount"] = tx.discount_amount
        entry.update(created_at=wire_timestamp(tx.created_at),
                     location_name=self.locations.get(tx.location_id),
                     staff_name=staff_names.get(tx.staff_user_id))
        return entry

    def not_found(self, request: SandboxRequest) -> SandboxResponse:
        return self.error(404, "NOT_FOUND", f"No route for {request.method} {request.path}")


def forloy_pair(clock: Clock, /, **driver_options: Any) -> tuple[ForloySandbox, ForloyDriver]:
    """A sandbox and a driver wired to it in-process; the driver shares the clock unless
    ``clock=`` is among ``driver_options``."""
    sandbox = ForloySandbox(clock)
    options = {"transport": sandbox.transport(), "clock": clock, "base_url": sandbox.base_url,
               **driver_options}
    driver = ForloyDriver(
        email=ForloySandbox.STAFF_EMAIL, password=ForloySandbox.STAFF_PASSWORD,
        location_id=ForloySandbox.LOCATION_ID, staff_user_id=ForloySandbox.STAFF_USER_ID,
        **options,
    )
    return sandbox, driver


__all__ = ["Card", "ForloySandbox", "RecordedTransaction", "Reward", "Tier", "forloy_pair"]
