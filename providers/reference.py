"""The reference provider: a small loyalty API for proving the core before the real four.

It has what the core needs exercising and nothing provider-specific: a wallet per
customer key, percentage discounts on eligible products, previews that expire, a refund
window, idempotent commits, a guaranteed "receipt" delivery after finalize, and every
fault from ``txengine.testing.sandbox.Fault``.

Wire protocol (JSON, integer minor units, header ``X-Api-Key`` on every call)::

    POST /previews                {customer, payment_type, currency, items[]}  Idempotency-Key
    POST /previews/{id}/items     {items[]}        -> the whole priced basket, deadline moved
    POST /previews/{id}/finalize                   -> deducts credits (once)
    POST /previews/{id}/cancel
    POST /previews/{id}/refund    {comment}        -> returns credits (once, within the window)
    POST /receipts                {transaction, total, credits}  Idempotency-Key

Errors are ``{"error": {"code", "message"}}`` with a 4xx status; 5xx means "unknown".

Fidelity note: this provider is ours; nothing here is assumed about a third party.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any

import attrs
import httpx

from txengine.answers import Answer
from txengine.clock import Clock
from txengine.drivers import Capabilities, Delivery, Exchange, HttpDriver, PreviewRequest
from txengine.errors import ValidationError
from txengine.machine import TimerPolicy
from txengine.models import LineItem, Outcome, PricedLine, Quote, Transaction
from txengine.money import Money
from txengine.secret import Secret

from txengine.testing.sandbox import BadRequest, Sandbox, SandboxRequest, SandboxResponse, route

HOST = "reference.sandbox.invalid"
TIMERS = TimerPolicy()


# --- the driver ---------------------------------------------------------------------------


class ReferenceDriver(HttpDriver):
    name = "reference"
    environments: Mapping[str, str] = {"sandbox": f"https://{HOST}"}
    capabilities = Capabilities(
        remote={"preview", "update", "finalize", "cancel", "refund"},
        local={"begin_payment"},
        deferred={"finalize": ("receipt",)},
        timers=TIMERS,
    )
    #: the HTTP call behind each remote event and deferred delivery (for the diagrams)
    calls: Mapping[str, str] = {
        "preview": "POST /previews",
        "update": "POST /previews/{id}/items",
        "finalize": "POST /previews/{id}/finalize",
        "cancel": "POST /previews/{id}/cancel",
        "refund": "POST /previews/{id}/refund",
        "receipt": "POST /receipts",
    }

    def __init__(self, *, api_key: str | Secret, **http) -> None:
        super().__init__(**http)
        self._api_key = Secret(api_key)

    def _post(self, path: str, body: Any = None, idempotency_key: str | None = None) -> httpx.Request:
        headers = {"X-Api-Key": self._api_key.reveal()}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self.request("POST", path, json=body or {}, headers=headers)

    # A success must prove itself (engine/answers.py): every 2xx answer is read through
    # ``Answer`` as the documented shape and checked against what was asked; anything
    # else is ProtocolError (the outcome is unknown, recover() asks again).

    def _answer(self, response: httpx.Response, where: str) -> Answer:
        if response.status_code >= 500:
            raise self.unknown(f"HTTP {response.status_code} from the provider")
        body = self.json_of(response)
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if not isinstance(error, dict) or "code" not in error:
                raise self.unknown(f"HTTP {response.status_code} without an error code")
            raise self.rejected(error["code"], error.get("message", ""))
        if not 200 <= response.status_code < 300:
            raise self.unknown(f"HTTP {response.status_code} is not a documented answer")
        answer = Answer(body, provider=self.name, where=f"reference {where}")
        if "error" in answer:
            raise answer.fail("an error envelope sent as a success")
        return answer

    def _view(self, response: httpx.Response, where: str, *, status: str, preview_id: str | None,
              lines: int | None = None) -> Answer:
        """A preview view: ``{id, status, expires_at, items[]}``, the expected id, status and line count."""
        answer = self._answer(response, where)
        if preview_id is not None:
            answer.expect("id", preview_id)
        else:
            answer.text("id")
        answer.expect("status", status)
        answer.text("expires_at")
        answer.array("items", length=lines)
        return answer

    def _quote(self, answer: Answer, currency: str, sent: tuple[LineItem, ...]) -> Quote:
        """The priced basket; its lines must be the ones sent (``sent`` is the answer's tail)."""
        priced = list(answer.objects("items"))
        for line, item in zip(priced[len(priced) - len(sent):], sent):
            answer_line_matches(line, item)
        try:
            lines = [
                PricedLine(
                    item=LineItem(
                        product_id=line.text("product_id", optional=True),
                        name=line.text("name"),
                        quantity=line.integer("quantity", minimum=1),
                        unit_price=Money(line.integer("unit_price", minimum=0), currency),
                        vat_percent=line.text("vat"),
                    ),
                    discount=Money(line.integer("discount", minimum=0), currency),
                    credits=Money(line.integer("credits", minimum=0), currency),
                    outstanding=Money(line.integer("outstanding", minimum=0), currency),
                )
                for line in priced
            ]
            return Quote(lines=lines, provider_ref=answer.text("id"))
        except ValidationError as broken:
            # a quote whose parts do not add up is not stored
            raise answer.fail(f"unusable quote: {broken}") from None

    @staticmethod
    def _items(items) -> list[dict[str, Any]]:
        return [
            {
                "product_id": item.product_id,
                "name": item.name,
                "quantity": item.quantity,
                "unit_price": item.unit_price.amount_minor,
                "vat": str(item.vat_percent),
            }
            for item in items
        ]

    def preview(self, request: PreviewRequest) -> Exchange[Quote]:
        body = {
            "customer": request.customer_token.reveal() if request.customer_token else None,
            "payment_type": request.payment_type,
            "currency": request.basket.currency,
            "items": self._items(request.basket.items),
        }
        response = yield self._post("/previews", body, request.idempotency_key)
        items = tuple(request.basket.items)
        answer = self._view(response, "preview", status="open", preview_id=None, lines=len(items))
        return self._quote(answer, request.basket.currency, items)

    def update(self, tx: Transaction, items: tuple[LineItem, ...], key: str) -> Exchange[Quote]:
        response = yield self._post(f"/previews/{tx.provider_ref}/items", {"items": self._items(items)}, key)
        answer = self._view(response, "update", status="open", preview_id=tx.provider_ref,
                            lines=len(tx.items) + len(items))
        return self._quote(answer, tx.currency, tuple(items))

    def _commit(self, tx: Transaction, action: str, status: str, key: str, body: Any = None) -> Exchange[Outcome]:
        response = yield self._post(f"/previews/{tx.provider_ref}/{action}", body, key)
        if action == "cancel":
            # A cancel may end a transaction whose last update is in doubt: the provider's
            # basket then holds that update's lines after ours.  Nothing moves on a cancel,
            # so the answer proves itself by its id, its status and our lines leading it.
            answer = self._view(response, action, status=status, preview_id=tx.provider_ref)
            answered = list(answer.objects("items"))
            if len(answered) < len(tx.items):
                raise answer.fail(f"items has {len(answered)} entries, fewer than the transaction's")
            for line, priced in zip(answered, tx.items):
                answer_line_matches(line, priced.item)
            return Outcome(provider_ref=tx.provider_ref, details={f"{action}_status": status})
        answer = self._view(response, action, status=status, preview_id=tx.provider_ref, lines=len(tx.items))
        credits = sum(line.integer("credits", minimum=0) for line in answer.objects("items"))
        if credits != tx.total_credits.amount_minor:
            raise answer.fail("items' credits do not add up to the transaction's")
        return Outcome(provider_ref=tx.provider_ref, details={f"{action}_status": status})

    def finalize(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        return (yield from self._commit(tx, "finalize", "finalized", key))

    def cancel(self, tx: Transaction, key: str) -> Exchange[Outcome]:
        return (yield from self._commit(tx, "cancel", "cancelled", key))

    def refund(self, tx: Transaction, key: str, comment: str | None) -> Exchange[Outcome]:
        return (yield from self._commit(tx, "refund", "refunded", key, {"comment": comment}))

    def delivery_payload(self, kind: str, tx: Transaction) -> Mapping[str, Any]:
        return {
            "transaction": tx.provider_ref,
            "total": tx.gross.amount_minor,
            "credits": tx.total_credits.amount_minor,
        }

    def deliver(self, deliveries: tuple[Delivery, ...]) -> Exchange[None]:
        for delivery in deliveries:
            response = yield self._post("/receipts", dict(delivery.payload), delivery.idempotency_key)
            self._answer(response, "receipt").expect("received", delivery.payload["transaction"])


def answer_line_matches(line: Answer, item: LineItem) -> None:
    """A priced line is the item that was sent: same product, name, quantity and price."""
    line.expect("product_id", item.product_id)
    line.expect("name", item.name)
    line.expect("quantity", item.quantity)
    line.expect("unit_price", item.unit_price.amount_minor)


# --- the sandbox ----------------------------------------------------------------------------


@attrs.define
class _Preview:
    id: str
    customer: str | None
    currency: str
    lines: list[dict[str, Any]]
    expires_at: Any
    status: str = "open"  # open, finalized, cancelled, refunded
    finalized_at: Any = None


class ReferenceSandbox(Sandbox):
    """Wallets, discounts, expiring previews and a receipt ledger."""

    name = "reference"
    host = HOST
    api_key = "ref-test-key"

    def __init__(self, clock: Clock | None = None, *, timers: TimerPolicy = TIMERS) -> None:
        super().__init__(clock)
        self.timers = timers
        self.wallets: dict[str, int] = {}
        self.opening_balances: dict[str, int] = {}
        self.discounts: dict[str, int] = {}  # product_id -> percent
        self.previews: dict[str, _Preview] = {}
        self.receipts: dict[str, int] = {}  # transaction -> times delivered
        self.commits: list[tuple[str, str]] = []  # (preview id, action) that changed money
        self._replays: dict[str, SandboxResponse] = {}
        self._ids = itertools.count(1)
        self._customers = itertools.count(0xC0FFEE << 96)  # issued keys: distinct from the demo's

    # --- set-up and inspection, for tests and the demo ---

    def open_wallet(self, customer: str, balance: int) -> None:
        self.wallets[customer] = balance
        self.opening_balances[customer] = balance

    def set_discount(self, product_id: str, percent: int) -> None:
        self.discounts[product_id] = percent

    def balance(self, customer: str) -> int:
        return self.wallets[customer]

    #: the demo customers: customer key -> opening balance (minor units); beer is 40 % off
    DEMO_CUSTOMERS = {"5ccd7850844b415091071c027930101f": 800, "9f2c1d7e3b6a4c5d8e0f1a2b3c4d5e6f": 100_000}

    def seed_demo(self) -> list[dict[str, str]]:
        """Two demo wallets and 40 % off ``beer``; calling it again changes nothing."""
        for customer, balance in self.DEMO_CUSTOMERS.items():
            if customer not in self.wallets:
                self.open_wallet(customer, balance)
        self.discounts.setdefault("beer", 40)
        return [{"customer": customer, "balance_minor": str(self.wallets[customer])}
                for customer in self.DEMO_CUSTOMERS]

    def credentials(self) -> dict[str, str]:
        """The driver's keyword arguments (besides ``base_url``/``environment``)."""
        return {"api_key": self.api_key}

    def issue_customer(self) -> dict[str, str]:
        """A new customer key with a 100.00 wallet (any currency: balances are minor units)."""
        with self.lock:
            customer = f"{next(self._customers):032x}"
            self.open_wallet(customer, 10_000)
        return {"customer": customer, "balance_minor": "10000"}

    # --- protocol ---

    def error(self, status: int, code: str, message: str, **extra: Any) -> SandboxResponse:
        return SandboxResponse.json(status, {"error": {"code": code, "message": message}})

    def authorize(self, request: SandboxRequest, operation: str) -> SandboxResponse | None:
        if request.header("x-api-key") != self.api_key:
            return self.error(401, "UNAUTHORIZED", "unknown API key")
        return None

    def _replayed(self, request: SandboxRequest, operation: str, produce) -> SandboxResponse:
        key = request.header("idempotency-key")
        if key and (operation, key) in self._replays:
            return self._replays[(operation, key)]
        response = produce()
        if key and response.status < 500:
            self._replays[(operation, key)] = response
        return response

    def _priced(self, items: list[dict[str, Any]], customer: str | None, discounted: bool) -> list[dict[str, Any]]:
        available = self.wallets.get(customer, 0) if customer else 0
        lines = []
        for item in items:
            try:
                gross = int(item["unit_price"]) * int(item["quantity"])
                Decimal(str(item["vat"]))
                name = str(item["name"])
            except (KeyError, TypeError, ValueError, ArithmeticError):
                raise BadRequest("each item needs name, quantity, unit_price and vat") from None
            percent = self.discounts.get(item.get("product_id"), 0) if discounted else 0
            discount = gross * percent // 100
            credits = min(available, gross - discount) if discounted else 0
            available -= credits
            lines.append({**item, "name": name, "discount": discount, "credits": credits,
                          "outstanding": gross - discount - credits})
        return lines

    def _view(self, preview: _Preview) -> SandboxResponse:
        return SandboxResponse.json(200, {"id": preview.id, "status": preview.status,
                                          "expires_at": preview.expires_at.isoformat(),
                                          "items": preview.lines})

    def _open(self, preview_id: str) -> _Preview:
        preview = self.previews.get(preview_id)
        if preview is None:
            raise BadRequest(f"no preview {preview_id}", 404, "NOT_FOUND")
        return preview

    @route("POST", "/previews", "preview")
    def create_preview(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            body = request.json()
            customer = body.get("customer")
            if customer is not None and customer not in self.wallets:
                return self.error(404, "UNKNOWN_CUSTOMER", "this customer key is not enrolled")
            items = body.get("items")
            if not isinstance(items, list) or not items:
                raise BadRequest("items must be a non-empty list")
            preview = _Preview(
                id=f"pv_{next(self._ids)}", customer=customer, currency=body.get("currency"),
                lines=self._priced(items, customer, discounted=True),
                expires_at=self.clock.now() + self.timers.preview_ttl,
            )
            self.previews[preview.id] = preview
            return self._view(preview)

        return self._replayed(request, "preview", produce)

    @route("POST", "/previews/{preview_id}/items", "update")
    def add_items(self, request: SandboxRequest, preview_id: str) -> SandboxResponse:
        preview = self._open(preview_id)
        if preview.status != "open":
            return self.error(409, "NOT_OPEN", f"the preview is {preview.status}")
        if self.clock.now() >= preview.expires_at:
            return self.error(410, "PREVIEW_EXPIRED", "the preview has expired")

        def produce() -> SandboxResponse:
            preview.lines.extend(self._priced(request.json().get("items") or [], None, discounted=False))
            preview.expires_at += self.timers.update_extension
            return self._view(preview)

        return self._replayed(request, "update", produce)

    @route("POST", "/previews/{preview_id}/finalize", "finalize")
    def finalize(self, request: SandboxRequest, preview_id: str) -> SandboxResponse:
        preview = self._open(preview_id)
        if preview.status == "finalized":
            return self._view(preview)  # idempotent: a retry learns the same answer
        if preview.status != "open":
            return self.error(409, "NOT_OPEN", f"the preview is {preview.status}")
        if self.clock.now() >= preview.expires_at:
            return self.error(410, "PREVIEW_EXPIRED", "the preview has expired")
        credits = sum(line["credits"] for line in preview.lines)
        if credits and self.wallets.get(preview.customer, 0) < credits:
            return self.error(409, "INSUFFICIENT_CREDIT", "the wallet no longer covers these credits")
        if credits:
            self.wallets[preview.customer] -= credits
        preview.status, preview.finalized_at = "finalized", self.clock.now()
        self.commits.append((preview.id, "finalize"))
        return self._view(preview)

    @route("POST", "/previews/{preview_id}/cancel", "cancel")
    def cancel(self, request: SandboxRequest, preview_id: str) -> SandboxResponse:
        preview = self._open(preview_id)
        if preview.status in ("finalized", "refunded"):
            return self.error(409, "ALREADY_FINALIZED", "a finalized preview is refunded, not cancelled")
        preview.status = "cancelled"
        return self._view(preview)

    @route("POST", "/previews/{preview_id}/refund", "refund")
    def refund(self, request: SandboxRequest, preview_id: str) -> SandboxResponse:
        preview = self._open(preview_id)
        if preview.status == "refunded":
            return self._view(preview)
        if preview.status != "finalized":
            return self.error(409, "NOT_FINALIZED", f"the preview is {preview.status}")
        if self.clock.now() >= preview.finalized_at + self.timers.refund_window:
            return self.error(409, "REFUND_WINDOW_CLOSED", "refunds are only possible for 24 hours")
        credits = sum(line["credits"] for line in preview.lines)
        if credits:
            self.wallets[preview.customer] += credits
        preview.status = "refunded"
        self.commits.append((preview.id, "refund"))
        return self._view(preview)

    @route("POST", "/receipts", "receipt")
    def receipt(self, request: SandboxRequest) -> SandboxResponse:
        def produce() -> SandboxResponse:
            transaction = request.json().get("transaction")
            if transaction not in self.previews:
                raise BadRequest(f"no transaction {transaction}", 404, "NOT_FOUND")
            self.receipts[transaction] = self.receipts.get(transaction, 0) + 1
            return SandboxResponse.json(200, {"received": transaction})

        return self._replayed(request, "receipt", produce)


def reference_pair(clock: Clock, *, timeout: timedelta | None = None) -> tuple[ReferenceSandbox, ReferenceDriver]:
    """A sandbox and a driver wired to it in-process: the core tests' usual set-up."""
    sandbox = ReferenceSandbox(clock)
    driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    return sandbox, driver
