"""A simulator of Rekonect's POS API: members, wallets, gifts, deals, payments, purchases.

Business rules, on the sandbox's own clock:

- members hold ``points`` and ``credit``; a ``pay`` draws the one wallet the business
  is configured for (``payment_asset``, points by default, one minor unit each) and
  answers ``407`` when it does not cover the amount;
- ``pay`` is idempotent by ``transaction.transactionId``: a repeat answers the original
  confirmation code and balance (the same id with another amount is refused);
- a payment ``cancel`` by confirmation code restores exactly what the payment drew,
  once; a repeat answers success without paying back twice;
- gifts (``assets``) are one-time: a gift used by a recorded purchase answers ``522``
  when offered again; a gift is valid until its ``valid_until`` (judged at the
  purchase's ``openTime``, so a purchase delivered late still counts);
- deals discount eligible lines (by product code, above a minimum spend), then gifts
  discount what is left; discounts never take a line below zero;
- the submit records each ``transactionId`` once (a repeat answers the same and is
  counted in ``submissions``), answers the seed's ``data: {}`` (or, with
  ``submit_answers_code``, the ``confirmationCode`` a cancel needs), consumes its gifts and awards
  ``earn_points_per_100`` points per 100 minor units; a transaction ``cancel`` revokes
  the awarded points and frees the gifts, and does NOT touch the payment;
- ``/member/details`` and ``/payment`` take the public pages' transaction (``dateTime``,
  ``items[].subtotal/total``, ``payments[]``, ``employee``); ``/transaction`` takes the
  seed's (``openTime``, ``grossAmount/netAmount``, ``meansOfPayment[]``);
- errors carry ``code``, ``message`` and, for a field at fault, ``path`` (an unknown
  member is ``4001012`` at ``body.member.phoneNumber``);
- requests with ``null``, ``""`` or ``{}`` values are refused (the docs ask clients not
  to send empty fields; ``[]`` is accepted because the docs' own examples send it).

Envelope, paths, headers and the ASSUMED details are the driver's (see its fidelity
note); the sandbox imports them so one constant describes each assumption.
"""

from __future__ import annotations

import functools
import itertools
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import attrs

from txengine.clock import Clock

from txengine.testing.sandbox import BadRequest, Sandbox, SandboxRequest, SandboxResponse, route
from .driver import (
    ASSUMED_ERROR_STATUS,
    DEV_BASE_URL,
    ASSUMED_METHOD,
    BENEFITS_FIELD,
    IDEMPOTENCY_FIELD,
    MEMBER_DETAILS_PATH,
    MEMBER_KEY_FIELD,
    MEMBER_NOT_FOUND,
    PAYMENT_PATH,
    PHONE_FIELD,
    SUBMIT_CONFIRMATION_FIELD,
    TRANSACTION_CANCEL_SHAPE,
    TRANSACTION_PATH,
    WALLETS,
    RekonectDriver,
)

DEFAULT_API_KEY = "rk-sandbox-api-key"
REQUIRED_HEADERS = ("x-source-type", "x-source-name", "x-pos-id", "x-branch-id")
ASSET_FILTERS = ("active", "inactive", "all")
# ASSUMED codes for errors the docs do not number (the documented ones are 407 and 522)
UNAUTHORIZED, BAD_REQUEST, NOT_FOUND = "401", "400", "404"
INSUFFICIENT_BALANCE, ASSET_ALREADY_USED = "407", "522"

#: the docs' example members (bade-docs.netlify.app member-details and payment pages)
DOCS_MEMBER_PHONE = "530229344"
DOCS_MEMBER_KEY = "0fe31b8b-5ad5-48af-81e9-4adc7d596042"
DOCS_PAYER_PHONE = "5511122233"
DEMO_DEAL = "10% off pastries"
NEW_CUSTOMER_POINTS, NEW_CUSTOMER_CREDIT = 5000, 2000

_NAMESPACE = uuid.UUID("6f1c1b1e-0b7e-4c55-9d2a-5e3f3c1a7b00")


def _phone(value: str) -> str:
    return re.sub(r"[\s\-().]", "", value)


@attrs.frozen
class Balance:
    points: int
    credit: int

    @property
    def total(self) -> int:
        """What the member can spend, in minor units (one per point, one per credit)."""
        return self.points + self.credit


@attrs.define
class Member:
    phone_number: str
    membership_key: str
    first_name: str
    last_name: str
    points: int
    credit: int
    status: str = "active"

    @property
    def balance(self) -> Balance:
        return Balance(points=self.points, credit=self.credit)


@attrs.define
class Asset:
    """A one-time gift: ``amount_off`` minor units or ``percent_off`` of eligible lines."""

    key: str
    code: str
    name: str
    member_key: str
    amount_off: int = 0
    percent_off: int = 0
    product_codes: frozenset[str] | None = None
    valid_until: datetime | None = None
    used_by: str | None = None  # the transactionId of the purchase that consumed it

    def status(self, at: datetime) -> str:
        if self.used_by is not None:
            return "used"
        if self.valid_until is not None and at >= self.valid_until:
            return "expired"
        return "active"


@attrs.define
class Deal:
    key: str
    name: str
    amount_off: int = 0
    percent_off: int = 0
    product_codes: frozenset[str] | None = None
    min_total: int = 0


@attrs.define
class Payment:
    confirmation_code: str
    member_key: str
    transaction_id: str
    amount: int
    drawn: dict[str, int]
    balance_after: Balance
    status: str = "paid"  # paid, cancelled


@attrs.define
class Purchase:
    """One recorded purchase in the ledger (members and non-members alike)."""

    transaction_id: str
    confirmation_code: str
    member_key: str | None
    body: dict[str, Any]
    used_assets: list[str]
    points_awarded: int = 0
    status: str = "recorded"  # recorded, cancelled
    submissions: int = 1


Rule = Asset | Deal


class Refused(BadRequest):
    """A refusal that names the request field at fault (the envelope's ``path``)."""

    def __init__(self, message: str, status: int, code: str, path: str) -> None:
        super().__init__(message, status, code)
        self.path = path


def _pointing_at_the_field(handler):
    @functools.wraps(handler)
    def answer(self, request: SandboxRequest) -> SandboxResponse:
        try:
            return handler(self, request)
        except Refused as refused:
            return self.error(refused.status, refused.code, str(refused), path=refused.path)
    return answer


class RekonectSandbox(Sandbox):
    """Rekonect's POS API with real wallets, gifts, deals, payments and a purchase ledger."""

    name = "rekonect"
    host = DEV_BASE_URL.removeprefix("https://")
    api_key = DEFAULT_API_KEY

    def __init__(
        self, clock: Clock | None = None, *, api_key: str = DEFAULT_API_KEY, earn_points_per_100: int = 0,
        payment_asset: str = "points", submit_answers_code: bool = False,
    ) -> None:
        super().__init__(clock)
        if payment_asset not in WALLETS:
            raise ValueError(f"payment_asset must be one of {WALLETS}")
        self.api_key = api_key
        self.earn_points_per_100 = earn_points_per_100
        #: the business configuration: the one wallet a ``pay`` draws
        self.payment_asset = payment_asset
        #: the seed documents the submit's answer as ``data: {}``; True adds the
        #: ``confirmationCode`` that the cancel flow says the answer carries
        self.submit_answers_code = submit_answers_code
        self.members: dict[str, Member] = {}  # by membershipKey
        self.assets: dict[str, Asset] = {}
        self.deals: dict[str, Deal] = {}
        self.payments: dict[str, Payment] = {}  # by confirmation code
        self.purchases: dict[str, Purchase] = {}  # by transactionId
        self.opening_balances: dict[str, Balance] = {}  # by phone number
        self._ids = itertools.count(1)

    # --- set-up and inspection, for tests and the demo ---

    def _new_id(self, kind: str) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{kind}-{next(self._ids)}"))

    def add_member(
        self, phone_number: str, *, points: int = 0, credit: int = 0,
        first_name: str = "Test", last_name: str = "Member", status: str = "active",
        membership_key: str | None = None,
    ) -> Member:
        member = Member(
            phone_number=_phone(phone_number), membership_key=membership_key or self._new_id("member"),
            first_name=first_name, last_name=last_name, points=points, credit=credit, status=status,
        )
        self.members[member.membership_key] = member
        self.opening_balances[member.phone_number] = member.balance
        return member

    def add_asset(
        self, phone_number: str, code: str, *, name: str | None = None, amount_off: int = 0,
        percent_off: int = 0, product_codes: set[str] | None = None,
        valid_until: datetime | None = None, key: str | None = None,
    ) -> Asset:
        asset = Asset(
            key=key or self._new_id("asset"), code=code, name=name or code,
            member_key=self.member(phone_number).membership_key, amount_off=amount_off,
            percent_off=percent_off,
            product_codes=frozenset(product_codes) if product_codes is not None else None,
            valid_until=valid_until,
        )
        self.assets[asset.key] = asset
        return asset

    def add_deal(
        self, name: str, *, amount_off: int = 0, percent_off: int = 0,
        product_codes: set[str] | None = None, min_total: int = 0, key: str | None = None,
    ) -> Deal:
        deal = Deal(
            key=key or f"deal-{len(self.deals) + 1}", name=name, amount_off=amount_off,
            percent_off=percent_off,
            product_codes=frozenset(product_codes) if product_codes is not None else None,
            min_total=min_total,
        )
        self.deals[deal.key] = deal
        return deal

    def seed_demo(self) -> list[dict[str, str]]:
        """The docs' example members, plus a gift and a deal; safe to call twice.

        ``530229344`` and its membership key are the member-details example's John Doe;
        ``5511122233`` holds the 2000 points the payment example draws 300 from.
        """
        if not self._has_member(DOCS_MEMBER_PHONE):
            self.add_member(DOCS_MEMBER_PHONE, points=1000, first_name="John", last_name="Doe",
                            membership_key=DOCS_MEMBER_KEY)
        if not self._has_member(DOCS_PAYER_PHONE):
            self.add_member(DOCS_PAYER_PHONE, points=2000, credit=0, first_name="Dana")
            self.add_asset(DOCS_PAYER_PHONE, "FREECOFFEE", name="Free coffee", amount_off=350,
                           product_codes={"COFFEE"})
        if not any(deal.name == DEMO_DEAL for deal in self.deals.values()):
            self.add_deal(DEMO_DEAL, percent_off=10, product_codes={"PASTRY"})
        return [
            self._customer(DOCS_MEMBER_PHONE, "John Doe, the docs' member-details example"),
            self._customer(DOCS_MEMBER_KEY, "John Doe again, by his membership key"),
            self._customer(DOCS_PAYER_PHONE, "the docs' payment example member, with a free-coffee gift"),
        ]

    def credentials(self) -> dict[str, str]:
        """The driver's keyword arguments (besides ``base_url``) for this sandbox."""
        return {
            "api_key": self.api_key,
            "source_type": "POS",
            "source_name": "txengine-sandbox",
            "pos_id": "POS-1",
            "branch_id": "BR-1",
            "payment_asset": self.payment_asset,
        }

    def issue_customer(self) -> dict[str, str]:
        """A new member with funded wallets, ready for a sale."""
        phone = next(
            candidate for candidate in (f"555{n:07d}" for n in itertools.count(len(self.members) + 1))
            if not self._has_member(candidate)
        )
        self.add_member(phone, points=NEW_CUSTOMER_POINTS, credit=NEW_CUSTOMER_CREDIT, first_name="New")
        return self._customer(phone, "a new member")

    def _has_member(self, phone_number: str) -> bool:
        wanted = _phone(phone_number)
        return any(member.phone_number == wanted for member in self.members.values())

    def _customer(self, token: str, who: str) -> dict[str, str]:
        member = self.members.get(token) or self.member(token)  # a membership key or a phone
        wallets = f"{member.points} points, {member.credit} credit"
        return {"customer_token": token,
                "description": f"{who}: {wallets}; payments draw {self.payment_asset}"}

    def member(self, phone_number: str) -> Member:
        wanted = _phone(phone_number)
        for member in self.members.values():
            if member.phone_number == wanted:
                return member
        raise KeyError(f"no member with phone number {phone_number!r}")

    def balance(self, phone_number: str) -> Balance:
        return self.member(phone_number).balance

    def submissions(self, transaction_id: str) -> int:
        purchase = self.purchases.get(transaction_id)
        return purchase.submissions if purchase else 0

    def recorded(self) -> list[Purchase]:
        """Purchases recorded and not cancelled."""
        return [p for p in self.purchases.values() if p.status == "recorded"]

    # --- envelope, authentication, strict input ---

    def error(self, status: int, code: str, message: str, **extra: Any) -> SandboxResponse:
        error = {"code": code, "message": message}
        if extra.get("path"):
            error["path"] = extra["path"]  # communication-format: where the request failed
        return SandboxResponse.json(status, {"status": "error", "error": error})

    def refuse(self, code: str, message: str, status: int = ASSUMED_ERROR_STATUS) -> SandboxResponse:
        return self.error(status, code, message)

    @staticmethod
    def success(data: dict[str, Any]) -> SandboxResponse:
        return SandboxResponse.json(200, {"status": "success", "data": data})

    def authorize(self, request: SandboxRequest, operation: str) -> SandboxResponse | None:
        if request.header("x-api-key") != self.api_key:
            return self.refuse(UNAUTHORIZED, "Unauthorized: invalid API key", 401)
        for header in REQUIRED_HEADERS:
            if not request.header(header):
                return self.refuse(BAD_REQUEST, f"missing header {header}")
        return None

    def _body(self, request: SandboxRequest) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", 400, BAD_REQUEST)
        _refuse_empty(body, "body")
        return body

    def _member(self, body: dict[str, Any], *, required: bool = True) -> Member | None:
        given = body.get("member")
        if given is None and not required:
            return None
        if not isinstance(given, dict):
            raise BadRequest("member is required", 400, BAD_REQUEST)
        if PHONE_FIELD in given:
            try:
                return self.member(str(given[PHONE_FIELD]))
            except KeyError:
                raise Refused("Member not found", 404, MEMBER_NOT_FOUND, f"body.member.{PHONE_FIELD}") from None
        if MEMBER_KEY_FIELD in given:
            member = self.members.get(str(given[MEMBER_KEY_FIELD]))
            if member is None:
                raise Refused("Member not found", 404, MEMBER_NOT_FOUND, f"body.member.{MEMBER_KEY_FIELD}")
            return member
        raise BadRequest(f"member needs {PHONE_FIELD} or {MEMBER_KEY_FIELD}", 400, BAD_REQUEST)

    # --- /member/details ---

    @route(ASSUMED_METHOD, MEMBER_DETAILS_PATH, "member_details")
    @_pointing_at_the_field
    def member_details(self, request: SandboxRequest) -> SandboxResponse:
        body = self._body(request)
        member = self._member(body)
        which = request.header("x-return-assets") or "active"
        if which not in ASSET_FILTERS:
            raise BadRequest(f"x-return-assets must be one of {', '.join(ASSET_FILTERS)}", 400, BAD_REQUEST)
        benefits = request.header("x-return-benefits") or "false"
        if benefits not in ("true", "false"):
            raise BadRequest("x-return-benefits must be true or false", 400, BAD_REQUEST)
        now = self.clock.now()
        data: dict[str, Any] = {
            "member": {
                MEMBER_KEY_FIELD: member.membership_key,
                "firstName": member.first_name,
                "lastName": member.last_name,
                PHONE_FIELD: member.phone_number,
                "status": member.status,
                "points": member.points,
                "credit": member.credit,
            },
            "assets": [
                self._asset_view(asset, now)
                for asset in self.assets.values()
                if asset.member_key == member.membership_key
                and (which == "all" or (asset.status(now) == "active") == (which == "active"))
            ],
        }
        if benefits == "true":
            transaction = body.get("transaction")
            if not isinstance(transaction, dict):
                raise BadRequest("a benefits preview needs a transaction", 400, BAD_REQUEST)
            data[BENEFITS_FIELD] = self._benefits(member, transaction, body.get("usedAssets") or [], now)
        return self.success(data)

    @staticmethod
    def _asset_view(asset: Asset, now: datetime) -> dict[str, Any]:
        view = {"key": asset.key, "code": asset.code, "name": asset.name, "status": asset.status(now)}
        if asset.valid_until is not None:
            view["validUntil"] = asset.valid_until.strftime("%Y-%m-%dT%H:%M:%SZ")
        return view

    def _benefits(
        self, member: Member, transaction: dict[str, Any], offered: list[Any], at: datetime
    ) -> dict[str, Any]:
        _basket(transaction, "transaction")
        lines = _lines(transaction, PUBLIC_SHAPE)
        remaining = {line_id: gross for line_id, _, gross in lines}
        discounts = {line_id: 0 for line_id, _, _ in lines}
        deals = []
        for deal in self.deals.values():
            amount = _apply(deal, lines, remaining, discounts)
            if amount:
                deals.append({"key": deal.key, "name": deal.name, "appliedAmount": -amount})
        gifts = []
        for asset in self._usable_assets(member, offered):
            if asset.status(at) != "active":
                continue  # expired gifts earn nothing
            amount = _apply(asset, lines, remaining, discounts)
            if amount:
                gifts.append({"key": asset.key, "code": asset.code, "name": asset.name,
                              "appliedAmount": -amount})
        return {
            "totalDiscount": -sum(discounts.values()),
            "items": [{"lineId": line_id, "discountAmount": -d} for line_id, d in discounts.items()],
            "appliedDeals": deals,
            "usedAssets": gifts,
        }

    def _usable_assets(self, member: Member | None, references: list[Any]) -> list[Asset]:
        assets = [self._usable_asset(member, reference) for reference in references]
        if len({asset.key for asset in assets}) != len(assets):
            raise BadRequest("an asset can be used once per transaction", 400, BAD_REQUEST)
        return assets

    def _usable_asset(self, member: Member | None, reference: Any) -> Asset:
        if not isinstance(reference, dict) or "key" not in reference:
            raise BadRequest("each used asset needs a key", 400, BAD_REQUEST)
        asset = self.assets.get(str(reference["key"]))
        if asset is None or member is None or asset.member_key != member.membership_key:
            raise BadRequest("Asset not found for this member", 404, NOT_FOUND)
        if "code" in reference and reference["code"] != asset.code:
            raise BadRequest("asset code does not match its key", 400, BAD_REQUEST)
        if asset.used_by is not None:
            raise BadRequest("Used asset is already used.", ASSUMED_ERROR_STATUS, ASSET_ALREADY_USED)
        return asset

    # --- /payment ---

    @route(ASSUMED_METHOD, PAYMENT_PATH, "payment")
    @_pointing_at_the_field
    def payment(self, request: SandboxRequest) -> SandboxResponse:
        body = self._body(request)
        member = self._member(body)
        payment = body.get("payment")
        if not isinstance(payment, dict):
            raise BadRequest("payment is required", 400, BAD_REQUEST)
        action = payment.get("action")
        if action == "pay":
            return self._pay(member, payment, body.get("transaction"))
        if action == "cancel":
            return self._cancel_payment(member, payment)
        raise BadRequest("payment.action must be pay or cancel", 400, BAD_REQUEST)

    def _pay(self, member: Member, payment: dict[str, Any], transaction: Any) -> SandboxResponse:
        if not isinstance(transaction, dict) or not isinstance(transaction.get(IDEMPOTENCY_FIELD), str):
            raise BadRequest(f"a payment needs a transaction with a {IDEMPOTENCY_FIELD}", 400, BAD_REQUEST)
        _basket(transaction, "transaction")
        amount = payment.get("amount")
        if type(amount) is not int or amount <= 0:
            raise BadRequest("payment.amount must be a positive integer", 400, BAD_REQUEST)
        transaction_id = transaction[IDEMPOTENCY_FIELD]
        earlier = next((p for p in self.payments.values() if p.transaction_id == transaction_id), None)
        if earlier is not None:
            if earlier.amount != amount or earlier.member_key != member.membership_key:
                raise BadRequest(f"{IDEMPOTENCY_FIELD} {transaction_id} was paid with other details",
                                 ASSUMED_ERROR_STATUS, BAD_REQUEST)
            return self._payment_answer(earlier)
        # The business configuration picks the one wallet a payment draws (general-flow).
        wallet = self.payment_asset
        if getattr(member, wallet) < amount:
            return self.refuse(INSUFFICIENT_BALANCE,
                               f"{wallet}Balance balance for members is insufficient to process the payment!")
        setattr(member, wallet, getattr(member, wallet) - amount)
        drawn = {wallet: amount}
        record = Payment(
            confirmation_code=self._new_id("payment"), member_key=member.membership_key,
            transaction_id=transaction_id, amount=amount, drawn=drawn, balance_after=member.balance,
        )
        self.payments[record.confirmation_code] = record
        return self._payment_answer(record)

    def _cancel_payment(self, member: Member, payment: dict[str, Any]) -> SandboxResponse:
        record = self.payments.get(str(payment.get("confirmationCode")))
        if record is None or record.member_key != member.membership_key:
            raise BadRequest("Payment not found", 404, NOT_FOUND)
        if "amount" in payment and payment["amount"] != -record.amount:
            raise BadRequest("a cancel's amount must be minus the payment's amount", 400, BAD_REQUEST)
        if record.status == "paid":
            for wallet, amount in record.drawn.items():
                setattr(member, wallet, getattr(member, wallet) + amount)
            record.status = "cancelled"
        return self.success({"confirmationCode": record.confirmation_code,
                             "newBalance": attrs.asdict(member.balance)})

    def _payment_answer(self, record: Payment) -> SandboxResponse:
        return self.success({"confirmationCode": record.confirmation_code,
                             "newBalance": attrs.asdict(record.balance_after)})

    # --- /transaction ---

    @route(ASSUMED_METHOD, TRANSACTION_PATH, "transaction")
    @_pointing_at_the_field
    def transaction(self, request: SandboxRequest) -> SandboxResponse:
        body = self._body(request)
        container, field, cancel = TRANSACTION_CANCEL_SHAPE
        transaction = body.get(container)
        if not isinstance(transaction, dict):
            raise BadRequest("transaction is required", 400, BAD_REQUEST)
        if transaction.get(field) == cancel:
            return self._cancel_purchase(transaction)
        return self._submit(body, transaction)

    def _submit(self, body: dict[str, Any], transaction: dict[str, Any]) -> SandboxResponse:
        transaction_id = transaction.get(IDEMPOTENCY_FIELD)
        if not isinstance(transaction_id, str):
            raise BadRequest(f"transaction.{IDEMPOTENCY_FIELD} is required", 400, BAD_REQUEST)
        earlier = self.purchases.get(transaction_id)
        if earlier is not None:
            # Guaranteed delivery re-sends: record once, answer the same every time.
            earlier.submissions += 1
            return self._submit_answer(earlier)
        member = self._member(body, required=False)
        opened = _utc_time(transaction.get("openTime"), "transaction.openTime")
        _lines(transaction, SEED_SHAPE)
        total = transaction.get("totalAmount")
        if type(total) is not int or total < 0:
            raise BadRequest("transaction.totalAmount must be a non-negative integer", 400, BAD_REQUEST)
        tenders = transaction.get("meansOfPayment") or []
        if tenders and sum(_amount(t) for t in tenders) != total:
            raise BadRequest("meansOfPayment does not add up to totalAmount", 400, BAD_REQUEST)
        for deal in body.get("appliedDeals") or []:
            if not isinstance(deal, dict) or deal.get("key") not in self.deals:
                raise BadRequest("Deal not found", 404, NOT_FOUND)
        gifts = self._usable_assets(member, body.get("usedAssets") or [])
        for gift in gifts:
            if gift.status(opened) != "active":
                raise BadRequest(f"asset {gift.code} was not valid at the purchase time", 400, BAD_REQUEST)
        awarded = total // 100 * self.earn_points_per_100 if member is not None else 0
        purchase = Purchase(
            transaction_id=transaction_id, confirmation_code=self._new_id("purchase"),
            member_key=member.membership_key if member else None, body=body,
            used_assets=[gift.key for gift in gifts], points_awarded=awarded,
        )
        for gift in gifts:
            gift.used_by = transaction_id
        if member is not None:
            member.points += awarded
        self.purchases[transaction_id] = purchase
        return self._submit_answer(purchase)

    def _submit_answer(self, purchase: Purchase) -> SandboxResponse:
        if self.submit_answers_code:
            return self.success({SUBMIT_CONFIRMATION_FIELD: purchase.confirmation_code})
        return self.success({})  # the seed's documented answer

    def _cancel_purchase(self, transaction: dict[str, Any]) -> SandboxResponse:
        code = transaction.get("confirmationCode")
        purchase = next((p for p in self.purchases.values() if p.confirmation_code == code), None)
        if purchase is None:
            raise BadRequest("Transaction not found", 404, NOT_FOUND)
        if purchase.status == "recorded":
            purchase.status = "cancelled"
            if purchase.member_key is not None:
                self.members[purchase.member_key].points -= purchase.points_awarded
            for key in purchase.used_assets:
                self.assets[key].used_by = None
            # A loyalty payment made for this purchase stays paid: it has its own cancel.
        return self.success({SUBMIT_CONFIRMATION_FIELD: purchase.confirmation_code})


# --- pure helpers -------------------------------------------------------------------------------


def _refuse_empty(value: Any, where: str) -> None:
    if value is None or value == "" or value == {}:
        raise BadRequest(f"{where} is empty; do not send empty or null fields", 400, BAD_REQUEST)
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_empty(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_empty(item, f"{where}[{index}]")


def _utc_time(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be an ISO 8601 UTC time", 400, BAD_REQUEST)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{where} must be an ISO 8601 UTC time", 400, BAD_REQUEST) from None
    if moment.utcoffset() is None or moment.utcoffset().total_seconds() != 0:
        raise BadRequest(f"{where} must be in UTC", 400, BAD_REQUEST)
    return moment.astimezone(timezone.utc)


def _amount(tender: Any) -> int:
    if not isinstance(tender, dict) or type(tender.get("amount")) is not int or not tender.get("type"):
        raise BadRequest("each tender needs a type and an integer amount", 400, BAD_REQUEST)
    return tender["amount"]


#: ``/member/details`` and ``/payment`` (public pages): dateTime, subtotal/total, payments[]
PUBLIC_SHAPE = ("subtotal", "total")
#: ``/transaction`` (seed): openTime, grossAmount/netAmount, meansOfPayment[]
SEED_SHAPE = ("grossAmount", "netAmount")


def _basket(transaction: dict[str, Any], where: str) -> None:
    """The public pages' transaction: a UTC ``dateTime``; ``payments``, when sent, add up."""
    _utc_time(transaction.get("dateTime"), f"{where}.dateTime")
    if "openTime" in transaction or "meansOfPayment" in transaction:
        raise BadRequest(f"{where} uses the /transaction shape; this call takes dateTime and payments",
                         400, BAD_REQUEST)
    total = transaction.get("totalAmount")
    if type(total) is not int or total < 0:
        raise BadRequest(f"{where}.totalAmount must be a non-negative integer", 400, BAD_REQUEST)
    tenders = transaction.get("payments") or []
    if tenders and sum(_amount(t) for t in tenders) != total:
        raise BadRequest(f"{where}.payments does not add up to totalAmount", 400, BAD_REQUEST)


def _lines(transaction: dict[str, Any], shape: tuple[str, str]) -> list[tuple[str, str | None, int]]:
    """(lineId, code, gross amount) of each item, validated in the call's own shape."""
    gross_field, net_field = shape
    items = transaction.get("items")
    if not isinstance(items, list) or not items:
        raise BadRequest("transaction.items must be a non-empty list", 400, BAD_REQUEST)
    lines, seen = [], set()
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest("each item must be an object", 400, BAD_REQUEST)
        line_id, gross, quantity = item.get("lineId"), item.get(gross_field), item.get("quantity")
        if not isinstance(line_id, str) or line_id in seen:
            raise BadRequest("each item needs a unique lineId", 400, BAD_REQUEST)
        if type(gross) is not int or gross < 0 or type(quantity) is not int or quantity <= 0:
            raise BadRequest(f"each item needs a quantity and a non-negative {gross_field}", 400, BAD_REQUEST)
        if type(item.get(net_field)) is not int:
            raise BadRequest(f"each item needs an integer {net_field}", 400, BAD_REQUEST)
        if not isinstance(item.get("name"), str):
            raise BadRequest("each item needs a name", 400, BAD_REQUEST)
        seen.add(line_id)
        lines.append((line_id, item.get("code"), gross))
    return lines


def _apply(
    rule: Rule, lines: list[tuple[str, str | None, int]], remaining: dict[str, int],
    discounts: dict[str, int],
) -> int:
    """Discount the eligible lines' remaining amounts by ``rule``; return the total taken."""
    eligible = [
        line_id for line_id, code, _ in lines
        if rule.product_codes is None or code in rule.product_codes
    ]
    min_total = getattr(rule, "min_total", 0)
    if not eligible or sum(gross for line_id, _, gross in lines if line_id in eligible) < min_total:
        return 0
    taken = 0
    budget = rule.amount_off
    for line_id in eligible:
        if rule.percent_off:
            cut = remaining[line_id] * rule.percent_off // 100
        else:
            cut = min(budget, remaining[line_id])
            budget -= cut
        remaining[line_id] -= cut
        discounts[line_id] += cut
        taken += cut
    return taken


def rekonect_pair(
    clock: Clock, *, sandbox_options: dict[str, Any] | None = None, **driver_options: Any
) -> tuple[RekonectSandbox, RekonectDriver]:
    """A sandbox and a driver wired to it in-process: the tests' and the demo's usual set-up."""
    sandbox = RekonectSandbox(clock, **(sandbox_options or {}))
    options = {**sandbox.credentials(), "transport": sandbox.transport(), "environment": "sandbox",
               **driver_options}
    return sandbox, RekonectDriver(**options)
