"""The Cheers sandbox's business rules, spoken to in raw HTTP as a POS would.

Wallet holds and deductions, discount rules, one-time QR keys, idempotency replay,
the preview deadline and its extension, the refund window, and the wire's refusals.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from txengine.providers.cheers import CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.sandbox import DEFAULT_API_KEY, DiscountRule

BEER = "f04ce0c0-1034-40bf-a066-3e313f68c781"
PREVIEW = "/v3/integrations/credit-transactions/preview"


def update_path(transaction_id: str) -> str:
    return f"/v1/integrations/credit-transactions/{transaction_id}/update"


def command_path(operation: str, transaction_id: str) -> str:
    version = "v3" if operation == "finalize" else "v1"
    return f"/{version}/integrations/credit-transactions/{transaction_id}/{operation}"


def item(unit_price: int, quantity: int = 1, *, product_id: str | None = BEER, name: str = "Draft Beer 0.5L",
         vat: int = 27) -> dict:
    return {"productId": product_id, "quantity": quantity, "unitPrice": unit_price, "name": name, "vat": vat}


class Till:
    """A POS terminal talking raw HTTP to the sandbox."""

    def __init__(self, sandbox: CheersSandbox, api_key: str = DEFAULT_API_KEY) -> None:
        self.sandbox = sandbox
        self.client = httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url,
                                   headers={"X-API-Key": api_key})
        self._keys = iter(range(1, 10_000))

    def preview(self, qr: str, items: list[dict], payment_type: str = "SPLIT_PAYMENT", *,
                idempotency_key: str | None = None, currency: str = "HUF") -> httpx.Response:
        headers = {"X-Transaction-Key": qr,
                   "X-Idempotency-Key": idempotency_key or f"idem-{next(self._keys)}"}
        body = {"paymentType": payment_type, "currencyCode": currency, "items": items}
        return self.client.post(PREVIEW, json=body, headers=headers)

    def update(self, transaction_id: str, items: list[dict], currency: str = "HUF") -> httpx.Response:
        return self.client.post(update_path(transaction_id), json={"currencyCode": currency, "newItems": items})

    def command(self, operation: str, transaction_id: str, body: dict | None = None) -> httpx.Response:
        return self.client.post(command_path(operation, transaction_id), json=body)


@pytest.fixture
def sandbox(clock) -> CheersSandbox:
    sandbox = CheersSandbox(clock=clock)
    sandbox.add_wallet("anna", credits=800)
    sandbox.add_discount(BEER, percent=40)
    return sandbox


@pytest.fixture
def till(sandbox) -> Till:
    return Till(sandbox)


def qr(sandbox: CheersSandbox, wallet: str = "anna", **kwargs) -> str:
    return sandbox.issue_transaction_key(wallet, **kwargs)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, code: str) -> dict:
    assert response.status_code == cheers.ASSUMED_ERROR_STATUS[code], response.text
    body = response.json()
    assert list(body) == list(cheers.ASSUMED_ERROR_ENVELOPE)
    assert body["code"] == code
    assert body["message"]
    return body


def previewed(till: Till, sandbox: CheersSandbox, items=None, **kwargs) -> dict:
    return ok(till.preview(qr(sandbox), items or [item(500, 3)], **kwargs))


# --- wallets: holds, deductions, refunds ------------------------------------------------------


def test_a_preview_holds_credits_and_finalize_deducts_them(till, sandbox):
    answer = previewed(till, sandbox)
    assert (answer["totalDiscount"], answer["totalCredits"], answer["outstandingBalance"]) == (600, 800, 100)
    assert sandbox.wallet_balance("anna") == 800
    assert sandbox.wallet_available("anna") == 0

    ok(till.command("finalize", answer["transactionId"]))

    assert sandbox.wallet_balance("anna") == sandbox.wallet_available("anna") == 0
    assert [(entry.kind, entry.credits) for entry in sandbox.ledger] == [("finalize", 800)]
    assert sandbox.status(answer["transactionId"]) == "FINALIZED"


def test_a_second_preview_only_gets_the_credits_left_over(till, sandbox):
    previewed(till, sandbox, [item(500, 1)])  # 300 after discount, 300 credits held
    second = previewed(till, sandbox)
    assert (second["totalCredits"], second["outstandingBalance"]) == (500, 400)
    third = previewed(till, sandbox)
    assert (third["totalCredits"], third["outstandingBalance"]) == (0, 900)


def test_cancel_deducts_nothing_and_frees_the_hold(till, sandbox):
    answer = previewed(till, sandbox)
    ok(till.command("cancel", answer["transactionId"]))
    assert sandbox.wallet_balance("anna") == sandbox.wallet_available("anna") == 800
    assert sandbox.ledger == []
    assert sandbox.status(answer["transactionId"]) == "CANCELLED"


def test_refund_returns_the_credits_once(till, sandbox):
    answer = previewed(till, sandbox)
    ok(till.command("finalize", answer["transactionId"]))
    ok(till.command("refund", answer["transactionId"], {"comment": "Customer returned the order"}))
    ok(till.command("refund", answer["transactionId"], {"comment": "again"}))
    assert sandbox.wallet_balance("anna") == 800
    assert [entry.kind for entry in sandbox.ledger] == ["finalize", "refund"]
    assert sandbox.transaction(answer["transactionId"]).refund_comment == "Customer returned the order"


def test_ledger_conservation_over_a_mixed_day(till, sandbox):
    sandbox.add_wallet("bob", credits=5000)
    finalized, refunded = [], []
    for index in range(6):
        answer = ok(till.preview(qr(sandbox, "bob"), [item(500, index + 1)]))
        transaction_id = answer["transactionId"]
        if index % 3 == 0:
            ok(till.command("cancel", transaction_id))
            continue
        ok(till.command("finalize", transaction_id))
        finalized.append(answer["totalCredits"])
        if index % 2 == 0:
            ok(till.command("refund", transaction_id, {"comment": "return"}))
            refunded.append(answer["totalCredits"])
    assert sandbox.wallet_balance("bob") == 5000 - sum(finalized) + sum(refunded)
    assert sandbox.opening_balance("bob") == 5000


# --- payment types --------------------------------------------------------------------------


def test_credit_pays_everything_when_the_wallet_covers_it(till, sandbox):
    sandbox.add_wallet("rich", credits=1000)
    answer = ok(till.preview(qr(sandbox, "rich"), [item(500, 3)], "CREDIT"))
    assert (answer["totalCredits"], answer["outstandingBalance"]) == (900, 0)


def test_credit_without_enough_credits_is_refused_and_the_qr_stays_usable(till, sandbox):
    key = qr(sandbox)
    refused(till.preview(key, [item(500, 3)], "CREDIT", idempotency_key="first"), "INSUFFICIENT_CREDIT")
    assert not sandbox.transaction_key_used(key)
    assert sandbox.transactions() == []

    answer = ok(till.preview(key, [item(500, 3)], "EXTERNAL_PAYMENT", idempotency_key="second"))
    assert (answer["totalDiscount"], answer["totalCredits"], answer["outstandingBalance"]) == (600, 0, 900)
    assert sandbox.transaction_key_used(key)


def test_a_refusal_is_not_remembered_under_its_idempotency_key(till, sandbox):
    key = qr(sandbox)
    refused(till.preview(key, [item(500, 3)], "CREDIT", idempotency_key="same"), "INSUFFICIENT_CREDIT")
    ok(till.preview(key, [item(500, 3)], "EXTERNAL_PAYMENT", idempotency_key="same"))


def test_credit_counts_credits_held_by_other_previews(till, sandbox):
    previewed(till, sandbox, [item(500, 1)])  # holds 300
    refused(till.preview(qr(sandbox), [item(1000, 1)], "CREDIT"), "INSUFFICIENT_CREDIT")  # needs 600, 500 free


# --- discounts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "unit_price", "quantity", "discount"),
    [
        (DiscountRule(BEER, percent=40), 500, 3, 600),
        (DiscountRule(BEER, percent=33), 100, 1, 33),  # whole units, rounded down
        (DiscountRule(BEER, per_unit=150), 500, 3, 450),
        (DiscountRule(BEER, percent=10, per_unit=50), 500, 2, 200),
        (DiscountRule(BEER, per_unit=900), 500, 2, 1000),  # never more than the line
        (DiscountRule(None, percent=20), 500, 1, 100),  # every product
        (DiscountRule("other-product", percent=50), 500, 1, 0),
    ],
)
def test_discount_rules(rule, unit_price, quantity, discount):
    assert rule.discount(unit_price, quantity) * rule.applies_to(BEER) == discount


def test_the_best_matching_rule_wins_and_lines_without_product_get_only_general_rules(clock):
    sandbox = CheersSandbox(clock=clock)
    sandbox.add_wallet("anna", credits=0)
    sandbox.add_discount(BEER, percent=10)
    sandbox.add_discount(BEER, per_unit=200)
    sandbox.add_discount(None, percent=5)
    answer = ok(Till(sandbox).preview(qr(sandbox), [item(500, 1), item(100, 1, product_id=None, name="Crisps")]))
    assert [line["discount"] for line in answer["items"]] == [200, 5]


@pytest.mark.parametrize("percent", [-1, 101])
def test_a_discount_rule_is_a_percentage(percent):
    with pytest.raises(ValueError):
        DiscountRule(BEER, percent=percent)


def test_credits_are_spent_line_by_line_and_every_line_adds_up(till, sandbox):
    answer = previewed(till, sandbox, [item(500, 1), item(400, 2), item(100, 1, product_id=None, name="Crisps")])
    assert [(line["discount"], line["credits"], line["outstandingBalance"]) for line in answer["items"]] == [
        (200, 300, 0), (320, 480, 0), (0, 20, 80),
    ]
    for line in answer["items"]:
        assert line["unitPrice"] * line["quantity"] == line["discount"] + line["credits"] + line["outstandingBalance"]


# --- update ----------------------------------------------------------------------------------


def test_update_adds_fees_without_discount_or_credits_even_when_credits_are_left(till, sandbox):
    sandbox.add_discount(None, percent=50)
    answer = previewed(till, sandbox, [item(500, 1)])  # 250 after discount; 550 credits left
    updated = ok(till.update(answer["transactionId"], [item(9, product_id=None, name="Service fee")]))
    fee = updated["items"][-1]
    assert (fee["discount"], fee["credits"], fee["outstandingBalance"]) == (0, 0, 9)
    assert updated["outstandingBalance"] == answer["outstandingBalance"] + 9


def test_update_in_another_currency_is_refused(till, sandbox):
    answer = previewed(till, sandbox)
    refused(till.update(answer["transactionId"], [item(9)], currency="EUR"), "CURRENCY_MISMATCH")


def test_update_of_an_unknown_transaction_is_not_found(till):
    refused(till.update("no-such-transaction", [item(9)]), "CREDIT_TRANSACTION_NOT_FOUND")


# --- one-time QR keys -------------------------------------------------------------------------


def test_a_qr_key_is_consumed_by_a_preview(till, sandbox):
    key = qr(sandbox)
    ok(till.preview(key, [item(500)]))
    refused(till.preview(key, [item(500)]), "TRANSACTION_KEY_ALREADY_USED")


def test_a_cancelled_preview_leaves_its_qr_key_consumed(till, sandbox):
    key = qr(sandbox)
    answer = ok(till.preview(key, [item(500)]))
    ok(till.command("cancel", answer["transactionId"]))
    refused(till.preview(key, [item(500)]), "TRANSACTION_KEY_ALREADY_USED")


def test_an_expired_preview_leaves_its_qr_key_consumed(till, sandbox, clock):
    key = qr(sandbox)
    ok(till.preview(key, [item(500)]))
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    refused(till.preview(key, [item(500)]), "TRANSACTION_KEY_ALREADY_USED")


def test_qr_keys_are_case_insensitive_hex(till, sandbox):
    key = qr(sandbox)
    ok(till.preview(key.upper(), [item(500)]))
    assert sandbox.transaction_key_used(key)


def test_a_qr_key_can_expire(till, sandbox, clock):
    key = qr(sandbox, valid_for=timedelta(minutes=2))
    clock.advance(timedelta(minutes=2) - timedelta(microseconds=1))
    ok(till.preview(key, [item(500)]))
    late = qr(sandbox, valid_for=timedelta(minutes=2))
    clock.advance(minutes=2)
    refused(till.preview(late, [item(500)]), "TRANSACTION_KEY_EXPIRED")


def test_an_unknown_qr_key_is_not_found(till):
    refused(till.preview("ab" * 16, [item(500)]), "TRANSACTION_KEY_NOT_FOUND")


def test_issued_keys_are_random_32_hex(sandbox):
    keys = {qr(sandbox) for _ in range(20)}
    assert len(keys) == 20
    assert all(cheers.TRANSACTION_KEY_PATTERN.fullmatch(key) for key in keys)
    with pytest.raises(ValueError):
        sandbox.issue_transaction_key("anna", "not-hex")
    with pytest.raises(KeyError):
        sandbox.issue_transaction_key("nobody")


# --- idempotency ------------------------------------------------------------------------------


def test_a_repeated_idempotency_key_replays_the_same_preview(till, sandbox):
    key = qr(sandbox)
    first = ok(till.preview(key, [item(500, 3)], idempotency_key="k1"))
    again = ok(till.preview(key, [item(500, 3)], idempotency_key="k1"))
    assert again == first
    assert len(sandbox.transactions()) == 1
    assert sandbox.wallet_available("anna") == 0  # held once, not twice


def test_the_replay_outlives_the_transaction_it_created(till, sandbox):
    key = qr(sandbox)
    first = ok(till.preview(key, [item(500, 3)], idempotency_key="k1"))
    ok(till.command("finalize", first["transactionId"]))
    assert ok(till.preview(key, [item(500, 3)], idempotency_key="k1")) == first
    assert [entry.kind for entry in sandbox.ledger] == ["finalize"]


@pytest.mark.parametrize("change", ["basket", "qr", "payment_type"])
def test_the_same_idempotency_key_for_another_preview_is_a_conflict(till, sandbox, change):
    key = qr(sandbox)
    ok(till.preview(key, [item(500, 3)], idempotency_key="k1"))
    other = {
        "basket": lambda: till.preview(key, [item(500, 2)], idempotency_key="k1"),
        "qr": lambda: till.preview(qr(sandbox), [item(500, 3)], idempotency_key="k1"),
        "payment_type": lambda: till.preview(key, [item(500, 3)], "EXTERNAL_PAYMENT", idempotency_key="k1"),
    }[change]
    refused(other(), "IDEMPOTENCY_KEY_CONFLICT")


def test_idempotency_keys_are_scoped_per_terminal(sandbox):
    sandbox.add_terminal("second-terminal")
    first, second = Till(sandbox), Till(sandbox, "second-terminal")
    ok(first.preview(qr(sandbox), [item(500)], idempotency_key="shared"))
    answer = ok(second.preview(qr(sandbox), [item(500)], idempotency_key="shared"))
    assert len(sandbox.transactions()) == 2
    assert answer["transactionId"] != sandbox.transactions()[0].id


@pytest.mark.parametrize("operation", ["finalize", "cancel"])
def test_a_repeated_command_answers_the_same_and_moves_nothing_more(till, sandbox, operation):
    answer = previewed(till, sandbox)
    first = ok(till.command(operation, answer["transactionId"]))
    assert ok(till.command(operation, answer["transactionId"])) == first
    assert sandbox.wallet_balance("anna") == (0 if operation == "finalize" else 800)
    assert len(sandbox.ledger) == (1 if operation == "finalize" else 0)


# --- deadlines --------------------------------------------------------------------------------


def test_a_preview_lives_exactly_its_assumed_lifetime(till, sandbox, clock):
    early, late = previewed(till, sandbox), previewed(till, sandbox)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME - timedelta(microseconds=1))
    ok(till.command("finalize", early["transactionId"]))
    clock.advance(microseconds=1)
    refused(till.command("finalize", late["transactionId"]), "CREDIT_TRANSACTION_EXPIRED")
    assert sandbox.status(late["transactionId"]) == "EXPIRED"


def test_expiry_frees_the_held_credits(till, sandbox, clock):
    previewed(till, sandbox)
    assert sandbox.wallet_available("anna") == 0
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    assert sandbox.wallet_available("anna") == 800


def test_each_update_extends_the_deadline_by_ten_minutes(till, sandbox, clock):
    answer = previewed(till, sandbox)
    transaction_id = answer["transactionId"]
    clock.advance(minutes=9)
    ok(till.update(transaction_id, [item(9, product_id=None, name="Service fee")]))
    clock.advance(minutes=9)
    ok(till.update(transaction_id, [item(100, product_id=None, name="Tip", vat=0)]))
    # Deadline: 10 + 10 + 10 minutes after the preview.
    clock.advance(timedelta(minutes=12) - timedelta(microseconds=1))
    assert sandbox.status(transaction_id) == "PREVIEWED"
    clock.advance(microseconds=1)
    refused(till.update(transaction_id, [item(1, product_id=None, name="Tip")]), "CREDIT_TRANSACTION_EXPIRED")
    assert cheers.UPDATE_EXTENSION == timedelta(minutes=10)


def test_cancel_of_an_expired_preview_is_refused_as_expired(till, sandbox, clock):
    answer = previewed(till, sandbox)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    refused(till.command("cancel", answer["transactionId"]), "CREDIT_TRANSACTION_EXPIRED")
    assert sandbox.wallet_balance("anna") == 800


def test_refunds_close_24_hours_after_finalize(till, sandbox, clock):
    answer = previewed(till, sandbox)
    clock.advance(minutes=5)
    ok(till.command("finalize", answer["transactionId"]))
    clock.advance(cheers.REFUND_WINDOW)
    refused(till.command("refund", answer["transactionId"], {"comment": "late"}),
            "CREDIT_TRANSACTION_CAN_NO_LONGER_BE_REFUNDED_BY_EXTERNAL_DEVICE")
    assert sandbox.wallet_balance("anna") == 0


def test_a_refund_already_made_still_replays_after_the_window(till, sandbox, clock):
    answer = previewed(till, sandbox)
    ok(till.command("finalize", answer["transactionId"]))
    first = ok(till.command("refund", answer["transactionId"], {"comment": "return"}))
    clock.advance(cheers.REFUND_WINDOW * 2)
    assert ok(till.command("refund", answer["transactionId"], {"comment": "return"})) == first


# --- the wire's refusals ------------------------------------------------------------------------


def test_every_call_needs_a_registered_api_key(sandbox):
    stranger = Till(sandbox, api_key="stolen")
    refused(stranger.preview(qr(sandbox), [item(500)]), "UNAUTHORIZED")
    refused(stranger.command("finalize", "anything"), "UNAUTHORIZED")
    anonymous = httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url)
    refused(anonymous.post(command_path("cancel", "anything")), "UNAUTHORIZED")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Transaction-Key": "ab" * 16},
        {"X-Transaction-Key": "ab" * 16, "X-Idempotency-Key": "k" * 256},
        {"X-Transaction-Key": "xyz", "X-Idempotency-Key": "k"},
        {"X-Idempotency-Key": "k"},
    ],
)
def test_preview_headers_are_validated(till, headers):
    body = {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(500)]}
    refused(till.client.post(PREVIEW, json=body, headers=headers), "VALIDATION_ERROR")


@pytest.mark.parametrize(
    "body",
    [
        {"paymentType": "CASH", "currencyCode": "HUF", "items": [item(500)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "huf", "items": [item(500)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": []},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(500.5)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(500, 0)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(500, vat=5.5)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(500, name="")]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(-1)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [item(True)]},
        {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": ["beer"]},
        ["not", "an", "object"],
    ],
)
def test_preview_bodies_are_validated_and_consume_nothing(till, sandbox, body):
    key = qr(sandbox)
    response = till.client.post(PREVIEW, json=body, headers={"X-Transaction-Key": key, "X-Idempotency-Key": "k"})
    refused(response, "VALIDATION_ERROR")
    assert not sandbox.transaction_key_used(key)


def test_a_body_that_is_not_json_is_a_validation_error(till, sandbox):
    response = till.client.post(PREVIEW, content=b"{not json",
                                headers={"X-Transaction-Key": qr(sandbox), "X-Idempotency-Key": "k"})
    refused(response, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/integrations/credit-transactions/preview"),  # wrong version
        ("POST", "/v1/integrations/credit-transactions/some-id/finalize"),
        ("POST", "/v3/integrations/credit-transactions/some-id/cancel"),
        ("GET", PREVIEW),
        ("POST", "/v1/integrations/credit-transactions/some-id/void"),
    ],
)
def test_paths_outside_the_guide_are_not_found(till, method, path):
    refused(till.client.request(method, path), "NOT_FOUND")


def test_the_sandbox_records_every_request(till, sandbox):
    previewed(till, sandbox)
    (request,) = sandbox.requests
    assert (request.method, request.path) == ("POST", PREVIEW)
    assert request.header("X-API-Key") == DEFAULT_API_KEY
