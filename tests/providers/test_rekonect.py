"""Rekonect driver against its sandbox: wire format, errors, faults, sandbox rules, transports
and secrets.  Engine-level sessions are in ``test_rekonect_engine.py``."""

from __future__ import annotations

import json
from datetime import timedelta

import attrs
import httpx
import pytest

from txengine.drivers import Delivery, PreviewRequest
from txengine.errors import OutcomeUnknown, ProtocolError, ProviderRejected, ValidationError
from txengine.machine import TimerPolicy
from txengine.models import Basket, LineItem, Quote, Transaction
from txengine.money import Money
from txengine.secret import Secret
from txengine.providers.rekonect import RekonectDriver, RekonectSandbox
from txengine.providers.rekonect import driver as policy
from txengine.testing.sandbox import Fault, serve

PHONE = "5511122233"
API_HEADERS = ("x-api-key", "x-source-type", "x-source-name", "x-pos-id", "x-branch-id")
UNKNOWN_FAULTS = [
    Fault.TIMEOUT_BEFORE_COMMIT, Fault.TIMEOUT_AFTER_COMMIT, Fault.SERVER_ERROR,
    Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT, Fault.DROP_CONNECTION,
]
AFTER_COMMIT = {Fault.TIMEOUT_AFTER_COMMIT, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT}


# --- set-up --------------------------------------------------------------------------------------


@pytest.fixture
def sandbox(clock) -> RekonectSandbox:
    sandbox = RekonectSandbox(clock, submit_answers_code=True)
    sandbox.add_member(PHONE, points=1500, credit=0)
    sandbox.add_asset(PHONE, "FREECOFFEE", name="Free coffee", amount_off=350, product_codes={"COFFEE"})
    sandbox.add_deal("10% off pastries", percent_off=10, product_codes={"PASTRY"})
    return sandbox


def make_driver(sandbox: RekonectSandbox, **options) -> RekonectDriver:
    options.setdefault("transport", sandbox.transport())
    options.setdefault("environment", "sandbox")
    return RekonectDriver(api_key=sandbox.api_key, source_type="POS", source_name="till-app",
                          pos_id="POS-7", branch_id="BR-3", **options)


@pytest.fixture
def driver(sandbox) -> RekonectDriver:
    return make_driver(sandbox)


def basket() -> Basket:
    return Basket([
        LineItem("COFFEE", "Flat white", 1, Money(350, "EUR"), 10),
        LineItem("PASTRY", "Croissant", 2, Money(250, "EUR"), 10),
        LineItem(None, "Sparkling water", 1, Money(2000, "EUR"), 20),
    ])


def preview_request(clock, token: str | None = PHONE, payment_type="SPLIT_PAYMENT", tx_id="tx-1",
                    items: Basket | None = None) -> PreviewRequest:
    return PreviewRequest(tx_id, items or basket(), Secret(token) if token else None, payment_type,
                          f"key-{tx_id}", clock.now())


def as_transaction(quote: Quote, clock, tx_id="tx-1") -> Transaction:
    """The snapshot the engine would hand the driver after this preview."""
    now = clock.now()
    return Transaction(id=tx_id, provider="rekonect", state="payment_pending", items=quote.lines,
                       currency="EUR", payment_type="SPLIT_PAYMENT", expires_at=now + timedelta(minutes=10),
                       details=quote.details, created_at=now, updated_at=now)


def finalized(tx: Transaction, outcome) -> Transaction:
    return attrs.evolve(tx, state="finalized", details={**tx.details, **outcome.details},
                        provider_ref=outcome.provider_ref or tx.provider_ref)


def previewed(driver, clock, **request) -> Transaction:
    request = preview_request(clock, **request)
    return as_transaction(driver.run(driver.preview(request)), clock, request.tx_id)


def submit_delivery(driver, tx: Transaction) -> Delivery:
    payload = json.loads(json.dumps(driver.delivery_payload("submit", tx)))  # as stored
    return Delivery(id=1, tx_id=tx.id, provider="rekonect", kind="submit", payload=payload,
                    idempotency_key=f"{tx.id}:submit")


def bodies(sandbox, path: str | None = None) -> list[dict]:
    return [json.loads(r.body) for r in sandbox.requests if path is None or r.path == path]


def assert_nothing_empty(value, where="body") -> None:
    assert value is not None and value != "" and value != [] and value != {}, f"{where} is empty"
    if isinstance(value, dict):
        for key, item in value.items():
            assert_nothing_empty(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_nothing_empty(item, f"{where}[{index}]")


def full_session(driver, sandbox, clock):
    """Preview, pay, submit, refund: every call the driver makes for a member."""
    tx = previewed(driver, clock)
    tx = finalized(tx, driver.run(driver.finalize(tx, "fin-1")))
    driver.run(driver.deliver((submit_delivery(driver, tx),)))
    driver.run(driver.refund(tx, "ref-1", "changed their mind"))
    return tx


# --- wire format ---------------------------------------------------------------------------------


class TestWire:
    def test_every_call_is_a_post_with_the_five_headers(self, driver, sandbox, clock):
        full_session(driver, sandbox, clock)
        paths = [r.path for r in sandbox.requests]
        assert paths == ["/v1/member/details", "/v1/member/details", "/v1/payment",
                         "/v1/transaction", "/v1/transaction", "/v1/transaction", "/v1/payment"]
        for request in sandbox.requests:
            assert request.method == policy.ASSUMED_METHOD == "POST"
            assert {h: request.header(h) for h in API_HEADERS} == {
                "x-api-key": sandbox.api_key, "x-source-type": "POS", "x-source-name": "till-app",
                "x-pos-id": "POS-7", "x-branch-id": "BR-3",
            }
            assert request.header("content-type") == "application/json"
        identify, benefits = sandbox.requests[:2]
        assert identify.header("x-return-assets") == "active"
        assert identify.header("x-return-benefits") is None
        assert benefits.header("x-return-benefits") == "true"
        assert all(r.header("x-return-benefits") is None for r in sandbox.requests[2:])

    def test_no_call_sends_an_empty_or_null_field(self, driver, sandbox, clock):
        full_session(driver, sandbox, clock)
        # A product without a code, no tags, no employee: all omitted rather than empty.
        for body in bodies(sandbox):
            assert_nothing_empty(body)
        for item in bodies(sandbox)[1]["transaction"]["items"]:
            assert "tags" not in item

    def test_preview_identifies_then_asks_for_benefits_with_the_draft_basket(self, driver, sandbox, clock):
        driver.run(driver.preview(preview_request(clock)))
        identify, benefits = bodies(sandbox)
        assert identify == {"member": {"phoneNumber": PHONE}}
        gift = next(iter(sandbox.assets.values()))
        assert benefits == {
            "member": {"phoneNumber": PHONE},
            # the public member-details page's transaction: dateTime, subtotal/total
            "transaction": {
                "transactionId": "tx-1",
                "dateTime": "2026-01-15T10:00:00Z",
                "totalAmount": 2850,
                "items": [
                    {"lineId": "1", "code": "COFFEE", "name": "Flat white", "quantity": 1,
                     "subtotal": 350, "total": 350},
                    {"lineId": "2", "code": "PASTRY", "name": "Croissant", "quantity": 2,
                     "subtotal": 500, "total": 500},
                    {"lineId": "3", "name": "Sparkling water", "quantity": 1,
                     "subtotal": 2000, "total": 2000},
                ],
            },
            "usedAssets": [{"key": gift.key, "code": "FREECOFFEE"}],
        }

    def test_a_membership_key_token_identifies_by_membership_key(self, driver, sandbox, clock):
        key = sandbox.member(PHONE).membership_key
        driver.run(driver.preview(preview_request(clock, token=key.upper())))
        assert bodies(sandbox)[0] == {"member": {"membershipKey": key}}

    def test_a_phone_number_is_sent_without_separators(self, driver, sandbox, clock):
        driver.run(driver.preview(preview_request(clock, token=" 551-112 (22) 33 ")))
        assert bodies(sandbox)[0] == {"member": {"phoneNumber": PHONE}}

    def test_benefits_become_line_discounts_then_points_cover_the_rest(self, driver, clock):
        quote = driver.run(driver.preview(preview_request(clock)))
        priced = [(l.discount.amount_minor, l.credits.amount_minor, l.outstanding.amount_minor)
                  for l in quote.lines]
        # gift: 350 off the coffee; deal: 10% off pastries; 1500 points, line by line
        assert priced == [(350, 0, 0), (50, 450, 0), (0, 1050, 950)]
        assert quote.details["balance"] == {"credit": 0, "points": 1500}
        assert quote.details["loyalty_payment"] == {"credit": 0, "points": 1500}
        assert [(d["key"], d["appliedAmount"]) for d in quote.details["applied_deals"]] == [("deal-1", -50)]
        assert [(a["code"], a["appliedAmount"]) for a in quote.details["used_assets"]] == [("FREECOFFEE", -350)]
        assert [(r.name, r.value) for r in quote.receipt] == [
            ("10% off pastries", "-0.50 EUR"), ("Free coffee", "-3.50 EUR"),
            ("Paid with points", "-15.00 EUR"),
        ]

    def test_external_payment_keeps_the_benefits_and_uses_no_points(self, driver, sandbox, clock):
        tx = previewed(driver, clock, payment_type="EXTERNAL_PAYMENT")
        assert (tx.total_discount.amount_minor, tx.total_credits.amount_minor) == (400, 0)
        outcome = driver.run(driver.finalize(tx, "fin-1"))
        assert outcome.details == {"loyalty_paid": False}
        assert [r.path for r in sandbox.requests] == ["/v1/member/details"] * 2  # no payment call

    def test_pay_sends_the_member_key_the_amount_and_the_completed_purchase(self, driver, sandbox, clock):
        tx = previewed(driver, clock)
        outcome = driver.run(driver.finalize(tx, "fin-1"))
        member_key = sandbox.member(PHONE).membership_key
        assert bodies(sandbox, "/v1/payment") == [{
            "member": {"membershipKey": member_key},
            "payment": {"action": "pay", "amount": 1500},
            # the public payment page's transaction: dateTime, subtotal/total, payments[]
            "transaction": {
                "transactionId": "tx-1",
                "dateTime": "2026-01-15T10:00:00Z",
                "totalAmount": 2450,
                "items": [
                    {"lineId": "1", "code": "COFFEE", "name": "Flat white", "quantity": 1,
                     "subtotal": 350, "total": 0},
                    {"lineId": "2", "code": "PASTRY", "name": "Croissant", "quantity": 2,
                     "subtotal": 500, "total": 450},
                    {"lineId": "3", "name": "Sparkling water", "quantity": 1,
                     "subtotal": 2000, "total": 2000},
                ],
                "payments": [{"type": "POINTS", "amount": 1500}, {"type": "EXTERNAL", "amount": 950}],
            },
        }]
        code = next(iter(sandbox.payments))
        assert outcome.provider_ref == code
        assert outcome.details == {"loyalty_paid": True, "payment_confirmation_code": code,
                                   "balance": {"credit": 0, "points": 0}}
        assert [(r.name, r.value) for r in outcome.receipt] == [
            ("Paid with points", "15.00 EUR"), ("Points left", "0"), ("Credit left", "0.00 EUR")]

    def test_the_submit_body_is_the_seeds_shape_built_at_commit_time(self, driver, sandbox, clock):
        tx = previewed(driver, clock)
        tx = finalized(tx, driver.run(driver.finalize(tx, "fin-1")))
        payload = driver.delivery_payload("submit", tx)
        assert json.loads(json.dumps(payload)) == payload  # JSON-safe as stored
        gift = next(iter(sandbox.assets.values()))
        assert payload == {
            "member": {"membershipKey": sandbox.member(PHONE).membership_key},
            "transaction": {
                "transactionId": "tx-1",
                "openTime": "2026-01-15T10:00:00Z",
                "totalAmount": 2450,
                # VAT inside the net amounts: 0, 40.9 -> 41, 333.3 -> 333
                "totalTaxAmount": 374,
                "totalGeneralDiscount": 0,
                "items": [
                    {"lineId": "1", "code": "COFFEE", "name": "Flat white", "quantity": 1,
                     "grossAmount": 350, "netAmount": 0, "action": "sale"},
                    {"lineId": "2", "code": "PASTRY", "name": "Croissant", "quantity": 2,
                     "grossAmount": 500, "netAmount": 450, "action": "sale"},
                    {"lineId": "3", "name": "Sparkling water", "quantity": 1,
                     "grossAmount": 2000, "netAmount": 2000, "action": "sale"},
                ],
                "meansOfPayment": [{"type": "POINTS", "amount": 1500}, {"type": "EXTERNAL", "amount": 950}],
            },
            "usedAssets": [{"key": gift.key, "code": "FREECOFFEE", "appliedAmount": -350}],
            "appliedDeals": [{"key": "deal-1", "appliedAmount": -50}],
        }
        assert _paths(payload) - {"member.membershipKey"} <= _paths(SEED_SUBMIT_EXAMPLE)
        driver.run(driver.deliver((submit_delivery(driver, tx),)))
        assert bodies(sandbox, "/v1/transaction") == [payload]
        assert sandbox.purchases["tx-1"].status == "recorded"

    def test_refund_resubmits_cancels_the_purchase_and_cancels_the_payment(self, driver, sandbox, clock):
        tx = previewed(driver, clock)
        tx = finalized(tx, driver.run(driver.finalize(tx, "fin-1")))
        driver.run(driver.deliver((submit_delivery(driver, tx),)))
        sandbox.requests.clear()
        outcome = driver.run(driver.refund(tx, "ref-1", "returned"))
        purchase = sandbox.purchases["tx-1"]
        payment_code = tx.details["payment_confirmation_code"]
        assert bodies(sandbox) == [
            driver.delivery_payload("submit", tx),
            {"transaction": {"action": "cancel", "confirmationCode": purchase.confirmation_code}},
            {"member": {"membershipKey": sandbox.member(PHONE).membership_key},
             "payment": {"action": "cancel", "confirmationCode": payment_code, "amount": -1500}},
        ]
        assert [r.path for r in sandbox.requests] == ["/v1/transaction", "/v1/transaction", "/v1/payment"]
        assert outcome.details == {"purchase_confirmation_code": purchase.confirmation_code,
                                   "purchase_cancelled": True, "payment_cancelled": True,
                                   "balance": {"credit": 0, "points": 1500}}
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]
        assert purchase.status == "cancelled" and sandbox.payments[payment_code].status == "cancelled"

    def test_sandbox_accepts_the_seeds_own_example(self, clock):
        sandbox = RekonectSandbox(clock, submit_answers_code=True)
        sandbox.add_member("1234567890")
        sandbox.add_asset("1234567890", "string", key="string")
        sandbox.add_deal("any", key="string")
        answer = _api_post(sandbox, "/v1/transaction", SEED_SUBMIT_EXAMPLE)
        assert answer.status_code == 200 and answer.json()["status"] == "success"
        assert sandbox.purchases["TX12345"].body == SEED_SUBMIT_EXAMPLE


def _paths(value, prefix="") -> set[str]:
    """Dotted field paths of a JSON value (list positions folded)."""
    if isinstance(value, dict):
        out = set()
        for key, item in value.items():
            here = f"{prefix}.{key}" if prefix else key
            out |= {here} | _paths(item, here)
        return out
    if isinstance(value, list):
        return set().union(*(_paths(item, prefix) for item in value)) if value else set()
    return set()


#: a /payment transaction in the public pages' shape, for direct sandbox calls
PAYMENT_BASKET = {
    "transactionId": "t", "dateTime": "2026-01-15T10:00:00Z", "totalAmount": 1000,
    "items": [{"lineId": "1", "name": "Thing", "quantity": 1, "subtotal": 1000, "total": 1000}],
}


SEED_SUBMIT_EXAMPLE = {
    "member": {"phoneNumber": "1234567890"},
    "transaction": {
        "transactionId": "TX12345", "openTime": "2025-05-23T12:00:00Z", "totalAmount": 5000,
        "totalTaxAmount": 800, "totalGeneralDiscount": 500, "orderType": "dineIn",
        "items": [
            {"lineId": "1", "code": "PLU123", "name": "Burger", "departmentCode": "FOOD",
             "departmentName": "Main Dishes", "quantity": 2, "grossAmount": 3000, "netAmount": 2500,
             "action": "sale", "tags": ["combo"]},
            {"lineId": "2", "code": "PLU124", "name": "Fries", "departmentCode": "FOOD",
             "departmentName": "Sides", "quantity": 1, "grossAmount": 2000, "netAmount": 1500,
             "action": "sale", "tags": []},
        ],
        "meansOfPayment": [{"type": "CASH", "amount": 4000}, {"type": "CARD", "amount": 1000}],
        "tags": ["delivery"], "employee": "Jane Doe",
    },
    "usedAssets": [{"key": "string", "code": "string", "appliedAmount": 0}],
    "appliedDeals": [{"key": "string", "appliedAmount": 0}],
}


# --- provider errors and unknown outcomes -------------------------------------------------------------


class TestErrors:
    def test_407_refuses_the_payment_with_a_cashier_message(self, driver, sandbox, clock):
        tx = previewed(driver, clock)
        sandbox.member(PHONE).points = 100  # spent at another till since the preview
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.finalize(tx, "fin-1"))
        assert refused.value.code == "407"
        assert refused.value.provider_message == policy.CASHIER_MESSAGES["407"]
        assert sandbox.balance(PHONE).total == 100 and not sandbox.payments

    def test_407_travels_with_the_assumed_error_status(self, driver, sandbox, clock):
        tx = previewed(driver, clock)
        sandbox.member(PHONE).points = 0
        with pytest.raises(ProviderRejected):
            driver.run(driver.finalize(tx, "fin-1"))
        assert policy.ASSUMED_ERROR_STATUS == 400
        answer = _api_post(sandbox, "/v1/payment", {
            "member": {"phoneNumber": PHONE}, "payment": {"action": "pay", "amount": 99999},
            "transaction": PAYMENT_BASKET})
        assert answer.status_code == policy.ASSUMED_ERROR_STATUS
        assert answer.json() == {"status": "error", "error": {
            "code": "407", "message": "pointsBalance balance for members is insufficient to process the payment!"}}

    def test_522_a_gift_used_at_another_till_parks_the_second_submit(self, driver, sandbox, clock):
        first = previewed(driver, clock, tx_id="tx-1", payment_type="EXTERNAL_PAYMENT")
        second = previewed(driver, clock, tx_id="tx-2", payment_type="EXTERNAL_PAYMENT")
        driver.run(driver.deliver((submit_delivery(driver, first),)))
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.deliver((submit_delivery(driver, second),)))
        assert refused.value.code == "522"
        assert refused.value.provider_message == policy.CASHIER_MESSAGES["522"]
        assert "tx-2" not in sandbox.purchases

    def test_522_when_the_benefits_preview_offers_a_used_gift(self, driver, sandbox, clock):
        gift = next(iter(sandbox.assets.values()))
        real = sandbox.transport()

        def gift_used_between_the_two_calls(request: httpx.Request) -> httpx.Response:
            response = real.handle_request(request)
            gift.used_by = "elsewhere"
            return response

        racing = make_driver(sandbox, transport=httpx.MockTransport(gift_used_between_the_two_calls))
        with pytest.raises(ProviderRejected) as refused:
            racing.run(racing.preview(preview_request(clock)))
        assert refused.value.code == "522"

    def test_an_unknown_member_is_refused_with_the_providers_code(self, driver, clock):
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.preview(preview_request(clock, token="5550000000")))
        # communication-format: {"code": "4001012", "message": "Member not found", "path": ...}
        assert refused.value.code == policy.MEMBER_NOT_FOUND == "4001012"
        assert refused.value.provider_message == policy.CASHIER_MESSAGES["4001012"]

    def test_a_wrong_api_key_is_refused(self, sandbox, clock):
        wrong = RekonectDriver(environment="sandbox", api_key="not-the-key", source_name="s", pos_id="p", branch_id="b",
                               transport=sandbox.transport())
        with pytest.raises(ProviderRejected) as refused:
            wrong.run(wrong.preview(preview_request(clock)))
        assert refused.value.code == "401"
        assert "not-the-key" not in str(refused.value)

    @pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda f: f.value)
    def test_pay_outcome_unknown_then_a_retry_charges_once(self, driver, sandbox, clock, fault):
        tx = previewed(driver, clock)
        sandbox.faults.inject("payment", fault)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.finalize(tx, "fin-1"))
        charged = sandbox.balance(PHONE).total
        assert charged == (0 if fault in AFTER_COMMIT else 1500)
        outcome = driver.run(driver.finalize(tx, "fin-1"))  # what recover() does
        assert sandbox.balance(PHONE).total == 0
        assert list(sandbox.payments) == [outcome.provider_ref]

    @pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda f: f.value)
    def test_submit_outcome_unknown_then_a_retry_records_once(self, driver, sandbox, clock, fault):
        tx = previewed(driver, clock, payment_type="EXTERNAL_PAYMENT")
        delivery = submit_delivery(driver, tx)
        sandbox.faults.inject("transaction", fault)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.deliver((delivery,)))
        driver.run(driver.deliver((delivery,)))
        assert list(sandbox.purchases) == ["tx-1"]
        assert sandbox.submissions("tx-1") == (2 if fault in AFTER_COMMIT else 1)
        assert next(iter(sandbox.assets.values())).used_by == "tx-1"

    @pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda f: f.value)
    def test_refund_outcome_unknown_then_a_retry_returns_points_once(self, driver, sandbox, clock, fault):
        tx = previewed(driver, clock)
        tx = finalized(tx, driver.run(driver.finalize(tx, "fin-1")))
        sandbox.faults.inject("payment", fault)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.refund(tx, "ref-1", None))
        driver.run(driver.refund(tx, "ref-1", None))
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]
        assert sandbox.purchases["tx-1"].status == "cancelled"

    def test_a_lost_member_lookup_is_asked_again_once(self, driver, sandbox, clock):
        sandbox.faults.inject("member_details", Fault.DROP_CONNECTION)
        quote = driver.run(driver.preview(preview_request(clock)))
        assert quote.details["member"] is True
        assert len(bodies(sandbox)) == 3

    @pytest.mark.parametrize("fault", [Fault.SERVER_ERROR, Fault.TIMEOUT_BEFORE_COMMIT],
                             ids=lambda f: f.value)
    def test_a_lookup_lost_twice_is_unknown(self, driver, sandbox, clock, fault):
        sandbox.faults.inject("member_details", fault, times=2)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.preview(preview_request(clock)))

    @pytest.mark.parametrize("status, body", [
        (200, {"status": "success"}),                                            # no data
        (200, {"status": "error", "error": {"message": "no code"}}),             # no code
        (200, {"data": {}}),                                                     # no status
        (404, "<html>Not Found</html>"),                                         # a proxy's page
        (502, {"status": "error", "error": {"code": "407", "message": "x"}}),    # 5xx: unknown
        (200, ["not", "an", "object"]),
    ])
    def test_answers_that_break_the_envelope_are_unknown(self, clock, status, body):
        broken = _answering(_respond(status, body))
        with pytest.raises(ProtocolError if status < 500 else OutcomeUnknown):
            broken.run(broken.preview(preview_request(clock)))

    @pytest.mark.parametrize("change", [
        lambda b: b.update(totalDiscount=-999),                                      # totals disagree
        lambda b: b["items"].__setitem__(0, {"lineId": "1", "discountAmount": -400}),  # beyond its price
        lambda b: b["items"].append({"lineId": "9", "discountAmount": 0}),          # unknown line
        lambda b: b["appliedDeals"][0].update(appliedAmount=50),                     # positive discount
        lambda b: b.pop("items"),                                                     # lines missing
    ])
    def test_benefits_that_do_not_add_up_are_unknown(self, clock, change):
        benefits = {"totalDiscount": -350,
                    "items": [{"lineId": "1", "discountAmount": -350}, {"lineId": "2", "discountAmount": 0},
                              {"lineId": "3", "discountAmount": 0}],
                    "appliedDeals": [{"key": "d", "name": "Deal", "appliedAmount": -350}], "usedAssets": []}
        change(benefits)
        member = {"membershipKey": "k", "points": 0, "credit": 0}
        broken = _answering(
            _respond(200, {"status": "success", "data": {"member": member, "assets": []}}),
            _respond(200, {"status": "success", "data": {"member": member, "benefits": benefits}}),
        )
        with pytest.raises(ProtocolError):
            broken.run(broken.preview(preview_request(clock)))

    def test_a_provider_message_never_echoes_the_customer_key(self, clock):
        echo = _answering(_respond(400, {"status": "error", "error": {
            "code": "410", "message": f"member {PHONE} is blocked"}}))
        with pytest.raises(ProviderRejected) as refused:
            echo.run(echo.preview(preview_request(clock, token="551 112 2233")))
        assert refused.value.code == "410"
        assert PHONE not in str(refused.value) and "member *** is blocked" in str(refused.value)


def _respond(status: int, body) -> httpx.Response:
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers={"content-type": "text/html"})
    return httpx.Response(status, json=body)


def _answering(*responses: httpx.Response) -> RekonectDriver:
    queue = list(responses)
    transport = httpx.MockTransport(lambda request: queue.pop(0) if len(queue) > 1 else queue[0])
    return RekonectDriver(environment="sandbox", api_key="k", source_name="s", pos_id="p", branch_id="b", transport=transport)


# --- the sandbox's business rules, over its own wire --------------------------------------------------


def _api_post(sandbox, path, body, api_key=None, **headers) -> httpx.Response:
    sent = {"x-api-key": api_key or sandbox.api_key, "x-source-type": "POS", "x-source-name": "tests",
            "x-pos-id": "P1", "x-branch-id": "B1", **{k.replace("_", "-"): v for k, v in headers.items()}}
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as client:
        return client.post(path, json=body, headers=sent)


def _pay(sandbox, amount, transaction_id="t-1", phone=PHONE) -> httpx.Response:
    return _api_post(sandbox, "/v1/payment", {
        "member": {"phoneNumber": phone}, "payment": {"action": "pay", "amount": amount},
        "transaction": {**PAYMENT_BASKET, "transactionId": transaction_id}})


def _submit(sandbox, transaction_id, *, assets=(), open_time="2026-01-15T10:00:00Z", amount=1000,
            phone=PHONE) -> httpx.Response:
    body = {
        "transaction": {"transactionId": transaction_id, "openTime": open_time, "totalAmount": amount,
                        "items": [{"lineId": "1", "name": "Thing", "quantity": 1, "grossAmount": amount,
                                   "netAmount": amount, "action": "sale"}],
                        "meansOfPayment": [{"type": "CASH", "amount": amount}]},
        "usedAssets": [{"key": a.key, "code": a.code, "appliedAmount": -1} for a in assets],
    }
    if phone:
        body["member"] = {"phoneNumber": phone}
    return _api_post(sandbox, "/v1/transaction", {k: v for k, v in body.items() if v})


def _error_code(answer: httpx.Response) -> str:
    assert answer.json()["status"] == "error"
    return answer.json()["error"]["code"]


class TestSandboxRules:
    def test_pay_draws_only_the_wallet_the_business_configured(self, sandbox, clock):
        sandbox.member(PHONE).credit = 300
        answer = _pay(sandbox, 500).json()
        assert answer["status"] == "success"
        assert answer["data"]["newBalance"] == {"points": 1000, "credit": 300}
        assert _error_code(_pay(sandbox, 1001, transaction_id="t-2")) == "407"  # credit never tops up points
        by_credit = RekonectSandbox(clock, payment_asset="credit")
        by_credit.add_member(PHONE, points=1500, credit=300)
        assert _error_code(_pay(by_credit, 500)) == "407"
        assert _pay(by_credit, 300, transaction_id="t-2").json()["data"]["newBalance"] == {"points": 1500, "credit": 0}

    def test_pay_beyond_the_balance_is_407_and_charges_nothing(self, sandbox):
        assert _error_code(_pay(sandbox, 1501)) == "407"
        assert sandbox.balance(PHONE).total == 1500

    def test_pay_is_idempotent_by_transaction_id(self, sandbox):
        first = _pay(sandbox, 700).json()["data"]
        again = _pay(sandbox, 700).json()["data"]
        assert again == first and sandbox.balance(PHONE).total == 800
        assert policy.IDEMPOTENCY_FIELD == "transactionId"
        assert _error_code(_pay(sandbox, 600)) == "400"  # same id, other amount
        assert _pay(sandbox, 600, transaction_id="t-2").json()["data"]["confirmationCode"] != first["confirmationCode"]

    def test_a_payment_cancel_restores_what_it_drew_once(self, sandbox):
        code = _pay(sandbox, 700).json()["data"]["confirmationCode"]
        cancel = {"member": {"phoneNumber": PHONE},
                  "payment": {"action": "cancel", "confirmationCode": code, "amount": -700}}
        for _ in range(2):
            answer = _api_post(sandbox, "/v1/payment", cancel).json()
            assert answer["data"] == {"confirmationCode": code, "newBalance": {"points": 1500, "credit": 0}}
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]
        wrong = {**cancel, "payment": {**cancel["payment"], "amount": -1}}
        assert _error_code(_api_post(sandbox, "/v1/payment", wrong)) == "400"
        unknown = {**cancel, "payment": {"action": "cancel", "confirmationCode": "nope"}}
        assert _error_code(_api_post(sandbox, "/v1/payment", unknown)) == "404"
        ghost = {**cancel, "member": {"phoneNumber": "5550000000"}}
        assert _api_post(sandbox, "/v1/payment", ghost).json()["error"] == {
            "code": "4001012", "message": "Member not found", "path": "body.member.phoneNumber"}

    def test_a_gift_is_used_once(self, sandbox):
        gift = next(iter(sandbox.assets.values()))
        assert _submit(sandbox, "t-1", assets=[gift]).status_code == 200
        assert gift.used_by == "t-1"
        assert _error_code(_submit(sandbox, "t-2", assets=[gift])) == "522"
        benefits = {"member": {"phoneNumber": PHONE}, "usedAssets": [{"key": gift.key, "code": gift.code}],
                    "transaction": {"transactionId": "t-3", "dateTime": "2026-01-15T10:00:00Z",
                                    "totalAmount": 350, "items": [
                        {"lineId": "1", "code": "COFFEE", "name": "c", "quantity": 1, "subtotal": 350,
                         "total": 350}]}}
        answer = _api_post(sandbox, "/v1/member/details", benefits, x_return_benefits="true")
        assert _error_code(answer) == "522"
        assert answer.json()["error"]["message"] == "Used asset is already used."

    def test_a_gift_counts_if_valid_when_the_purchase_opened(self, sandbox, clock):
        gift = sandbox.add_asset(PHONE, "SPRING", amount_off=100, valid_until=clock.now() + timedelta(hours=1))
        clock.advance(hours=2)  # the submit arrives late, through the retry schedule
        assert _submit(sandbox, "t-1", assets=[gift], open_time="2026-01-15T10:30:00Z").status_code == 200
        late = sandbox.add_asset(PHONE, "LATE", amount_off=100, valid_until=clock.now() - timedelta(hours=1))
        assert _error_code(_submit(sandbox, "t-2", assets=[late], open_time="2026-01-15T11:30:00Z")) == "400"

    def test_expired_gifts_are_listed_as_inactive_and_earn_nothing(self, sandbox, clock):
        sandbox.add_asset(PHONE, "OLD", amount_off=100, product_codes={"X"}, valid_until=clock.now())
        member = {"member": {"phoneNumber": PHONE}}
        active = _api_post(sandbox, "/v1/member/details", member).json()["data"]["assets"]
        inactive = _api_post(sandbox, "/v1/member/details", member, x_return_assets="inactive").json()
        everything = _api_post(sandbox, "/v1/member/details", member, x_return_assets="all").json()
        assert [a["code"] for a in active] == ["FREECOFFEE"]
        assert [(a["code"], a["status"]) for a in inactive["data"]["assets"]] == [("OLD", "expired")]
        assert len(everything["data"]["assets"]) == 2

    def test_deals_need_their_products_and_minimum_spend(self, sandbox):
        sandbox.add_deal("5 off above 30", amount_off=500, min_total=3000)
        items = [{"lineId": "1", "code": "PASTRY", "name": "p", "quantity": 3, "subtotal": 999, "total": 999},
                 {"lineId": "2", "code": "TEA", "name": "t", "quantity": 1, "subtotal": 2000, "total": 2000}]
        body = {"member": {"phoneNumber": PHONE}, "transaction": {
            "transactionId": "t", "dateTime": "2026-01-15T10:00:00Z", "totalAmount": 2999, "items": items}}
        small = _api_post(sandbox, "/v1/member/details", body, x_return_benefits="true").json()["data"]["benefits"]
        assert small["appliedDeals"] == [{"key": "deal-1", "name": "10% off pastries", "appliedAmount": -99}]
        items[1]["subtotal"] = items[1]["total"] = 2500
        body["transaction"]["totalAmount"] = 3499
        big = _api_post(sandbox, "/v1/member/details", body, x_return_benefits="true").json()["data"]["benefits"]
        assert [d["appliedAmount"] for d in big["appliedDeals"]] == [-99, -500]
        assert big["items"] == [{"lineId": "1", "discountAmount": -599}, {"lineId": "2", "discountAmount": 0}]
        assert big["totalDiscount"] == -599

    def test_a_submit_is_recorded_once_per_transaction_id(self, sandbox):
        first = _submit(sandbox, "t-1").json()["data"]
        assert _submit(sandbox, "t-1").json()["data"] == first
        assert sandbox.submissions("t-1") == 2 and len(sandbox.recorded()) == 1

    def test_non_member_purchases_are_recorded_too(self, sandbox):
        assert _submit(sandbox, "t-1", phone=None).status_code == 200
        assert sandbox.purchases["t-1"].member_key is None

    def test_cancelling_a_purchase_revokes_its_points_but_not_its_payment(self, clock):
        sandbox = RekonectSandbox(clock, earn_points_per_100=5, submit_answers_code=True)
        sandbox.add_member(PHONE, points=1000)
        _pay(sandbox, 400)
        code = _submit(sandbox, "t-1", amount=2000).json()["data"]["confirmationCode"]
        assert sandbox.balance(PHONE).points == 600 + 100  # 5 points per 100 spent
        cancel = {"transaction": {"action": "cancel", "confirmationCode": code}}
        for _ in range(2):  # idempotent
            assert _api_post(sandbox, "/v1/transaction", cancel).json()["status"] == "success"
        assert sandbox.balance(PHONE).points == 600  # the payment stays until it is cancelled itself
        assert sandbox.purchases["t-1"].status == "cancelled"

    def test_cancelling_a_purchase_frees_its_gifts(self, sandbox):
        gift = next(iter(sandbox.assets.values()))
        code = _submit(sandbox, "t-1", assets=[gift]).json()["data"]["confirmationCode"]
        _api_post(sandbox, "/v1/transaction", {"transaction": {"action": "cancel", "confirmationCode": code}})
        assert gift.used_by is None

    @pytest.mark.parametrize("body", [
        {"member": {"phoneNumber": PHONE}, "transaction": None},
        {"member": {"phoneNumber": ""}},
        {"member": {"phoneNumber": PHONE}, "transaction": {}},
    ])
    def test_empty_or_null_fields_are_refused(self, sandbox, body):
        assert _error_code(_api_post(sandbox, "/v1/member/details", body)) == "400"

    def test_missing_headers_and_wrong_keys_are_refused(self, sandbox):
        assert _api_post(sandbox, "/v1/member/details", {"member": {"phoneNumber": PHONE}},
                         api_key="wrong").status_code == 401
        with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as client:
            answer = client.post("/v1/member/details", json={"member": {"phoneNumber": PHONE}},
                                 headers={"x-api-key": sandbox.api_key})
        assert _error_code(answer) == "400" and "x-source-type" in answer.json()["error"]["message"]

    def test_submit_totals_must_match_the_tenders(self, sandbox):
        body = {"transaction": {"transactionId": "t", "openTime": "2026-01-15T10:00:00Z", "totalAmount": 100,
                                "items": [{"lineId": "1", "name": "x", "quantity": 1, "grossAmount": 100,
                                           "netAmount": 100}],
                                "meansOfPayment": [{"type": "CASH", "amount": 99}]}}
        assert _error_code(_api_post(sandbox, "/v1/transaction", body)) == "400"
        body["transaction"]["meansOfPayment"][0]["amount"] = 100
        body["transaction"]["openTime"] = "2026-01-15T11:00:00+01:00"
        assert _error_code(_api_post(sandbox, "/v1/transaction", body)) == "400"  # not UTC


# --- flows a POS relies on -------------------------------------------------------------------------------


class TestFlows:
    def test_a_non_member_is_priced_without_a_call_and_still_submitted(self, driver, sandbox, clock):
        tx = previewed(driver, clock, token=None)
        assert sandbox.requests == []
        assert [l.outstanding.amount_minor for l in tx.items] == [350, 500, 2000]
        assert tx.details == {"member": False}
        assert driver.run(driver.finalize(tx, "fin-1")).details == {"loyalty_paid": False}
        payload = driver.delivery_payload("submit", tx)
        assert "member" not in payload and "usedAssets" not in payload and "appliedDeals" not in payload
        assert payload["transaction"]["meansOfPayment"] == [{"type": "EXTERNAL", "amount": 2850}]
        driver.run(driver.deliver((submit_delivery(driver, tx),)))
        assert sandbox.purchases["tx-1"].member_key is None

    def test_refund_before_the_queued_submit_delivers_it_first(self, driver, sandbox, clock):
        tx = previewed(driver, clock)
        tx = finalized(tx, driver.run(driver.finalize(tx, "fin-1")))
        driver.run(driver.refund(tx, "ref-1", None))
        assert sandbox.purchases["tx-1"].status == "cancelled"
        driver.run(driver.deliver((submit_delivery(driver, tx),)))  # the queue catches up later
        assert sandbox.purchases["tx-1"].status == "cancelled" and sandbox.submissions("tx-1") == 2
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]

    def test_refund_without_points_or_credit_sends_no_payment_cancel(self, driver, sandbox, clock):
        tx = previewed(driver, clock, payment_type="EXTERNAL_PAYMENT")
        tx = finalized(tx, driver.run(driver.finalize(tx, "fin-1")))
        outcome = driver.run(driver.refund(tx, "ref-1", None))
        assert [r.path for r in sandbox.requests[2:]] == ["/v1/transaction", "/v1/transaction"]
        assert "payment_cancelled" not in outcome.details

    def test_a_member_without_balance_pays_everything_externally(self, driver, sandbox, clock):
        sandbox.member(PHONE).points = sandbox.member(PHONE).credit = 0
        tx = previewed(driver, clock)
        assert tx.total_credits.amount_minor == 0 and tx.outstanding.amount_minor == 2450
        assert tx.details["loyalty_payment"] == {"credit": 0, "points": 0}
        assert driver.delivery_payload("submit", tx)["transaction"]["meansOfPayment"] == [
            {"type": "EXTERNAL", "amount": 2450}]

    def test_a_fully_covered_basket_sends_no_external_tender(self, driver, sandbox, clock):
        sandbox.member(PHONE).points = 10_000
        tx = previewed(driver, clock)
        assert tx.outstanding.amount_minor == 0
        assert driver.delivery_payload("submit", tx)["transaction"]["meansOfPayment"] == [
            {"type": "POINTS", "amount": 2450}]


# --- transports --------------------------------------------------------------------------------------------


class TestTransports:
    async def test_async_in_process(self, driver, sandbox, clock):
        tx = as_transaction(await driver.arun(driver.preview(preview_request(clock))), clock)
        tx = finalized(tx, await driver.arun(driver.finalize(tx, "fin-1")))
        await driver.arun(driver.deliver((submit_delivery(driver, tx),)))
        await driver.arun(driver.refund(tx, "ref-1", None))
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]
        assert sandbox.purchases["tx-1"].status == "cancelled"
        await driver.aclose()

    async def test_async_through_asgi(self, sandbox, clock):
        driver = make_driver(sandbox, transport=None, async_transport=sandbox.asgi_transport())
        tx = as_transaction(await driver.arun(driver.preview(preview_request(clock))), clock)
        outcome = await driver.arun(driver.finalize(tx, "fin-1"))
        assert outcome.provider_ref in sandbox.payments
        sandbox.faults.inject("payment", Fault.SERVER_ERROR)
        with pytest.raises(OutcomeUnknown):
            await driver.arun(driver.refund(finalized(tx, outcome), "ref-1", None))
        await driver.aclose()

    def test_over_a_real_loopback_socket(self, sandbox, clock):
        with serve(sandbox) as served:
            driver = make_driver(sandbox, base_url=served.base_url, transport=None)
            full_session(driver, sandbox, clock)
            sandbox.faults.inject("transaction", Fault.DROP_CONNECTION)
            with pytest.raises(OutcomeUnknown):
                driver.run(driver.deliver((submit_delivery(driver, previewed(driver, clock, tx_id="tx-9")),)))
            driver.close()
        assert sandbox.balance(PHONE) == sandbox.opening_balances[PHONE]
        assert sandbox.purchases["tx-1"].status == "cancelled"

    def test_a_slow_answer_over_a_socket_times_out_as_unknown(self, sandbox, clock):
        with serve(sandbox) as served:
            driver = make_driver(sandbox, base_url=served.base_url, transport=None, timeout=0.2)
            tx = previewed(driver, clock)
            sandbox.faults.inject("payment", Fault.SLOW, delay=0.6)
            with pytest.raises(OutcomeUnknown):
                driver.run(driver.finalize(tx, "fin-1"))
            driver.close()


# --- policy, configuration and secrets -----------------------------------------------------------------------


class TestPolicy:
    def test_capabilities(self):
        capabilities = RekonectDriver.capabilities
        assert capabilities.remote == {"preview", "finalize", "refund"}
        assert capabilities.local == {"update", "begin_payment", "cancel"}
        assert capabilities.deferred == {"finalize": ("submit",)}
        assert capabilities.payment_types == {"SPLIT_PAYMENT", "EXTERNAL_PAYMENT"}
        assert capabilities.timers == policy.TIMERS

    def test_the_assumptions_named_in_the_fidelity_note(self):
        # settled by docs.rekonect.works/docs/overview/communication-format
        assert RekonectDriver.environments == {"sandbox": "https://dev-pos-api.fidelizacion.app",
                                               "production": "https://pos-api.fidelizacion.app"}
        assert (policy.MEMBER_DETAILS_PATH, policy.PAYMENT_PATH, policy.TRANSACTION_PATH) == (
            "/v1/member/details", "/v1/payment", "/v1/transaction")
        assert policy.ASSUMED_METHOD == "POST" and policy.ASSUMED_ERROR_STATUS == 400
        assert policy.MEMBER_KEY_FIELD == "membershipKey" and policy.IDEMPOTENCY_FIELD == "transactionId"
        assert policy.SUBMIT_CONFIRMATION_FIELD == "confirmationCode"
        assert policy.TRANSACTION_CANCEL_SHAPE == ("transaction", "action", "cancel")
        assert policy.BENEFITS_FIELD == "benefits" and policy.NOT_RECORDED_CODES == {"522"}
        assert policy.ASSUMED_DEFAULT_PAYMENT_ASSET == "points" and policy.AUTO_REDEEM_ASSETS is True
        assert policy.EXTERNAL_TENDER_TYPE == "EXTERNAL"
        assert policy.TIMERS == TimerPolicy()  # the lifecycle's defaults: Rekonect states none

    def test_delivery_schedule_two_quick_retries_then_later_in_the_day(self):
        schedule = RekonectDriver.capabilities.delivery_schedule
        assert schedule == policy.DELIVERY_SCHEDULE
        quick, later = schedule[:2], schedule[2:]
        assert all(delay <= timedelta(minutes=2) for delay in quick)
        assert later and all(delay >= timedelta(hours=1) for delay in later)
        assert sum(schedule, timedelta()) < timedelta(hours=24)

    def test_timeout_between_5_and_10_seconds(self, sandbox):
        driver = make_driver(sandbox)
        assert driver.timeout is policy.REQUEST_TIMEOUT
        assert 5 <= policy.REQUEST_TIMEOUT.read <= 10 and policy.REQUEST_TIMEOUT.connect <= 10
        assert make_driver(sandbox, timeout=6).timeout.read == 6

    def test_base_url(self, sandbox):
        assert make_driver(sandbox, transport=None).base_url == policy.DEV_BASE_URL
        assert sandbox.base_url == policy.DEV_BASE_URL
        production = RekonectDriver(environment="production", api_key="k", source_name="s", pos_id="p",
                                    branch_id="b")
        assert production.base_url == policy.PRODUCTION_BASE_URL == "https://pos-api.fidelizacion.app"
        with pytest.raises(ValidationError):
            RekonectDriver(api_key="k", source_name="s", pos_id="p", branch_id="b")  # no silent default
        for refused in ("http://api.example.com", "ftp://127.0.0.1", "api.example.com"):
            with pytest.raises(ValidationError):
                make_driver(sandbox, base_url=refused)
        for accepted in ("https://loyalty.example.com/", "http://127.0.0.1:8000", "http://localhost:1"):
            assert make_driver(sandbox, base_url=accepted).base_url == accepted.rstrip("/")

    @pytest.mark.parametrize("field", ["pos_id", "branch_id", "source_name", "source_type", "api_key"])
    @pytest.mark.parametrize("value", ["", "x\r\nx-api-key: stolen", " padded", "ü"])
    def test_header_values_are_validated(self, field, value):
        options = {"api_key": "k", "source_name": "s", "pos_id": "p", "branch_id": "b", field: value}
        with pytest.raises(ValidationError) as refused:
            RekonectDriver(**options)
        assert value.strip() == "" or value not in str(refused.value)

    def test_unsupported_payment_type(self, driver, sandbox, clock):
        with pytest.raises(ValidationError):
            driver.run(driver.preview(preview_request(clock, payment_type="CREDIT")))
        assert sandbox.requests == []


class TestSecrets:
    def test_repr_has_no_api_key(self, driver, sandbox):
        assert sandbox.api_key not in repr(driver) and "POS-7" in repr(driver)

    @pytest.mark.parametrize("token", ["12345", "not a phone", "5511122233x", "a" * 40])
    def test_a_malformed_token_fails_before_any_call_without_echoing_it(self, driver, sandbox, clock, token):
        with pytest.raises(ValidationError) as refused:
            driver.run(driver.preview(preview_request(clock, token=token)))
        assert token not in str(refused.value) and sandbox.requests == []

    def test_nothing_stored_carries_the_phone_number_or_the_api_key(self, driver, sandbox, clock):
        quote = driver.run(driver.preview(preview_request(clock)))
        tx = as_transaction(quote, clock)
        outcome = driver.run(driver.finalize(tx, "fin-1"))
        tx = finalized(tx, outcome)
        refund = driver.run(driver.refund(tx, "ref-1", None))
        stored = json.dumps([dict(quote.details), dict(outcome.details), dict(refund.details),
                             driver.delivery_payload("submit", tx),
                             [attrs.asdict(r) for r in (*quote.receipt, *outcome.receipt, *refund.receipt)]])
        assert PHONE not in stored and sandbox.api_key not in stored

    def test_errors_carry_neither_key_nor_token(self, sandbox, clock):
        for fault in UNKNOWN_FAULTS:
            driver = make_driver(sandbox)
            sandbox.faults.inject("member_details", fault, times=2)
            with pytest.raises(OutcomeUnknown) as unknown:
                driver.run(driver.preview(preview_request(clock)))
            assert sandbox.api_key not in str(unknown.value) and PHONE not in str(unknown.value)
