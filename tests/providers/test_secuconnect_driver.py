"""secuconnect driver: the lifecycle mapping, credit spreading, tokens, error mapping,
faults, validation, transports and secrets, against the sandbox.

The seed's exchange field by field is in ``test_secuconnect_contract.py``; the
sandbox's own business rules over raw HTTP in ``test_secuconnect_sandbox.py``; full POS
sessions through the engine in ``test_secuconnect_engine.py``.
"""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest

from txengine.drivers import Delivery, PreviewRequest
from txengine.errors import OutcomeUnknown, ProtocolError, ProviderRejected, ValidationError
from txengine.models import Basket, LineItem, PricedLine, Quote, Transaction
from txengine.money import Money
from txengine.secret import Secret
from txengine.testing.sandbox import Fault, RecordingTransport, serve
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
from txengine.providers.secuconnect import driver as secu
from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ERRORS

CARD = "9276000000000017"
POOR_CARD = "9276000000000025"
MASKED = "************0017"

SANDWICH = LineItem("30037", "Sandwich Romano", 1, Money(349, "EUR"), 7)
FRUIT_SALAD = LineItem("30200", "Fruit salad, small bowl", 1, Money(249, "EUR"), 7)
WATER = LineItem("51", "Water, mildly sprinkling, 0.25 ltr.", 2, Money(99, "EUR"), 19)
TIP = LineItem(None, "Tip", 1, Money(100, "EUR"), 0)
BASKET = (SANDWICH, FRUIT_SALAD, WATER)  # 796


def sent_calls(recorder: RecordingTransport) -> list[tuple[str, str]]:
    """(method, last path segments) of every request sent, tokens included."""
    return [(request.method, _short(request.url.path)) for request in recorder.requests]


def _short(path: str) -> str:
    if path == secu.TOKEN_PATH:
        return "token"
    tail = path.removeprefix(secu.TRANSACTIONS_PATH).strip("/").split("/")
    return "/".join(["stx", *tail[1:]]) if tail[0] else "create"


@pytest.fixture
def sandbox(clock) -> SecuconnectSandbox:
    sandbox = SecuconnectSandbox(clock, demo=False)
    sandbox.add_card(CARD, cash_balance=1000)
    sandbox.add_card(POOR_CARD, cash_balance=500)
    return sandbox


@pytest.fixture
def recorder(sandbox) -> RecordingTransport:
    return sandbox.recording_transport()


@pytest.fixture
def driver(recorder, clock) -> SecuconnectDriver:
    return SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                             transport=recorder)


def preview_request(clock, items=BASKET, *, card: str | None = CARD,
                    payment_type="SPLIT_PAYMENT") -> PreviewRequest:
    return PreviewRequest(tx_id="tx-1", basket=Basket(items), customer_token=Secret(card) if card else None,
                          payment_type=payment_type, idempotency_key="k", now=clock.now())


def snapshot(quote: Quote, clock, payment_type="SPLIT_PAYMENT") -> Transaction:
    now = clock.now()
    return Transaction(id="tx-1", provider="secuconnect", state="previewed", items=quote.lines, currency="EUR",
                       payment_type=payment_type, provider_ref=quote.provider_ref, details=quote.details,
                       created_at=now, updated_at=now)


def previewed(driver, clock, **kwargs) -> Transaction:
    payment_type = kwargs.get("payment_type", "SPLIT_PAYMENT")
    return snapshot(driver.run(driver.preview(preview_request(clock, **kwargs))), clock, payment_type)


def parts(tx_or_quote) -> list[tuple[int, int]]:
    lines = tx_or_quote.items if isinstance(tx_or_quote, Transaction) else tx_or_quote.lines
    return [(line.credits.amount_minor, line.outstanding.amount_minor) for line in lines]


# --- the lifecycle mapping ----------------------------------------------------------------------------


def test_capabilities_declare_the_mapping():
    capabilities = SecuconnectDriver.capabilities
    assert capabilities.remote == {"preview", "update", "finalize", "cancel", "refund"}
    assert capabilities.local == {"begin_payment"}
    assert dict(capabilities.deferred) == {"expire": ("release",)}
    assert capabilities.payment_types == {"SPLIT_PAYMENT", "EXTERNAL_PAYMENT"}
    assert capabilities.timers.preview_ttl == secu.ASSUMED_PREVIEW_TTL == timedelta(minutes=10)
    assert capabilities.timers.update_extension == secu.ASSUMED_UPDATE_EXTENSION
    assert capabilities.timers.refund_window == secu.ASSUMED_REFUND_WINDOW == timedelta(hours=24)
    # The provider keeps an un-started transaction longer than the engine honours a preview.
    assert secu.ASSUMED_SMART_TRANSACTION_LIFETIME > secu.ASSUMED_PREVIEW_TTL
    assert SecuconnectDriver.environments["sandbox"] == "https://connect-testing.secuconnect.com"


def test_a_partly_covered_basket_spreads_the_balance_over_the_lines_in_basket_order(driver, clock):
    quote = driver.run(driver.preview(preview_request(clock, card=POOR_CARD)))
    assert parts(quote) == [(349, 0), (151, 98), (0, 198)]
    assert quote.details["missing_sum"] == 296
    for line in quote.lines:
        assert line.gross == line.discount + line.credits + line.outstanding
        assert line.discount.amount_minor == 0


def test_an_empty_card_leaves_everything_outstanding(driver, sandbox, clock):
    sandbox.add_card("9276000000000033", cash_balance=0)
    quote = driver.run(driver.preview(preview_request(clock, card="9276000000000033")))
    assert parts(quote) == [(0, 349), (0, 249), (0, 198)]


def test_finalize_covered_by_the_card_starts_loyalty_and_redeems_the_sum(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    outcome = driver.run(driver.finalize(tx, "f"))

    assert sent_calls(recorder)[-2:] == [("GET", "stx"), ("POST", "stx/start/loyalty")]
    assert sandbox.card_balance(CARD) == 204
    assert outcome.provider_ref == tx.provider_ref
    assert outcome.details["payment_method"] == "loyalty"
    assert outcome.details["loyalty_transaction_id"].startswith("LTX_")
    assert outcome.details["trans_id"] == sandbox.smart_transaction(tx.provider_ref)["trans_id"]
    texts = [line.text for line in outcome.receipt if line.kind == "textline"]
    assert texts == ["Umsatz erfasst:", "7,96 EUR", "Guthaben eingelöst:", "7,96 EUR",
                     "Aktuelles Guthaben", "2,04 EUR"]
    assert outcome.receipt[1].value == MASKED


def test_finalize_with_a_missing_sum_starts_cash_and_redeems_the_whole_balance(driver, recorder, sandbox,
                                                                               clock):
    tx = previewed(driver, clock, card=POOR_CARD)
    outcome = driver.run(driver.finalize(tx, "f"))

    assert sent_calls(recorder)[-1] == ("POST", "stx/start/cash")
    assert sandbox.card_balance(POOR_CARD) == 0
    assert outcome.details["payment_method"] == "cash"
    assert outcome.details["missing_sum"] == 296


def test_update_puts_the_whole_basket_and_applies_the_balance_again(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock, card=POOR_CARD)
    before = len(recorder.requests)
    quote = driver.run(driver.update(tx, (TIP,), "u"))

    put, pre = recorder.requests[before:]
    assert (put.method, _short(put.url.path)) == ("PUT", "stx")
    assert json.loads(put.content) == {
        "basket": {"products": [
            {"id": 1, "articleNumber": "30037", "ean": "", "desc": "Sandwich Romano", "quantity": 1,
             "priceOne": 349, "tax": 7},
            {"id": 2, "articleNumber": "30200", "ean": "", "desc": "Fruit salad, small bowl", "quantity": 1,
             "priceOne": 249, "tax": 7},
            {"id": 3, "articleNumber": "51", "ean": "", "desc": "Water, mildly sprinkling, 0.25 ltr.",
             "quantity": 2, "priceOne": 99, "tax": 19},
            {"id": 4, "articleNumber": "", "ean": "", "desc": "Tip", "quantity": 1, "priceOne": 100, "tax": 0},
        ]},
        "basket_info": {"sum": 896, "currency": "EUR"},
    }  # no idents: the card stays on the transaction and its number is not kept by us
    assert (pre.method, _short(pre.url.path)) == ("POST", "stx/preTransaction")
    assert [line.item for line in quote.lines] == [*BASKET, TIP]
    assert parts(quote) == [(349, 0), (151, 98), (0, 198), (0, 100)]
    assert quote.details["missing_sum"] == 396
    assert sandbox.smart_transaction(tx.provider_ref)["idents"][0]["valid"] is True


def test_an_updated_basket_finalizes_with_the_new_missing_sum(driver, sandbox, clock):
    tx = previewed(driver, clock, card=POOR_CARD)
    updated = snapshot(driver.run(driver.update(tx, (TIP,), "u")), clock)
    driver.run(driver.finalize(updated, "f"))
    booked = sandbox.smart_transaction(tx.provider_ref)
    assert booked["basket_info"] == {"sum": 896, "currency": "EUR", "gratuity": None, "missing_sum": 396}
    assert sandbox.card_balance(POOR_CARD) == 0


def test_cancel_aborts_and_nothing_is_redeemed(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    outcome = driver.run(driver.cancel(tx, "c"))
    assert sent_calls(recorder)[-1] == ("POST", "stx/abort")
    assert outcome.details == {"smart_transaction_status": "cancelled"}
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"
    assert sandbox.card_balance(CARD) == 1000 and not sandbox.loyalty_transactions


def test_refund_cancels_the_completed_transaction_and_returns_the_balance(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    clock.advance(hours=23, minutes=59)
    outcome = driver.run(driver.refund(tx, "r", "Customer returned the order"))

    assert sent_calls(recorder)[-1] == ("POST", "stx/cancel")
    assert json.loads(recorder.requests[-1].content) == {}
    assert sandbox.card_balance(CARD) == 1000
    assert outcome.details == {"smart_transaction_status": "cancelled"}
    texts = [line.text for line in outcome.receipt if line.kind == "textline"]
    assert texts[:4] == ["Storno erfasst:", "7,96 EUR", "Guthaben gutgeschrieben:", "7,96 EUR"]
    assert texts[-1] == "10,00 EUR"


def test_refund_after_the_assumed_window_is_refused(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    clock.advance(secu.ASSUMED_REFUND_WINDOW)
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.refund(tx, "r", None))
    assert refused.value.code == str(ERRORS["refund_window_closed"].code)
    assert sandbox.card_balance(CARD) == 204


def test_external_payment_records_turnover_without_applying_the_balance(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock, payment_type="EXTERNAL_PAYMENT")
    assert parts(tx) == [(0, 349), (0, 249), (0, 198)]
    assert ("POST", "stx/preTransaction") not in sent_calls(recorder)
    outcome = driver.run(driver.finalize(tx, "f"))
    assert sent_calls(recorder)[-1] == ("POST", "stx/start/cash")
    assert sandbox.card_balance(CARD) == 1000
    assert [booking.turnover for booking in sandbox.loyalty_transactions] == [796]
    updated = driver.run(driver.update(previewed(driver, clock, payment_type="EXTERNAL_PAYMENT"), (TIP,), "u"))
    assert parts(updated)[-1] == (0, 100) and sent_calls(recorder)[-1] == ("PUT", "stx")
    assert outcome.details["missing_sum"] == 0


# --- expiry: a deferred release -----------------------------------------------------------------------


def release(driver, tx, attempts=0) -> Delivery:
    return Delivery(id=1, tx_id=tx.id, provider="secuconnect", kind="release",
                    payload=driver.delivery_payload("release", tx), idempotency_key="rel", attempts=attempts)


def test_an_expired_preview_is_released_with_abort_and_redelivery_is_harmless(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    delivery = release(driver, tx)
    assert dict(delivery.payload) == {"smart_transaction_id": tx.provider_ref}
    assert json.loads(json.dumps(dict(delivery.payload))) == dict(delivery.payload)

    driver.run(driver.deliver((delivery,)))
    driver.run(driver.deliver((delivery,)))

    assert sent_calls(recorder)[-2:] == [("POST", "stx/abort"), ("POST", "stx/abort")]
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"


def test_releasing_a_transaction_the_provider_already_expired_succeeds(driver, sandbox, clock):
    tx = previewed(driver, clock)
    clock.advance(secu.ASSUMED_SMART_TRANSACTION_LIFETIME)
    driver.run(driver.deliver((release(driver, tx),)))
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"


# --- validation before any request --------------------------------------------------------------------


@pytest.mark.parametrize(
    "card", [None, "", "9276-0000-0000-0017", "927600000000001", "92760000000000170", "abcd"])
def test_a_missing_or_malformed_card_is_refused_before_any_request_without_echoing_it(driver, recorder, clock,
                                                                                       card):
    request = PreviewRequest("tx-1", Basket(BASKET), Secret(card) if card is not None else None,
                             "SPLIT_PAYMENT", "k", clock.now())
    with pytest.raises(ValidationError) as refused:
        driver.run(driver.preview(request))
    assert not recorder.requests
    if card:
        assert card not in str(refused.value)


def test_a_fractional_tax_rate_is_refused_before_any_request(driver, recorder, clock):
    item = LineItem("x", "Croissant", 1, Money(150, "EUR"), "5.5")
    with pytest.raises(ValidationError, match="integer tax"):
        driver.run(driver.preview(preview_request(clock, (item,))))
    assert not recorder.requests


def test_an_update_with_a_fractional_tax_rate_is_refused_before_any_request(driver, recorder, clock):
    tx = previewed(driver, clock)
    before = len(recorder.requests)
    with pytest.raises(ValidationError):
        driver.run(driver.update(tx, (LineItem(None, "Fee", 1, Money(10, "EUR"), "2.5"),), "u"))
    assert len(recorder.requests) == before


def test_an_unknown_payment_type_is_refused_before_any_request(driver, recorder, clock):
    with pytest.raises(ValidationError):
        driver.run(driver.preview(preview_request(clock, payment_type="CREDIT")))
    assert not recorder.requests


@pytest.mark.parametrize(("price", "currency"), [(349, "EUR"), (500, "JPY"), (1234, "KWD")])
def test_amounts_travel_as_minor_units_of_the_basket_currency(recorder, driver, clock, price, currency):
    item = LineItem("1", "Thing", 3, Money(price, currency), 7)
    quote = driver.run(driver.preview(preview_request(clock, (item,))))
    sent = json.loads(recorder.requests[1].content)
    assert sent["basket"]["products"][0]["priceOne"] == price
    assert sent["basket_info"] == {"sum": 3 * price, "currency": currency}
    assert quote.lines[0].gross == Money(3 * price, currency)


# --- tokens -----------------------------------------------------------------------------------------


def test_one_token_serves_every_call_until_shortly_before_it_expires(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    clock.advance(secu.DOCUMENTED_TOKEN_LIFETIME - secu.TOKEN_REFRESH_MARGIN - timedelta(seconds=1))
    driver.run(driver.update(tx, (TIP,), "u"))
    assert sandbox.tokens_issued == 1

    clock.advance(seconds=1)  # now inside the safety margin: refresh before calling
    driver.run(driver.cancel(tx, "c"))
    assert sandbox.tokens_issued == 2
    assert [call for call in sent_calls(recorder) if call == ("POST", "token")] == [("POST", "token")] * 2
    assert sent_calls(recorder)[-2:] == [("POST", "token"), ("POST", "stx/abort")]


def test_a_refused_token_is_replaced_once_and_the_call_resent(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    sandbox.revoke_tokens()
    driver.run(driver.cancel(tx, "c"))
    assert sent_calls(recorder)[-3:] == [("POST", "stx/abort"), ("POST", "token"), ("POST", "stx/abort")]
    assert sandbox.smart_transaction(tx.provider_ref)["status"] == "cancelled"


def test_a_token_refused_twice_is_a_rejection(clock):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == secu.TOKEN_PATH:
            return httpx.Response(200, json={"access_token": f"t{len(calls)}", "expires_in": 1200})
        return httpx.Response(401, json={"error": "invalid_token", "error_description": "The token is invalid"})

    driver = SecuconnectDriver(environment="sandbox", client_id="id", client_secret="s", clock=clock,
                               transport=httpx.MockTransport(handler))
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert refused.value.code == "invalid_token"
    assert calls == [secu.TOKEN_PATH, secu.TRANSACTIONS_PATH, secu.TOKEN_PATH, secu.TRANSACTIONS_PATH]


def test_wrong_client_credentials_are_rejected_without_echoing_the_secret(sandbox, clock):
    driver = SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret="not-the-secret-4711", clock=clock,
                               transport=sandbox.transport())
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert refused.value.code == "invalid_client"
    assert "not-the-secret-4711" not in str(refused.value)
    assert not sandbox.smart_transactions


def test_a_lost_token_answer_is_asked_again_once(driver, sandbox, clock):
    sandbox.faults.inject("token", Fault.DROP_CONNECTION)
    driver.run(driver.preview(preview_request(clock)))
    assert sandbox.tokens_issued == 1


@pytest.mark.parametrize("answer", [
    {"expires_in": 1200}, {"access_token": "", "expires_in": 1200},
    {"access_token": "t", "expires_in": "soon"}, {"access_token": "t", "expires_in": 0},
])
def test_an_unusable_token_answer_is_a_protocol_error(clock, answer):
    driver = SecuconnectDriver(environment="sandbox", client_id="id", client_secret="s", clock=clock,
                               transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer)))
    with pytest.raises(ProtocolError):
        driver.run(driver.preview(preview_request(clock)))


def test_a_token_answer_without_expires_in_lives_the_documented_1200_seconds(clock):
    tokens = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == secu.TOKEN_PATH:
            tokens.append(request)
            return httpx.Response(200, json={"access_token": "t"})
        return httpx.Response(200, json={"id": "STX_1", "status": "cancelled"})

    driver = SecuconnectDriver(environment="sandbox", client_id="id", client_secret="s", clock=clock,
                               transport=httpx.MockTransport(handler))
    tx = snapshot(Quote([PricedLine.unpriced(SANDWICH)], provider_ref="STX_1"), clock)
    driver.run(driver.cancel(tx, "c"))
    clock.advance(timedelta(seconds=1200) - secu.TOKEN_REFRESH_MARGIN - timedelta(seconds=1))
    driver.run(driver.cancel(tx, "c"))
    assert len(tokens) == 1
    clock.advance(seconds=1)
    driver.run(driver.cancel(tx, "c"))
    assert len(tokens) == 2


# --- provider refusals ----------------------------------------------------------------------------------


def _unknown_card(driver, sandbox, clock):
    driver.run(driver.preview(preview_request(clock, card="9276999999999999")))


def _locked_card(driver, sandbox, clock):
    sandbox.lock_card(CARD)
    driver.run(driver.preview(preview_request(clock)))


def _balance_spent_elsewhere(driver, sandbox, clock):
    tx = previewed(driver, clock)
    other = previewed(driver, clock)
    driver.run(driver.finalize(other, "f"))
    driver.run(driver.finalize(tx, "f"))


def _update_after_finalize(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    driver.run(driver.update(tx, (TIP,), "u"))


def _cancel_after_finalize(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(tx, "f"))
    driver.run(driver.cancel(tx, "c"))


def _refund_unfinalized(driver, sandbox, clock):
    driver.run(driver.refund(previewed(driver, clock), "r", None))


def _update_expired(driver, sandbox, clock):
    tx = previewed(driver, clock)
    clock.advance(secu.ASSUMED_SMART_TRANSACTION_LIFETIME)
    driver.run(driver.update(tx, (TIP,), "u"))


def _finalize_unknown(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.finalize(snapshot(Quote(tx.items, provider_ref="STX_NOPE"), clock), "f"))


def _finalize_cancelled(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.cancel(tx, "c"))
    driver.run(driver.finalize(tx, "f"))


def _finalize_after_a_failed_update(driver, sandbox, clock):
    tx = previewed(driver, clock)
    sandbox.lock_card(CARD)
    with pytest.raises(ProviderRejected):
        driver.run(driver.update(tx, (TIP,), "u"))  # PUT landed, preTransaction refused
    sandbox.lock_card(CARD, locked=False)
    driver.run(driver.finalize(tx, "f"))  # the old quote no longer matches the provider's basket


def _finalize_after_another_till_reset_the_basket(driver, sandbox, clock):
    tx = previewed(driver, clock)
    same_basket = {"basket": {"products": driver._products(BASKET)},
                   "basket_info": {"sum": 796, "currency": "EUR"}}
    driver.run(driver._call("PUT", f"{secu.TRANSACTIONS_PATH}/{tx.provider_ref}", same_basket))
    driver.run(driver.finalize(tx, "f"))  # same basket, but the card balance is no longer applied


def _finalize_after_another_till_reapplied_a_topped_up_card(driver, sandbox, clock):
    tx = previewed(driver, clock, card=POOR_CARD)
    sandbox.cards[POOR_CARD].cash_balance = 2000
    driver.run(driver._call("POST", f"{secu.TRANSACTIONS_PATH}/{tx.provider_ref}/preTransaction", {}))
    driver.run(driver.finalize(tx, "f"))  # the POS collected 296; the card would now cover it all


def _finalize_a_basket_changed_behind_our_back(driver, sandbox, clock):
    tx = previewed(driver, clock)
    driver.run(driver.update(tx, (TIP,), "u"))  # landed at the provider; the engine never heard
    driver.run(driver.finalize(tx, "f"))


@pytest.mark.parametrize(
    ("scenario", "code", "bookings"),
    [
        (_unknown_card, "IDENT_INVALID", 0),
        (_locked_card, str(ERRORS["card_locked"].code), 0),
        (_balance_spent_elsewhere, str(ERRORS["balance_changed"].code), 1),
        (_update_after_finalize, str(ERRORS["wrong_status"].code), 1),
        (_cancel_after_finalize, str(ERRORS["wrong_status"].code), 1),
        (_refund_unfinalized, str(ERRORS["wrong_status"].code), 0),
        (_update_expired, str(ERRORS["expired"].code), 0),
        (_finalize_unknown, str(ERRORS["not_found"].code), 0),
        (_finalize_cancelled, "STATUS_CANCELLED", 0),
        (_finalize_after_a_failed_update, "BASKET_CHANGED", 0),
        (_finalize_a_basket_changed_behind_our_back, "BASKET_CHANGED", 0),
        (_finalize_after_another_till_reset_the_basket, "NOT_PREPARED", 0),
        (_finalize_after_another_till_reapplied_a_topped_up_card, "MISSING_SUM_CHANGED", 0),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else str(value),
)
def test_each_refusal_is_a_rejection_with_its_code_and_books_nothing(driver, sandbox, clock, scenario, code,
                                                                      bookings):
    with pytest.raises(ProviderRejected) as refused:
        scenario(driver, sandbox, clock)
    assert refused.value.code == code
    assert refused.value.provider == "secuconnect"
    assert CARD not in str(refused.value)
    # Only the scenario's own successful finalize booked anything; the refused call did not.
    assert len(sandbox.loyalty_transactions) == bookings
    assert sandbox.card_balance(CARD) == 1000 - 796 * bookings


def test_the_cashier_reads_the_providers_german_message(driver, sandbox, clock):
    sandbox.lock_card(CARD)
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert refused.value.provider_message.startswith("Karte gesperrt (supportId ")


@pytest.mark.parametrize("scenario", [_unknown_card, _locked_card], ids=["unknown", "locked"])
def test_a_refused_preview_aborts_the_half_made_smart_transaction(driver, recorder, sandbox, clock, scenario):
    with pytest.raises(ProviderRejected):
        scenario(driver, sandbox, clock)
    assert sent_calls(recorder)[-1] == ("POST", "stx/abort")
    assert [stx.status for stx in sandbox.smart_transactions.values()] == ["cancelled"]


# --- reading answers the sandbox never gives ------------------------------------------------------------


def scripted(clock, answer) -> SecuconnectDriver:
    """A driver whose provider grants every token and answers the rest with ``answer(request)``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == secu.TOKEN_PATH:
            return httpx.Response(200, json={"access_token": "t", "expires_in": 1200})
        return answer(request)

    return SecuconnectDriver(environment="sandbox", client_id="id", client_secret="s", clock=clock,
                             transport=httpx.MockTransport(handler))


def answering(clock, status: int, body: bytes | dict | list, headers=None) -> SecuconnectDriver:
    if isinstance(body, bytes):
        return scripted(clock, lambda request: httpx.Response(status, content=body, headers=headers))
    return scripted(clock, lambda request: httpx.Response(status, json=body, headers=headers))


def envelope(**fields) -> dict:
    return {"status": "error", "error": "ProductNotAllowedException", "error_details": "details",
            "error_user": "Nicht erlaubt", "code": 4711, "supportId": "abc123", **fields}


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, envelope(), "4711"),
        (409, envelope(code="4711"), "4711"),
        (403, envelope(code=None), "ProductNotAllowedException"),
        (403, envelope(code=""), "ProductNotAllowedException"),
        (404, {"message": "no"}, "HTTP_404"),
        (400, {"error": "invalid_request", "error_description": "bad"}, "invalid_request"),
        (404, b"", "HTTP_404"),
    ],
)
def test_error_answers_become_rejections_with_the_providers_code(clock, status, body, code):
    """A 4xx error envelope is a refusal; the same envelope with HTTP 200 is unknown (below)."""
    driver = answering(clock, status, body)
    if body == b"":
        with pytest.raises(ProtocolError):  # an empty body is no answer at all
            driver.run(driver.preview(preview_request(clock)))
        return
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert refused.value.code == code


def test_a_rejection_masks_a_card_number_in_the_providers_text(clock):
    driver = answering(clock, 400, envelope(error_user=f"Karte {CARD} unbekannt"))
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert CARD not in str(refused.value)
    assert MASKED in refused.value.provider_message
    assert "supportId abc123" in refused.value.provider_message


def test_too_many_requests_carries_retry_after(clock):
    driver = answering(clock, 429, envelope(code=429), headers={"Retry-After": "30"})
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock)))
    assert refused.value.retry_after == 30.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, envelope(error="ProductInternalException", code=1003)),  # 5xx: it may have acted
        (503, b"<html><body>503 Service Unavailable</body></html>"),
        (200, b"<html>Bad Gateway</html>"),
        (200, b'{"object": "smart.transactions", "id": "STX_1", "sta'),
        (200, b""),
        (200, [1, 2]),
        (302, b""),
        (200, {"object": "smart.transactions"}),  # no id
    ],
)
def test_answers_that_may_hide_a_commit_are_unknown(clock, status, body):
    driver = answering(clock, status, body)
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.preview(preview_request(clock)))


def _created(**changes) -> dict:
    answer = {"object": "smart.transactions", "id": "STX_1", "status": "created",
              "basket_info": {"sum": 796, "currency": "EUR", "gratuity": None, "missing_sum": None},
              "idents": [{"type": "card", "value": CARD, "valid": True}]}
    answer.update(changes)
    return answer


@pytest.mark.parametrize(
    "pre_answer",
    [
        {"missing_sum": 900, "bonus_products": []},  # more missing than the basket holds
        {"missing_sum": -1, "bonus_products": []},
        {"missing_sum": "0", "bonus_products": []},  # a number as a string
        {"missing_sum": True, "bonus_products": []},  # a bool for a number
        {"missing_sum": 10.5, "bonus_products": []},  # half a cent
        {"bonus_products": []},
        {},
        {"status": "error", "code": "MAINTENANCE"},  # an error envelope sent with HTTP 200
        ["missing_sum", 0],
        {"missing_sum": 0, "bonus_products": "none"},
    ],
)
def test_a_pre_transaction_answer_that_does_not_add_up_is_a_protocol_error(clock, pre_answer):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/preTransaction"):
            return httpx.Response(200, json=pre_answer)
        return httpx.Response(200, json=_created())

    driver = scripted(clock, answer)
    with pytest.raises(ProtocolError):
        driver.run(driver.preview(preview_request(clock)))


def test_an_error_envelope_sent_with_http_200_is_an_unknown_outcome(clock):
    driver = answering(clock, 200, envelope())
    with pytest.raises(ProtocolError, match="error envelope"):
        driver.run(driver.preview(preview_request(clock)))


def test_integral_floats_in_an_answer_are_read_as_cents(clock):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/preTransaction"):
            return httpx.Response(200, json={"missing_sum": 296.0, "bonus_products": []})
        return httpx.Response(200, json=_created(basket_info={"sum": 796.0, "currency": "EUR"}))

    driver = scripted(clock, answer)
    quote = driver.run(driver.preview(preview_request(clock)))
    assert quote.details["missing_sum"] == 296


@pytest.mark.parametrize("status", ["approved", "pending", "processing", "created"])
def test_a_start_that_is_not_final_yet_is_unknown(clock, status):
    prepared = _created(status="processing", basket_info={"sum": 796, "currency": "EUR", "missing_sum": 0})

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=prepared if request.method == "GET" else _created(status=status))

    driver = scripted(clock, answer)
    quote = Quote([PricedLine(item, Money(0, "EUR"), item.gross, Money(0, "EUR")) for item in BASKET],
                  provider_ref="STX_1")
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.finalize(snapshot(quote, clock), "f"))


def test_unreadable_receipt_lines_are_skipped_not_fatal(clock):
    receipt = [{"type": "separator", "value": {"caption": "Kundenkarte"}}, {"type": "image", "value": {}},
               {"type": "textline", "value": {"text": 7}}, "junk", {"type": "space"}]

    done = _created(status="ok", receipt=receipt, payment_method="cash")
    driver = scripted(clock, lambda request: httpx.Response(200, json=done))
    tx = snapshot(Quote([PricedLine.unpriced(item) for item in BASKET], provider_ref="STX_1"), clock)
    outcome = driver.run(driver.finalize(tx, "f"))  # already ok: the GET answers it
    assert [line.kind for line in outcome.receipt] == ["separator", "space"]
    assert outcome.details["receipt_lines_skipped"] == 3


# --- faults ---------------------------------------------------------------------------------------------

UNKNOWN_FAULTS = [Fault.SERVER_ERROR, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT,
                  Fault.TIMEOUT_BEFORE_COMMIT, Fault.TIMEOUT_AFTER_COMMIT, Fault.DROP_CONNECTION]

# The call each lifecycle operation ends on, and whether the driver resends it once itself.
LAST_CALL = {"preview": ("preTransaction", True), "update": ("preTransaction", True),
             "finalize": ("start", False), "cancel": ("abort", True), "refund": ("cancel", True),
             "create": ("create", False), "read": ("get", True), "put": ("update", True)}


def _exchange(driver, clock, operation: str):
    if operation in ("preview", "create"):
        return driver.preview(preview_request(clock))
    tx = previewed(driver, clock)
    if operation in ("update", "put"):
        return driver.update(tx, (TIP,), "u")
    if operation == "refund":
        driver.run(driver.finalize(tx, "f"))
        return driver.refund(tx, "r", None)
    if operation == "read":
        return driver.finalize(tx, "f")
    return getattr(driver, operation)(tx, "k")


@pytest.mark.parametrize("fault", UNKNOWN_FAULTS, ids=lambda fault: fault.value)
@pytest.mark.parametrize("operation", list(LAST_CALL))
def test_every_fault_on_every_call_is_an_unknown_outcome(driver, sandbox, clock, operation, fault):
    exchange = _exchange(driver, clock, operation)
    call, resent = LAST_CALL[operation]
    sandbox.faults.inject(call, fault, times=2 if resent else 1)
    with pytest.raises(OutcomeUnknown) as unknown:
        driver.run(exchange)
    assert unknown.value.provider == "secuconnect"
    for secret in (CARD, DEFAULT_CLIENT_SECRET):
        assert secret not in str(unknown.value)


@pytest.mark.parametrize("operation", [op for op, (_, resent) in LAST_CALL.items() if resent])
def test_a_single_lost_answer_on_a_safe_call_is_resent_and_lands_once(driver, sandbox, clock, operation):
    exchange = _exchange(driver, clock, operation)
    call, _ = LAST_CALL[operation]
    sandbox.faults.inject(call, Fault.TIMEOUT_AFTER_COMMIT)
    driver.run(exchange)
    assert sandbox.faults.fired == [(call, Fault.TIMEOUT_AFTER_COMMIT)]
    # finalize (whose read was lost once) redeemed once; every other operation nets zero
    assert sandbox.card_balance(CARD) == (204 if operation == "read" else 1000)
    assert len(sandbox.loyalty_transactions) == (1 if operation in ("read", "refund") else 0)


def test_a_lost_start_answer_is_resolved_by_the_retry_reading_the_status(driver, recorder, sandbox, clock):
    tx = previewed(driver, clock)
    sandbox.faults.inject("start", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.finalize(tx, "f"))
    assert sandbox.card_balance(CARD) == 204  # it did land

    outcome = driver.run(driver.finalize(tx, "f"))  # the engine's retry, same transaction

    assert sent_calls(recorder)[-1] == ("GET", "stx")  # no second start
    assert sandbox.card_balance(CARD) == 204
    assert len(sandbox.loyalty_transactions) == 1
    assert outcome.details["loyalty_transaction_id"] == sandbox.loyalty_transactions[0].id
    assert outcome.receipt and outcome.receipt[1].value == MASKED


def test_a_lost_start_request_is_started_by_the_retry(driver, sandbox, clock):
    tx = previewed(driver, clock, card=POOR_CARD)
    sandbox.faults.inject("start", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown):
        driver.run(driver.finalize(tx, "f"))
    assert sandbox.card_balance(POOR_CARD) == 500
    driver.run(driver.finalize(tx, "f"))
    assert sandbox.card_balance(POOR_CARD) == 0


# --- transports -----------------------------------------------------------------------------------------


def _check_session(sandbox, tx, finalized, refunded):
    assert parts(tx) == [(349, 0), (151, 98), (0, 198)]
    assert finalized.details["payment_method"] == "cash"
    assert refunded.details["smart_transaction_status"] == "cancelled"
    assert sandbox.card_balance(POOR_CARD) == 500


async def test_the_same_exchanges_run_async_in_process(driver, sandbox, clock):
    tx = snapshot(await driver.arun(driver.preview(preview_request(clock, card=POOR_CARD))), clock)
    finalized = await driver.arun(driver.finalize(tx, "f"))
    refunded = await driver.arun(driver.refund(tx, "r", None))
    _check_session(sandbox, tx, finalized, refunded)
    await driver.aclose()


async def test_the_same_exchanges_run_async_through_asgi(sandbox, clock):
    driver = SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, clock=clock,
                               async_transport=sandbox.asgi_transport())
    tx = snapshot(await driver.arun(driver.preview(preview_request(clock, card=POOR_CARD))), clock)
    finalized = await driver.arun(driver.finalize(tx, "f"))
    refunded = await driver.arun(driver.refund(tx, "r", None))
    _check_session(sandbox, tx, finalized, refunded)
    await driver.aclose()


def test_the_same_exchanges_run_over_a_real_loopback_socket(sandbox, clock):
    with serve(sandbox) as served:
        driver = SecuconnectDriver(base_url=served.base_url, client_id=DEFAULT_CLIENT_ID,
                                   client_secret=DEFAULT_CLIENT_SECRET, clock=clock, timeout=5)
        tx = snapshot(driver.run(driver.preview(preview_request(clock, card=POOR_CARD))), clock)
        finalized = driver.run(driver.finalize(tx, "f"))
        refunded = driver.run(driver.refund(tx, "r", None))
        driver.close()
    _check_session(sandbox, tx, finalized, refunded)


def test_a_dropped_connection_over_a_real_socket_is_unknown_and_the_retry_settles_it(sandbox, clock):
    with serve(sandbox) as served:
        driver = SecuconnectDriver(base_url=served.base_url, client_id=DEFAULT_CLIENT_ID,
                                   client_secret=DEFAULT_CLIENT_SECRET, clock=clock, timeout=5)
        tx = snapshot(driver.run(driver.preview(preview_request(clock))), clock)
        sandbox.faults.inject("start", Fault.DROP_CONNECTION)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.finalize(tx, "f"))
        driver.run(driver.finalize(tx, "f"))
        driver.close()
    assert sandbox.card_balance(CARD) == 204


# --- base URLs and secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://connect-testing.secuconnect.com", "ftp://127.0.0.1", "http://10.0.0.8:8080"])
def test_a_plain_http_base_url_off_loopback_is_refused(url):
    with pytest.raises(ValidationError):
        SecuconnectDriver(base_url=url, client_id="id", client_secret="s")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost:1", "https://connect.secuconnect.com/"])
def test_https_anywhere_and_http_on_loopback_are_accepted(url):
    assert SecuconnectDriver(base_url=url, client_id="id", client_secret="s").base_url == url.rstrip("/")


def test_credentials_and_tokens_stay_out_of_reprs(driver, clock):
    tx = previewed(driver, clock)
    token = driver._token.value.reveal()
    for text in (repr(driver), str(driver), repr(driver._token), repr(tx), repr(dict(tx.details))):
        for secret in (DEFAULT_CLIENT_SECRET, DEFAULT_CLIENT_ID, token, CARD):
            assert secret not in text
    assert tx.details["card_masked"] == MASKED
