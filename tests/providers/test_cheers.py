"""Cheers Loyalty driver: the seed's worked example as a contract, the wire format of
every call, error mapping, faults, validation, transports and secrets.

Business rules of the sandbox itself are in ``test_cheers_sandbox.py``; full POS
sessions through the engine in ``test_cheers_engine.py``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest

from txengine.clock import FakeClock
from txengine.drivers import Delivery, PreviewRequest
from txengine.errors import OutcomeUnknown, ProtocolError, ProviderRejected, ValidationError
from txengine.models import Basket, LineItem, Quote, Transaction
from txengine.money import Money
from txengine.secret import Secret
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.sandbox import DEFAULT_API_KEY
from txengine.testing.sandbox import Fault, RecordingTransport, serve

# --- the seed's worked example, verbatim ---------------------------------------------------

SEED_TRANSACTION_KEY = "5ccd7850844b415091071c027930101f"
SEED_IDEMPOTENCY_KEY = "a7e454c6-17ab-4fee-b823-c595bf3adb4a"
SEED_TRANSACTION_ID = "b04ce0c0-1034-40bf-a066-3e313f68c782"
BEER_ID = "f04ce0c0-1034-40bf-a066-3e313f68c781"

SEED_PREVIEW_REQUEST = """{
"paymentType": "SPLIT_PAYMENT",
"currencyCode": "HUF",
"items": [
{
"productId": "f04ce0c0-1034-40bf-a066-3e313f68c781",
"quantity": 3,
"unitPrice": 500,
"name": "Draft Beer 0.5L",
"vat": 27
}
]
}"""

SEED_PREVIEW_RESPONSE = """{
"transactionId": "b04ce0c0-1034-40bf-a066-3e313f68c782",
"totalCredits": 800,
"totalDiscount": 600,
"outstandingBalance": 100,
"currencyCode": "HUF",
"items": [
{
"productId": "f04ce0c0-1034-40bf-a066-3e313f68c781",
"name": "Draft Beer 0.5L",
"unitPrice": 500,
"quantity": 3,
"credits": 800,
"discount": 600,
"outstandingBalance": 100,
"vat": 27
}
]
}"""

SEED_UPDATE_REQUEST = """{
"currencyCode": "HUF",
"newItems": [
{
"productId": null,
"quantity": 1,
"unitPrice": 9,
"name": "Service fee",
"vat": 27
},
{
"productId": null,
"quantity": 1,
"unitPrice": 100,
"name": "Tip",
"vat": 0
}
]
}"""

SEED_UPDATE_RESPONSE = """{
"transactionId": "b04ce0c0-1034-40bf-a066-3e313f68c782",
"totalCredits": 800,
"totalDiscount": 600,
"outstandingBalance": 209,
"currencyCode": "HUF",
"items": [
{
"productId": "f04ce0c0-1034-40bf-a066-3e313f68c781",
"name": "Draft Beer 0.5L",
"unitPrice": 500,
"quantity": 3,
"credits": 800,
"discount": 600,
"outstandingBalance": 100,
"vat": 27
},
{
"productId": null,
"name": "Service fee",
"unitPrice": 9,
"quantity": 1,
"credits": 0,
"discount": 0,
"outstandingBalance": 9,
"vat": 27
},
{
"productId": null,
"name": "Tip",
"unitPrice": 100,
"quantity": 1,
"credits": 0,
"discount": 0,
"outstandingBalance": 100,
"vat": 0
}
]
}"""

SEED_REFUND_REQUEST = """{
"comment": "Customer returned the order"
}"""


def huf(forints: int) -> Money:
    return Money(forints * 100, "HUF")


BEERS = LineItem(BEER_ID, "Draft Beer 0.5L", 3, huf(500), 27)
SERVICE_FEE = LineItem(None, "Service fee", 1, huf(9), 27)
TIP = LineItem(None, "Tip", 1, huf(100), 0)


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def sandbox(clock) -> CheersSandbox:
    """The seed's set-up, configured by hand so the test shows what produces the numbers."""
    sandbox = CheersSandbox(clock=clock)
    sandbox.add_wallet("guest", credits=800)
    sandbox.issue_transaction_key("guest", SEED_TRANSACTION_KEY)
    sandbox.add_discount(BEER_ID, percent=40)
    sandbox.reserve_transaction_id(SEED_TRANSACTION_ID)
    return sandbox


@pytest.fixture
def recorder(sandbox) -> RecordingTransport:
    return sandbox.recording_transport()


@pytest.fixture
def driver(recorder) -> CheersDriver:
    return CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=recorder)


def preview_request(
    clock,
    items=(BEERS,),
    *,
    key: str | None = SEED_TRANSACTION_KEY,
    idempotency_key: str = SEED_IDEMPOTENCY_KEY,
    payment_type: str = "SPLIT_PAYMENT",
) -> PreviewRequest:
    return PreviewRequest(
        tx_id="tx-1",
        basket=Basket(items),
        customer_token=Secret(key) if key is not None else None,
        payment_type=payment_type,
        idempotency_key=idempotency_key,
        now=clock.now(),
    )


def snapshot(quote: Quote, clock, state: str = "previewed") -> Transaction:
    """What the engine would hold after committing ``quote``."""
    now = clock.now()
    return Transaction(
        id="tx-1", provider="cheers", state=state, items=quote.lines,
        currency=quote.lines[0].item.currency, provider_ref=quote.provider_ref,
        created_at=now, updated_at=now,
    )


def previewed(driver, clock, **kwargs) -> Transaction:
    return snapshot(driver.run(driver.preview(preview_request(clock, **kwargs))), clock)


def body_of(message: httpx.Request | httpx.Response):
    return json.loads(message.content)


# --- the contract: the seed's worked example, field by field -------------------------------


def test_worked_example_preview_is_the_seeds_request_and_answer(driver, recorder, clock):
    quote = driver.run(driver.preview(preview_request(clock)))

    request, response = recorder.last
    assert request.method == "POST"
    assert str(request.url) == "https://api.dev.votesess.com/v3/integrations/credit-transactions/preview"
    assert request.headers["X-API-Key"] == DEFAULT_API_KEY
    assert request.headers["X-Transaction-Key"] == SEED_TRANSACTION_KEY
    assert request.headers["X-Idempotency-Key"] == SEED_IDEMPOTENCY_KEY
    assert request.headers["Content-Type"] == "application/json"
    sent, seed = body_of(request), json.loads(SEED_PREVIEW_REQUEST)
    assert list(sent) == list(seed)
    for field in ("paymentType", "currencyCode"):
        assert sent[field] == seed[field], field
    assert len(sent["items"]) == len(seed["items"]) == 1
    assert list(sent["items"][0]) == list(seed["items"][0])
    for field, value in seed["items"][0].items():
        assert sent["items"][0][field] == value, field
    assert sent == seed

    assert response.status_code == 200
    assert body_of(response) == json.loads(SEED_PREVIEW_RESPONSE)

    (line,) = quote.lines
    assert quote.provider_ref == SEED_TRANSACTION_ID
    assert line.item == BEERS
    assert (line.discount, line.credits, line.outstanding) == (huf(600), huf(800), huf(100))


def test_worked_example_update_is_the_seeds_request_and_answer(driver, recorder, clock):
    tx = previewed(driver, clock)

    quote = driver.run(driver.update(tx, (SERVICE_FEE, TIP), "update-1"))

    request, response = recorder.last
    assert request.method == "POST"
    assert request.url.path == f"/v1/integrations/credit-transactions/{SEED_TRANSACTION_ID}/update"
    assert request.headers["X-API-Key"] == DEFAULT_API_KEY
    assert "X-Transaction-Key" not in request.headers
    assert "X-Idempotency-Key" not in request.headers
    sent, seed = body_of(request), json.loads(SEED_UPDATE_REQUEST)
    assert list(sent) == list(seed)
    assert sent["currencyCode"] == seed["currencyCode"]
    for sent_item, seed_item in zip(sent["newItems"], seed["newItems"], strict=True):
        assert list(sent_item) == list(seed_item)
        for field, value in seed_item.items():
            assert sent_item[field] == value, field
    assert sent == seed

    assert response.status_code == 200
    assert body_of(response) == json.loads(SEED_UPDATE_RESPONSE)

    beer, fee, tip = quote.lines
    assert (beer.discount, beer.credits, beer.outstanding) == (huf(600), huf(800), huf(100))
    assert (fee.item, fee.discount, fee.credits, fee.outstanding) == (SERVICE_FEE, huf(0), huf(0), huf(9))
    assert (tip.item, tip.discount, tip.credits, tip.outstanding) == (TIP, huf(0), huf(0), huf(100))
    assert sum((line.outstanding for line in quote.lines), huf(0)) == huf(209)
    assert quote.provider_ref == SEED_TRANSACTION_ID


def test_worked_example_through_the_ready_made_seed(clock):
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_worked_example()
    recorder = sandbox.recording_transport()
    driver = CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=recorder)

    tx = previewed(driver, clock)
    driver.run(driver.update(tx, (SERVICE_FEE, TIP), "u"))

    (_, preview), (_, update) = recorder.exchanges
    assert body_of(preview) == json.loads(SEED_PREVIEW_RESPONSE)
    assert body_of(update) == json.loads(SEED_UPDATE_RESPONSE)


@pytest.mark.parametrize(
    ("operation", "path"),
    [
        ("finalize", f"/v3/integrations/credit-transactions/{SEED_TRANSACTION_ID}/finalize"),
        ("cancel", f"/v1/integrations/credit-transactions/{SEED_TRANSACTION_ID}/cancel"),
    ],
)
def test_finalize_and_cancel_send_no_body_only_the_id_in_the_path(driver, recorder, clock, operation, path):
    tx = previewed(driver, clock)

    outcome = driver.run(getattr(driver, operation)(tx, "key-1"))

    request, response = recorder.last
    assert (request.method, request.url.path) == ("POST", path)
    assert request.url.host == "api.dev.votesess.com"
    assert request.headers["X-API-Key"] == DEFAULT_API_KEY
    assert request.headers["Content-Type"] == "application/json"
    assert "X-Transaction-Key" not in request.headers
    assert request.content == b""
    assert response.status_code == 200
    assert outcome.provider_ref == SEED_TRANSACTION_ID


def test_refund_sends_the_comment(driver, recorder, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))

    driver.run(driver.refund(tx, "r", "Customer returned the order"))

    request, response = recorder.last
    assert request.url.path == f"/v1/integrations/credit-transactions/{SEED_TRANSACTION_ID}/refund"
    assert request.headers["X-API-Key"] == DEFAULT_API_KEY
    assert body_of(request) == json.loads(SEED_REFUND_REQUEST)
    assert response.status_code == 200


@pytest.mark.parametrize("comment", [None, "", "   "])
def test_refund_without_a_comment_sends_the_default_comment(driver, recorder, clock, comment):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))

    driver.run(driver.refund(tx, "r", comment))

    assert body_of(recorder.last[0]) == {"comment": cheers.ASSUMED_DEFAULT_REFUND_COMMENT}


def test_capabilities_declare_the_lifecycle_mapping():
    capabilities = CheersDriver.capabilities
    assert capabilities.remote == {"preview", "update", "finalize", "cancel", "refund"}
    assert capabilities.local == {"begin_payment"}
    assert dict(capabilities.deferred) == {"expire": ("release",)}
    assert capabilities.payment_types == {"SPLIT_PAYMENT", "CREDIT", "EXTERNAL_PAYMENT"}
    assert capabilities.timers.preview_ttl == cheers.ASSUMED_PREVIEW_LIFETIME == timedelta(minutes=10)
    assert capabilities.timers.update_extension == timedelta(minutes=10)
    assert capabilities.timers.refund_window == timedelta(hours=24)


# --- money on the wire -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "wire"),
    [
        (Money(50000, "HUF"), 500),
        (Money(1200, "EUR"), 12),
        (Money(500, "JPY"), 500),
        (Money(3000, "KWD"), 3),
        (Money(0, "HUF"), 0),
    ],
)
def test_whole_units_on_the_wire(price, wire):
    assert cheers.whole_units(price) == wire
    assert cheers.money_of(wire, price.currency, "unitPrice") == price


@pytest.mark.parametrize("price", [Money(50050, "HUF"), Money(1234, "EUR"), Money(3001, "KWD")])
def test_fractional_amounts_are_refused_before_any_request(driver, recorder, clock, price):
    item = LineItem(BEER_ID, "Draft Beer 0.5L", 1, price, 27)
    with pytest.raises(ValidationError, match="whole"):
        driver.preview(preview_request(clock, (item,)))
    assert recorder.exchanges == []


def test_fractional_vat_is_refused_before_any_request(driver, recorder, clock):
    item = LineItem(BEER_ID, "Draft Beer 0.5L", 1, huf(500), Decimal("5.5"))
    with pytest.raises(ValidationError, match="integer percent"):
        driver.preview(preview_request(clock, (item,)))
    assert recorder.exchanges == []


def test_an_update_with_a_fractional_fee_is_refused_before_any_request(driver, recorder, clock):
    tx = previewed(driver, clock)
    fee = LineItem(None, "Service fee", 1, Money(950, "HUF"), 27)
    with pytest.raises(ValidationError, match="whole"):
        driver.update(tx, (fee,), "u")
    assert len(recorder.exchanges) == 1  # the preview only


# --- caller input is validated before anything is sent ------------------------------------


@pytest.mark.parametrize(
    "key",
    [None, "5ccd7850844b415091071c027930101", "5ccd7850844b415091071c027930101fa",
     "5ccd7850844b415091071c02793010zz", "5ccd7850-844b-4150-9107-1c027930101f"],
)
def test_a_malformed_transaction_key_is_refused_without_echoing_it(driver, recorder, clock, key):
    with pytest.raises(ValidationError) as refused:
        driver.preview(preview_request(clock, key=key))
    if key:
        assert key not in str(refused.value)
    assert recorder.exchanges == []


@pytest.mark.parametrize("idempotency_key", ["", "x" * 256, " padded", "padded ", "naïve", "tab\there"])
def test_a_bad_idempotency_key_is_refused_before_any_request(driver, recorder, clock, idempotency_key):
    with pytest.raises(ValidationError, match="idempotency key"):
        driver.preview(preview_request(clock, idempotency_key=idempotency_key))
    assert recorder.exchanges == []


@pytest.mark.parametrize("idempotency_key", ["k", "k" * 255, "order 42 / till 3"])
def test_printable_idempotency_keys_are_sent_verbatim(driver, recorder, clock, idempotency_key):
    driver.run(driver.preview(preview_request(clock, idempotency_key=idempotency_key)))
    assert recorder.last[0].headers["X-Idempotency-Key"] == idempotency_key


def test_an_unknown_payment_type_is_refused_before_any_request(driver, recorder, clock):
    with pytest.raises(ValidationError, match="payment types"):
        driver.preview(preview_request(clock, payment_type="CASH"))
    assert recorder.exchanges == []


def test_update_lines_in_another_currency_are_refused(driver, recorder, clock):
    tx = previewed(driver, clock)
    with pytest.raises(ValidationError, match="EUR"):
        driver.update(tx, (LineItem(None, "Tip", 1, Money(100, "EUR"), 0),), "u")
    with pytest.raises(ValidationError, match="at least one"):
        driver.update(tx, (), "u")
    assert len(recorder.exchanges) == 1


# --- documented business errors ----------------------------------------------------------


def test_credit_without_enough_credits_tells_the_cashier_to_retry_with_external_payment(
    driver, recorder, sandbox, clock
):
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock, payment_type="CREDIT")))

    assert refused.value.code == "INSUFFICIENT_CREDIT"
    assert "EXTERNAL_PAYMENT" in str(refused.value)
    assert recorder.last[1].status_code == cheers.ASSUMED_ERROR_STATUS["INSUFFICIENT_CREDIT"]
    assert len(recorder.exchanges) == 1  # never retried silently
    assert not sandbox.transaction_key_used(SEED_TRANSACTION_KEY)

    # The POS offers the fallback: the same QR, EXTERNAL_PAYMENT, a new idempotency key.
    quote = driver.run(driver.preview(
        preview_request(clock, payment_type="EXTERNAL_PAYMENT", idempotency_key="retry-external")
    ))
    (line,) = quote.lines
    assert (line.discount, line.credits, line.outstanding) == (huf(600), huf(0), huf(900))
    assert body_of(recorder.last[0])["paymentType"] == "EXTERNAL_PAYMENT"
    assert sandbox.transaction_key_used(SEED_TRANSACTION_KEY)


def test_credit_with_enough_credits_covers_the_whole_basket(driver, sandbox, clock):
    sandbox.add_wallet("rich", credits=5000)
    key = sandbox.issue_transaction_key("rich")
    quote = driver.run(driver.preview(preview_request(clock, key=key, payment_type="CREDIT")))
    (line,) = quote.lines
    assert (line.discount, line.credits, line.outstanding) == (huf(600), huf(900), huf(0))


def test_refund_after_24_hours_is_refused_with_the_documented_code(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    clock.advance(cheers.REFUND_WINDOW)

    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.refund(tx, "r", "too late"))

    assert refused.value.code == "CREDIT_TRANSACTION_CAN_NO_LONGER_BE_REFUNDED_BY_EXTERNAL_DEVICE"
    assert "24 hours" in str(refused.value)
    assert recorder.last[1].status_code == cheers.ASSUMED_ERROR_STATUS[refused.value.code]
    assert sandbox.wallet_balance("guest") == 0


def test_refund_just_inside_24_hours_returns_the_credits(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    clock.advance(cheers.REFUND_WINDOW - timedelta(microseconds=1))

    driver.run(driver.refund(tx, "r", "just in time"))

    assert sandbox.wallet_balance("guest") == 800


# --- assumed error codes: each one is a ProviderRejected with its code and status --------


def _second_preview_same_key(driver, clock):
    previewed(driver, clock)
    driver.run(driver.preview(preview_request(clock, idempotency_key="another")))


def _unknown_key(driver, clock):
    driver.run(driver.preview(preview_request(clock, key="0" * 32)))


def _expired_key(driver, clock, sandbox):
    key = sandbox.issue_transaction_key("guest", valid_for=timedelta(minutes=1))
    clock.advance(minutes=1)
    driver.run(driver.preview(preview_request(clock, key=key)))


def _idempotency_conflict(driver, clock):
    previewed(driver, clock)
    driver.run(driver.preview(preview_request(clock, items=(BEERS, TIP))))


def _finalize_unknown(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(Transaction(**{**_fields(tx), "provider_ref": "nope"}), "f"))


def _finalize_expired(driver, clock):
    tx = previewed(driver, clock)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    driver.run(driver.finalize(tx, "f"))


def _finalize_cancelled(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.cancel(tx, "c"))
    driver.run(driver.finalize(tx, "f"))


def _cancel_finalized(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    driver.run(driver.cancel(tx, "c"))


def _update_finalized(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    driver.run(driver.update(tx, (TIP,), "u"))


def _update_expired(driver, clock):
    tx = previewed(driver, clock)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    driver.run(driver.update(tx, (TIP,), "u"))


def _refund_unfinalized(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.refund(tx, "r", "no"))


def _refund_cancelled(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.cancel(tx, "c"))
    driver.run(driver.refund(tx, "r", "no"))


def _finalize_refunded(driver, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    driver.run(driver.refund(tx, "r", "back"))
    driver.run(driver.finalize(tx, "f"))


def _fields(tx: Transaction) -> dict:
    return {field: getattr(tx, field) for field in (
        "id", "provider", "state", "items", "currency", "provider_ref", "created_at", "updated_at")}


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        (_second_preview_same_key, "TRANSACTION_KEY_ALREADY_USED"),
        (_unknown_key, "TRANSACTION_KEY_NOT_FOUND"),
        (_expired_key, "TRANSACTION_KEY_EXPIRED"),
        (_idempotency_conflict, "IDEMPOTENCY_KEY_CONFLICT"),
        (_finalize_unknown, "CREDIT_TRANSACTION_NOT_FOUND"),
        (_finalize_expired, "CREDIT_TRANSACTION_EXPIRED"),
        (_finalize_cancelled, "CREDIT_TRANSACTION_ALREADY_CANCELLED"),
        (_cancel_finalized, "CREDIT_TRANSACTION_ALREADY_FINALIZED"),
        (_update_finalized, "CREDIT_TRANSACTION_ALREADY_FINALIZED"),
        (_update_expired, "CREDIT_TRANSACTION_EXPIRED"),
        (_refund_unfinalized, "CREDIT_TRANSACTION_NOT_FINALIZED"),
        (_refund_cancelled, "CREDIT_TRANSACTION_ALREADY_CANCELLED"),
        (_finalize_refunded, "CREDIT_TRANSACTION_ALREADY_REFUNDED"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__.strip("_"),
)
def test_each_error_code_is_a_rejection_with_its_code_and_assumed_status(
    driver, recorder, sandbox, clock, scenario, code
):
    arguments = (driver, clock, sandbox) if scenario is _expired_key else (driver, clock)
    with pytest.raises(ProviderRejected) as refused:
        scenario(*arguments)
    assert refused.value.code == code
    assert refused.value.provider == "cheers"
    assert str(refused.value) == f"[{code}] {cheers.CASHIER_MESSAGES[code]}"
    assert recorder.last[1].status_code == cheers.ASSUMED_ERROR_STATUS[code]
    assert body_of(recorder.last[1])["code"] == code


def test_an_unknown_api_key_is_unauthorized(recorder, clock):
    driver = CheersDriver(environment="sandbox", api_key="not-a-terminal", transport=recorder)
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert refused.value.code == "UNAUTHORIZED"
    assert recorder.last[1].status_code == cheers.ASSUMED_ERROR_STATUS["UNAUTHORIZED"] == 401
    assert "not-a-terminal" not in str(refused.value)


# --- error bodies the driver must read (hand-made answers) ---------------------------------


def driver_answering(status: int, body: bytes, headers: dict | None = None) -> CheersDriver:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers or {})

    return CheersDriver(environment="sandbox", api_key="terminal", transport=httpx.MockTransport(answer))


def rejection(driver, clock) -> ProviderRejected:
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    return refused.value


def test_the_nested_error_envelope_is_read_too(clock):
    body = json.dumps({"error": {"code": "INSUFFICIENT_CREDIT", "message": "no"}}).encode()
    assert rejection(driver_answering(422, body), clock).code == "INSUFFICIENT_CREDIT"


def test_an_unknown_code_shows_the_providers_message_without_qr_keys(clock):
    message = f"Wallet locked for key {SEED_TRANSACTION_KEY}, call support"
    body = json.dumps({"code": "WALLET_LOCKED", "message": message}).encode()
    refused = rejection(driver_answering(403, body), clock)
    assert refused.code == "WALLET_LOCKED"
    assert "Wallet locked for key ***, call support" in str(refused)
    assert SEED_TRANSACTION_KEY not in str(refused)


@pytest.mark.parametrize("body", [b"", b"<html>Forbidden</html>", b'{"message": "no"}', b"[1]"])
def test_a_4xx_without_a_readable_code_is_a_rejection_named_by_its_status(clock, body):
    refused = rejection(driver_answering(403, body), clock)
    assert refused.code == "HTTP_403"


def test_too_many_requests_carries_retry_after(clock):
    body = json.dumps({"code": "RATE_LIMITED", "message": "slow down"}).encode()
    refused = rejection(driver_answering(429, body, {"Retry-After": "7"}), clock)
    assert (refused.code, refused.retry_after) == ("RATE_LIMITED", 7.0)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"code": "INTERNAL"}'),
        (502, b"<html>Bad Gateway</html>"),
        (503, b""),
        (408, b'{"code": "TIMEOUT"}'),
        (302, b""),
        (200, b"<html>ok</html>"),
        (200, b'{"transactionId": "b04ce0c0'),
        (200, b"[]"),
    ],
)
def test_answers_that_may_hide_a_commit_are_unknown(clock, status, body):
    driver = driver_answering(status, body)
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.preview(preview_request(clock)))


def _seed_answer(**changes) -> dict:
    answer = json.loads(SEED_PREVIEW_RESPONSE)
    line_changes = changes.pop("line", {})
    answer["items"][0].update(line_changes)
    answer.update(changes)
    return answer


@pytest.mark.parametrize(
    "answer",
    [
        _seed_answer(line={"credits": 900}, totalCredits=900),  # parts exceed the gross
        _seed_answer(totalCredits=700),  # totals are not the sum of the lines
        _seed_answer(outstandingBalance=0),
        _seed_answer(currencyCode="EUR"),
        _seed_answer(line={"unitPrice": 400}),  # not the line we sent
        _seed_answer(line={"quantity": 2}),
        _seed_answer(line={"productId": "other"}),
        _seed_answer(line={"discount": 600.5, "outstandingBalance": 99.5}),  # not whole units
        _seed_answer(line={"discount": -100, "outstandingBalance": 800}, totalDiscount=-100),
        _seed_answer(line={"credits": "800"}),
        _seed_answer(items=[]),
        _seed_answer(transactionId=None),
        {key: value for key, value in _seed_answer().items() if key != "outstandingBalance"},
    ],
)
def test_a_priced_basket_that_does_not_add_up_is_a_protocol_error(clock, answer):
    driver = driver_answering(200, json.dumps(answer).encode())
    with pytest.raises(ProtocolError):
        driver.run(driver.preview(preview_request(clock)))


def test_integral_floats_in_an_answer_are_accepted(clock):
    answer = _seed_answer(line={"discount": 600.0}, totalDiscount=600.0)
    driver = driver_answering(200, json.dumps(answer).encode())
    (line,) = driver.run(driver.preview(preview_request(clock))).lines
    assert line.discount == huf(600)


def test_an_update_answer_for_another_transaction_is_a_protocol_error(clock):
    answer = json.loads(SEED_UPDATE_RESPONSE)
    answer["transactionId"] = "someone-else"
    driver = driver_answering(200, json.dumps(answer).encode())
    tx = snapshot(_seed_quote(), clock)
    with pytest.raises(ProtocolError, match="transactionId does not match"):
        driver.run(driver.update(tx, (SERVICE_FEE, TIP), "u"))


def _seed_quote() -> Quote:
    driver = driver_answering(200, SEED_PREVIEW_RESPONSE.encode())
    return driver.run(driver.preview(preview_request(FakeClock())))


@pytest.mark.parametrize(
    "answer",
    [
        {"transactionId": "someone-else"},
        {"transactionId": SEED_TRANSACTION_ID, "totalCredits": 700},
        {"transactionId": SEED_TRANSACTION_ID, "totalCredits": "800"},
    ],
)
def test_a_finalize_answer_that_contradicts_the_basket_is_a_protocol_error(clock, answer):
    driver = driver_answering(200, json.dumps(answer).encode())
    with pytest.raises(ProtocolError):
        driver.run(driver.finalize(snapshot(_seed_quote(), clock), "f"))


@pytest.mark.parametrize("operation", ["finalize", "cancel", "refund"])
def test_command_answers_carry_the_fields_the_driver_reads(driver, recorder, clock, operation):
    exchange = _operation(driver, clock, operation)
    driver.run(exchange)
    answer = body_of(recorder.last[1])
    assert set(cheers.ASSUMED_COMMAND_ANSWER) <= set(answer)
    assert answer == {**json.loads(SEED_PREVIEW_RESPONSE)}


@pytest.mark.parametrize("status", [200, 204])
def test_an_empty_2xx_answer_to_a_command_proves_nothing_and_is_unknown(clock, status):
    driver = driver_answering(status, b"")
    with pytest.raises(ProtocolError):
        driver.run(driver.finalize(snapshot(_seed_quote(), clock), "f"))


@pytest.mark.parametrize(
    ("operation", "code"),
    [
        ("finalize", "CREDIT_TRANSACTION_ALREADY_FINALIZED"),
        ("cancel", "CREDIT_TRANSACTION_ALREADY_CANCELLED"),
        ("cancel", "CREDIT_TRANSACTION_EXPIRED"),
        ("refund", "CREDIT_TRANSACTION_ALREADY_REFUNDED"),
    ],
)
def test_already_in_the_target_state_is_success(clock, operation, code):
    """Should Cheers answer a repeat with an error instead of replaying, it is still done."""
    body = json.dumps({"code": code, "message": "already"}).encode()
    driver = driver_answering(cheers.ASSUMED_ERROR_STATUS[code], body)
    tx = snapshot(_seed_quote(), clock)
    run = driver.refund(tx, "r", "c") if operation == "refund" else getattr(driver, operation)(tx, "k")
    outcome = driver.run(run)
    assert outcome.provider_ref == SEED_TRANSACTION_ID
    assert outcome.details == {f"cheers_{operation}": code}


# --- faults: unknown outcomes, safe retries, and the one unsafe call ------------------------

UNKNOWN_FAULTS = [
    Fault.SERVER_ERROR,
    Fault.GARBAGE_AFTER_COMMIT,
    Fault.TRUNCATED_AFTER_COMMIT,
    Fault.TIMEOUT_BEFORE_COMMIT,
    Fault.TIMEOUT_AFTER_COMMIT,
    Fault.DROP_CONNECTION,
]


def _operation(driver, clock, operation: str):
    if operation == "preview":
        return driver.preview(preview_request(clock))
    tx = previewed(driver, clock)
    if operation == "update":
        return driver.update(tx, (TIP,), "u")
    if operation == "refund":
        driver.run(driver.finalize(tx, "f"))
        return driver.refund(tx, "r", "c")
    return getattr(driver, operation)(tx, "k")


@pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda fault: fault.value)
@pytest.mark.parametrize("operation", ["preview", "update", "finalize", "cancel", "refund"])
def test_every_fault_on_every_call_is_an_unknown_outcome(driver, sandbox, clock, operation, fault):
    exchange = _operation(driver, clock, operation)
    # Safe calls are re-sent once inline, so the fault must hold for both attempts.
    sandbox.faults.inject(operation, fault, times=2)
    with pytest.raises(OutcomeUnknown) as unknown:
        driver.run(exchange)
    assert unknown.value.provider == "cheers"
    assert DEFAULT_API_KEY not in str(unknown.value)
    assert SEED_TRANSACTION_KEY not in str(unknown.value)


@pytest.mark.parametrize("operation", ["preview", *sorted(cheers.ASSUMED_REPLAYED_COMMANDS)])
def test_a_lost_answer_on_a_safe_call_is_resent_once_and_lands_once(driver, sandbox, clock, operation):
    exchange = _operation(driver, clock, operation)
    sandbox.faults.inject(operation, Fault.TIMEOUT_AFTER_COMMIT)
    sent_before = len(sandbox.requests)

    driver.run(exchange)

    assert len(sandbox.requests) - sent_before == 2
    assert len(sandbox.transactions()) == 1
    expected = {"preview": 0, "finalize": 0, "cancel": 800, "refund": 800}[operation]
    assert sandbox.wallet_available("guest") == expected
    assert [entry.kind for entry in sandbox.ledger] == {
        "preview": [], "finalize": ["finalize"], "cancel": [], "refund": ["finalize", "refund"],
    }[operation]


def test_a_lost_update_answer_is_not_resent_and_its_resend_is_refused(driver, sandbox, clock):
    tx = previewed(driver, clock)
    sandbox.faults.inject("update", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.update(tx, (TIP,), "u"))
    assert [request.path.rsplit("/", 1)[-1] for request in sandbox.requests] == ["preview", "update"]

    # The engine's recovery re-sends it: Cheers now holds the tip twice.
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.update(tx, (TIP,), "u"))
    assert refused.value.code == "UPDATE_APPLIED_TWICE"
    assert "Cancel this payment" in str(refused.value)
    # Cancelling still leaves the customer's credits untouched.
    driver.run(driver.cancel(tx, "c"))
    assert sandbox.wallet_balance("guest") == sandbox.wallet_available("guest") == 800


def test_an_update_lost_before_it_landed_can_be_resent(driver, sandbox, clock):
    tx = previewed(driver, clock)
    sandbox.faults.inject("update", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.update(tx, (TIP,), "u"))

    quote = driver.run(driver.update(tx, (TIP,), "u"))

    assert [line.name for line in quote.lines] == ["Draft Beer 0.5L", "Tip"]


# --- the release delivery that follows a local expiry ----------------------------------------


def release(tx: Transaction, driver: CheersDriver, attempts: int = 0) -> Delivery:
    return Delivery(
        id=1, tx_id=tx.id, provider="cheers", kind="release",
        payload=driver.delivery_payload("release", tx), idempotency_key=f"release-{tx.id}",
        attempts=attempts,
    )


def test_the_release_payload_is_json_and_carries_no_secret(driver, clock):
    tx = previewed(driver, clock)
    payload = driver.delivery_payload("release", tx)
    assert payload == {"transactionId": SEED_TRANSACTION_ID, "currencyCode": "HUF"}
    assert json.loads(json.dumps(payload)) == payload


def test_release_cancels_the_preview_and_frees_its_credits(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    assert sandbox.wallet_available("guest") == 0

    driver.run(driver.deliver((release(tx, driver),)))

    request, _ = recorder.last
    assert request.url.path == f"/v1/integrations/credit-transactions/{SEED_TRANSACTION_ID}/cancel"
    assert sandbox.status(SEED_TRANSACTION_ID) == "CANCELLED"
    assert sandbox.wallet_available("guest") == sandbox.wallet_balance("guest") == 800


def test_release_of_a_preview_already_expired_at_cheers_is_done_and_redelivery_is_a_no_op(
    driver, recorder, sandbox, clock
):
    tx = previewed(driver, clock)
    clock.advance(cheers.ASSUMED_PREVIEW_LIFETIME)
    assert sandbox.status(SEED_TRANSACTION_ID) == "EXPIRED"

    driver.run(driver.deliver((release(tx, driver),)))
    driver.run(driver.deliver((release(tx, driver, attempts=1),)))

    assert recorder.last[1].status_code == cheers.ASSUMED_ERROR_STATUS["CREDIT_TRANSACTION_EXPIRED"]
    assert sandbox.status(SEED_TRANSACTION_ID) == "EXPIRED"
    assert sandbox.wallet_available("guest") == 800


def test_release_twice_is_idempotent(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.deliver((release(tx, driver),)))
    driver.run(driver.deliver((release(tx, driver, attempts=1),)))
    assert sandbox.status(SEED_TRANSACTION_ID) == "CANCELLED"


def test_release_of_a_finalized_transaction_is_refused(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.deliver((release(tx, driver),)))
    assert refused.value.code == "CREDIT_TRANSACTION_ALREADY_FINALIZED"
    assert sandbox.wallet_balance("guest") == 0


def test_unknown_delivery_kinds_are_refused(driver, clock):
    tx = previewed(driver, clock)
    with pytest.raises(ValueError):
        driver.delivery_payload("submit", tx)


# --- the same session over every transport ----------------------------------------------------


def _session_steps(driver: CheersDriver, clock):
    """preview -> update -> finalize -> refund, as exchanges, checking each answer."""
    quote = yield driver.preview(preview_request(clock))
    assert [line.credits for line in quote.lines] == [huf(800)]
    tx = snapshot(quote, clock)
    quote = yield driver.update(tx, (SERVICE_FEE, TIP), "u")
    assert sum((line.outstanding for line in quote.lines), huf(0)) == huf(209)
    tx = snapshot(quote, clock, state="updated")
    outcome = yield driver.finalize(tx, "f")
    assert outcome.provider_ref == SEED_TRANSACTION_ID
    yield driver.refund(tx, "r", "Customer returned the order")


def run_session(driver: CheersDriver, clock) -> None:
    steps = _session_steps(driver, clock)
    exchange = next(steps)
    try:
        while True:
            exchange = steps.send(driver.run(exchange))
    except StopIteration:
        pass


async def arun_session(driver: CheersDriver, clock) -> None:
    steps = _session_steps(driver, clock)
    exchange = next(steps)
    try:
        while True:
            exchange = steps.send(await driver.arun(exchange))
    except StopIteration:
        pass


def _check_session_ledger(sandbox: CheersSandbox) -> None:
    assert [(entry.kind, entry.credits) for entry in sandbox.ledger] == [("finalize", 800), ("refund", 800)]
    assert sandbox.wallet_balance("guest") == 800
    assert sandbox.transaction(SEED_TRANSACTION_ID).refund_comment == "Customer returned the order"


def test_session_in_process_sync(driver, sandbox, clock):
    run_session(driver, clock)
    _check_session_ledger(sandbox)


async def test_session_in_process_async(driver, sandbox, clock):
    await arun_session(driver, clock)
    await driver.aclose()
    _check_session_ledger(sandbox)


async def test_session_async_through_asgi(sandbox, clock):
    driver = CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, async_transport=sandbox.asgi_transport())
    await arun_session(driver, clock)
    await driver.aclose()
    _check_session_ledger(sandbox)


def test_session_over_a_loopback_socket(sandbox, clock):
    with serve(sandbox) as served:
        driver = CheersDriver(api_key=DEFAULT_API_KEY, base_url=served.base_url, timeout=5)
        try:
            run_session(driver, clock)
        finally:
            driver.close()
    _check_session_ledger(sandbox)


async def test_session_over_a_loopback_socket_async(sandbox, clock):
    with serve(sandbox) as served:
        driver = CheersDriver(api_key=DEFAULT_API_KEY, base_url=served.base_url, timeout=5)
        try:
            await arun_session(driver, clock)
        finally:
            await driver.aclose()
    _check_session_ledger(sandbox)


@pytest.mark.parametrize("fault", [Fault.DROP_CONNECTION, Fault.SERVER_ERROR, Fault.TRUNCATED_AFTER_COMMIT])
def test_a_fault_over_a_socket_is_unknown_and_the_resend_lands_once(sandbox, clock, fault):
    with serve(sandbox) as served:
        driver = CheersDriver(api_key=DEFAULT_API_KEY, base_url=served.base_url, timeout=5)
        try:
            tx = previewed(driver, clock)
            # uvicorn answers a dropped connection with a 500 (no inline re-send then),
            # so the fault is armed for both possible attempts.
            sandbox.faults.inject("finalize", fault, times=2)
            with pytest.raises(OutcomeUnknown):
                driver.run(driver.finalize(tx, "f"))
            sandbox.faults.clear()
            driver.run(driver.finalize(tx, "f"))
        finally:
            driver.close()
    assert [entry.kind for entry in sandbox.ledger] == ["finalize"]
    assert sandbox.wallet_balance("guest") == 0


# --- base URLs and secrets ----------------------------------------------------------------------


def test_the_sandbox_environment_is_the_documented_sandbox_host():
    assert CheersDriver(environment="sandbox", api_key="k").base_url == "https://api.dev.votesess.com"
    assert cheers.PRODUCTION_BASE_URL == "https://api.uniqpon.com"
    assert CheersDriver(api_key="k", base_url=cheers.PRODUCTION_BASE_URL).base_url == "https://api.uniqpon.com"


@pytest.mark.parametrize("url", ["http://api.uniqpon.com", "http://10.0.0.5:8080", "ftp://api.uniqpon.com"])
def test_plain_http_is_refused_off_loopback(url):
    with pytest.raises(ValidationError):
        CheersDriver(api_key="k", base_url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:9000", "http://[::1]:8000"])
def test_plain_http_is_allowed_on_loopback(url):
    assert CheersDriver(api_key="k", base_url=url).base_url == url


@pytest.mark.parametrize("api_key", ["", "has space", None, 42])
def test_a_bad_api_key_is_refused(api_key):
    with pytest.raises(ValidationError):
        CheersDriver(environment="sandbox", api_key=api_key)


def test_secrets_stay_out_of_reprs_errors_and_quotes(driver, recorder, clock):
    assert DEFAULT_API_KEY not in repr(driver)
    assert DEFAULT_API_KEY not in repr(vars(driver))
    quote = driver.run(driver.preview(preview_request(clock)))
    for text in (repr(quote), repr(quote.details), repr(quote.receipt)):
        assert SEED_TRANSACTION_KEY not in text
        assert DEFAULT_API_KEY not in text
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock, idempotency_key="again")))
    assert SEED_TRANSACTION_KEY not in str(refused.value)
    assert DEFAULT_API_KEY not in str(refused.value)
    assert SEED_TRANSACTION_KEY not in repr(preview_request(clock))
