"""secuconnect sandbox: its business rules, spoken to over raw HTTP the way any client would.

Tokens that expire, both header spellings, balances applied and redeemed, prepared
states reset by PUT, idempotent starts, aborts and cancels, expiry of un-started
transactions, the refund window, the error envelope, and a ledger that always balances.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from txengine.providers.secuconnect import SecuconnectSandbox
from txengine.providers.secuconnect import driver as secu
from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ERRORS

CARD = "9276000000000017"
OTHER_CARD = "9276000000000025"
STX = secu.TRANSACTIONS_PATH
CREDENTIALS = {"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID,
               "client_secret": DEFAULT_CLIENT_SECRET}
PRODUCTS = [
    {"id": 1, "articleNumber": "30037", "ean": "", "desc": "Sandwich Romano", "quantity": 1, "priceOne": 349,
     "tax": 7},
    {"id": 2, "articleNumber": "51", "ean": "4999012345678", "desc": "Water", "quantity": 2, "priceOne": 99,
     "tax": 19},
]  # 547


@pytest.fixture
def sandbox(clock) -> SecuconnectSandbox:
    sandbox = SecuconnectSandbox(clock, demo=False)
    sandbox.add_card(CARD, cash_balance=1000)
    sandbox.add_card(OTHER_CARD, cash_balance=300)
    return sandbox


class Client:
    """A bare HTTP client holding one bearer token."""

    def __init__(self, sandbox: SecuconnectSandbox, header: str = "Authorization") -> None:
        self.http = httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url)
        self.header = header
        self.token = self.http.post(secu.TOKEN_PATH, json=CREDENTIALS).json()["access_token"]

    def call(self, method: str, path: str, body=None) -> httpx.Response:
        return self.http.request(method, path, json=body, headers={self.header: f"Bearer {self.token}"})

    def create(self, card: str | None = CARD, products=PRODUCTS, **extra) -> dict:
        total = sum(p["priceOne"] * p["quantity"] for p in products)
        body = {"basket": {"products": products}, "basket_info": {"sum": total, "currency": "EUR"}, **extra}
        if card is not None:
            body["idents"] = [{"type": "card", "value": card}]
        response = self.call("POST", STX, body)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, stx_id: str, action: str) -> httpx.Response:
        return self.call("POST", f"{STX}/{stx_id}/{action}", {})


@pytest.fixture
def client(sandbox) -> Client:
    return Client(sandbox)


def refused(response: httpx.Response, kind: str) -> dict:
    error = ERRORS[kind]
    assert response.status_code == error.status, response.text
    body = response.json()
    assert set(body) == {"status", "error", "error_details", "error_user", "code", "supportId"}
    assert (body["status"], body["error"], body["code"], body["error_user"]) == (
        "error", error.error, error.code, error.user)
    assert body["supportId"]
    return body


def conserved(sandbox: SecuconnectSandbox) -> bool:
    """Every card holds its opening balance minus what live (unreversed) bookings redeemed."""
    for number, opening in sandbox.opening_balances.items():
        redeemed = sum(b.redeemed for b in sandbox.loyalty_transactions
                       if b.card_number == number and b.reversed_at is None)
        if sandbox.card_balance(number) != opening - redeemed:
            return False
    return True


# --- OAuth -----------------------------------------------------------------------------------------


def test_a_token_lives_exactly_1200_seconds_on_the_sandbox_clock(sandbox, clock, client):
    stx = client.create()
    clock.advance(seconds=1199)
    assert client.call("GET", f"{STX}/{stx['id']}").status_code == 200
    clock.advance(seconds=1)
    expired = client.call("GET", f"{STX}/{stx['id']}")
    # developer.secuconnect.com/integration/ (error handling): expired token = HTTP 403, code 2003
    assert expired.status_code == 403
    assert expired.json()["code"] == 2003 and expired.json()["error"] == "ProductNotAllowedException"


def test_the_token_answer_is_documented_shape(sandbox):
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as http:
        answer = http.post(secu.TOKEN_PATH, json=CREDENTIALS)
    assert answer.status_code == 200
    body = answer.json()
    assert body["expires_in"] == 1200 and body["token_type"] == "bearer"
    assert body["scope"]  # the integration page's token answer carries a scope
    assert len(body["access_token"]) == 26  # as long as the seed's qb56tjj1bcvo9n2nj4u38k84lo
    assert sandbox.tokens_issued == 1


def test_a_form_encoded_token_request_is_accepted_too(sandbox):
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as http:
        answer = http.post(secu.TOKEN_PATH, data=CREDENTIALS)
    assert answer.status_code == 200 and answer.json()["access_token"]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({**CREDENTIALS, "client_secret": "wrong"}, 401, "invalid_client"),
        ({**CREDENTIALS, "client_id": "nobody"}, 401, "invalid_client"),
        ({**CREDENTIALS, "grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"client_id": DEFAULT_CLIENT_ID}, 400, "unsupported_grant_type"),
    ],
)
def test_bad_token_requests_are_refused_in_oauth_shape(sandbox, body, status, error):
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as http:
        answer = http.post(secu.TOKEN_PATH, json=body)
    assert answer.status_code == status and answer.json()["error"] == error
    assert sandbox.tokens_issued == 0


@pytest.mark.parametrize("header", ["Authorization", "Authenticate"])
def test_both_header_spellings_are_accepted(sandbox, header):
    client = Client(sandbox, header=header)
    assert client.create()["status"] == "created"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}])
def test_calls_without_a_valid_bearer_token_are_unauthorized(sandbox, headers):
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as http:
        answer = http.get(f"{STX}/STX_X", headers=headers)
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_token"


def test_revoked_tokens_stop_working(sandbox, client):
    sandbox.revoke_tokens()
    assert client.call("POST", STX, {}).status_code == 401


# --- creating and applying the balance -----------------------------------------------------------------


def test_create_answers_the_full_smart_transaction(client, clock):
    stx = client.create(transactionRef="tx-1")
    assert stx["object"] == "smart.transactions" and stx["id"].startswith("STX_")
    assert stx["status"] == "created" and stx["transactionRef"] == "tx-1" and stx["merchantRef"] is None
    # missing_sum appears only after a preTransaction
    assert stx["basket_info"] == {"sum": 547, "currency": "EUR", "gratuity": None}
    assert stx["basket"]["products"][1]["ean"] == "4999012345678"
    assert stx["created"] == clock.now().isoformat(timespec="seconds")
    assert stx["transactions"] == [] and stx["receipt"] == [] and stx["trans_id"] is None
    ident = stx["idents"][0]
    assert (ident["type"], ident["value"], ident["valid"]) == ("card", CARD, True)
    assert ident["merchantcard"]["cash_balance"] == 1000


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"basket": {"products": []}, "basket_info": {"sum": 0, "currency": "EUR"}},
        {"basket": {"products": PRODUCTS}, "basket_info": {"sum": 546, "currency": "EUR"}},
        {"basket": {"products": PRODUCTS}, "basket_info": {"sum": 547, "currency": "EURO"}},
        {"basket": {"products": [{**PRODUCTS[0], "tax": 7.5}]}, "basket_info": {"sum": 349, "currency": "EUR"}},
        {"basket": {"products": [{**PRODUCTS[0], "priceOne": 3.49}]},
         "basket_info": {"sum": 3.49, "currency": "EUR"}},
        {"basket": {"products": [{**PRODUCTS[0], "quantity": 0}]},
         "basket_info": {"sum": 0, "currency": "EUR"}},
        {"basket": {"products": [PRODUCTS[0], PRODUCTS[0]]}, "basket_info": {"sum": 698, "currency": "EUR"}},
        {"basket": {"products": PRODUCTS}, "basket_info": {"sum": 547, "currency": "EUR"},
         "idents": [{"type": "qr", "value": CARD}]},
        {"basket": {"products": PRODUCTS}, "basket_info": {"sum": 547, "currency": "EUR"}, "transactionRef": 5},
    ],
)
def test_malformed_baskets_are_refused(client, body):
    refused(client.call("POST", STX, body), "invalid_request")


def test_a_non_json_body_is_refused_in_the_error_envelope(client):
    answer = client.http.post(STX, content=b"{nope", headers={"Authorization": f"Bearer {client.token}"})
    refused(answer, "invalid_request")


@pytest.mark.parametrize(("card", "missing"), [(CARD, 0), (OTHER_CARD, 247)])
def test_pre_transaction_applies_the_balance_and_reports_the_missing_sum(sandbox, client, card, missing):
    stx = client.create(card)
    answer = client.post(stx["id"], "preTransaction").json()
    assert answer == {"missing_sum": missing, "bonus_products": []}  # the documented shape, nothing more
    after = client.call("GET", f"{STX}/{stx['id']}").json()
    assert after["status"] == "processing" and after["basket_info"]["missing_sum"] == missing
    assert sandbox.card_balance(card) == {CARD: 1000, OTHER_CARD: 300}[card]  # nothing redeemed yet


@pytest.mark.parametrize(("card", "kind"), [(None, "card_invalid"), ("9276999999999999", "card_invalid")])
def test_pre_transaction_needs_a_known_card(client, card, kind):
    stx = client.create(card)
    if card is not None:
        assert stx["idents"][0]["valid"] is False and stx["idents"][0]["merchantcard"] is None
    refused(client.post(stx["id"], "preTransaction"), kind)


def test_a_locked_card_is_refused(sandbox, client):
    sandbox.lock_card(CARD)
    stx = client.create()
    assert stx["idents"][0]["merchantcard"]["lock_status"] == "locked"
    refused(client.post(stx["id"], "preTransaction"), "card_locked")
    refused(client.post(stx["id"], "start/cash"), "card_locked")


def test_put_replaces_the_basket_and_resets_the_prepared_state(client):
    stx = client.create(OTHER_CARD)
    client.post(stx["id"], "preTransaction")
    put = client.call("PUT", f"{STX}/{stx['id']}", {"basket": {"products": PRODUCTS[:1]},
                                                     "basket_info": {"sum": 349, "currency": "EUR"}}).json()
    assert put["status"] == "created" and "missing_sum" not in put["basket_info"]
    assert put["basket_info"]["sum"] == 349 and len(put["basket"]["products"]) == 1
    assert put["idents"][0]["value"] == OTHER_CARD  # no idents in the PUT: the card stays
    refused(client.post(stx["id"], "start/loyalty"), "wrong_status")
    assert client.post(stx["id"], "preTransaction").json()["missing_sum"] == 49


# --- starting: redeeming and booking ---------------------------------------------------------------------


def test_start_loyalty_redeems_the_sum_and_books_one_loyalty_transaction(sandbox, client, clock):
    stx = client.create()
    client.post(stx["id"], "preTransaction")
    done = client.post(stx["id"], "start/loyalty").json()
    assert done["status"] == "ok" and done["payment_method"] == "loyalty"
    assert sandbox.card_balance(CARD) == 453
    (booking,) = sandbox.loyalty_transactions
    assert done["transactions"] == [{"object": "loyalty.transactions", "id": booking.id}]
    assert (booking.turnover, booking.redeemed, booking.booked_at) == (547, 547, clock.now())
    assert [line["value"].get("text") for line in done["receipt"] if line["type"] == "textline"] == [
        "Umsatz erfasst:", "5,47 EUR", "Guthaben eingelöst:", "5,47 EUR", "Aktuelles Guthaben", "4,53 EUR"]
    assert done["idents"][0]["merchantcard"]["balance"] == 453


def test_start_loyalty_refuses_a_basket_the_card_does_not_cover(sandbox, client):
    stx = client.create(OTHER_CARD)
    client.post(stx["id"], "preTransaction")
    refused(client.post(stx["id"], "start/loyalty"), "insufficient_balance")
    assert sandbox.card_balance(OTHER_CARD) == 300 and not sandbox.loyalty_transactions


def test_start_loyalty_needs_the_balance_applied_first(client):
    refused(client.post(client.create()["id"], "start/loyalty"), "wrong_status")


def test_start_cash_redeems_the_whole_balance_and_leaves_the_missing_sum_to_the_register(sandbox, client):
    stx = client.create(OTHER_CARD)
    client.post(stx["id"], "preTransaction")
    done = client.post(stx["id"], "start/cash").json()
    assert sandbox.card_balance(OTHER_CARD) == 0
    assert done["basket_info"]["missing_sum"] == 247
    assert sandbox.loyalty_transactions[0].redeemed == 300


def test_start_cash_without_pre_transaction_records_turnover_only_like_the_seed(sandbox, client):
    done = client.post(client.create()["id"], "start/cash").json()
    assert done["status"] == "ok" and done["basket_info"]["missing_sum"] == 0
    assert sandbox.card_balance(CARD) == 1000
    assert [(b.turnover, b.redeemed) for b in sandbox.loyalty_transactions] == [(547, 0)]


def test_start_without_a_card_is_a_plain_cash_sale(sandbox, client):
    done = client.post(client.create(card=None)["id"], "start/cash").json()
    assert done["status"] == "ok" and done["transactions"] == [] and done["receipt"] == []
    assert not sandbox.loyalty_transactions


def test_starting_again_answers_the_first_result_and_books_nothing_more(sandbox, client):
    assert "start" in secu.ASSUMED_IDEMPOTENT_CALLS
    stx = client.create()
    client.post(stx["id"], "preTransaction")
    first = client.post(stx["id"], "start/loyalty")
    again = client.post(stx["id"], "start/loyalty")
    assert again.status_code == 200 and again.content == first.content
    assert sandbox.card_balance(CARD) == 453 and len(sandbox.loyalty_transactions) == 1
    refused(client.post(stx["id"], "start/cash"), "wrong_status")


def test_a_balance_spent_by_another_transaction_is_not_redeemed_twice(sandbox, client):
    first, second = client.create(), client.create()
    for stx in (first, second):
        assert client.post(stx["id"], "preTransaction").json()["missing_sum"] == 0
    client.post(first["id"], "start/loyalty")
    assert sandbox.card_balance(CARD) == 453
    refused(client.post(second["id"], "start/loyalty"), "balance_changed")
    refused(client.post(second["id"], "start/cash"), "balance_changed")
    # Applied again, the rest of the card goes into it.
    assert client.post(second["id"], "preTransaction").json()["missing_sum"] == 94
    client.post(second["id"], "start/cash")
    assert sandbox.card_balance(CARD) == 0 and conserved(sandbox)


@pytest.mark.parametrize("method", ["cc", "debit", "LOYALTY"])
def test_unknown_payment_methods_are_refused(client, method):
    refused(client.post(client.create()["id"], f"start/{method}"), "method_unsupported")


def test_unknown_transactions_and_routes(client):
    refused(client.call("GET", f"{STX}/STX_NOPE"), "not_found")
    refused(client.post("STX_NOPE", "abort"), "not_found")
    assert client.call("DELETE", f"{STX}/STX_NOPE").status_code == 404
    assert client.call("GET", "/api/v2/Smart/Devices").json()["status"] == "error"


# --- abort, expiry, cancel ------------------------------------------------------------------------------


def test_abort_drops_an_unstarted_transaction_and_again_is_success(sandbox, client):
    stx = client.create()
    client.post(stx["id"], "preTransaction")
    first = client.post(stx["id"], "abort")
    again = client.post(stx["id"], "abort")
    assert first.json()["status"] == again.json()["status"] == "cancelled" and again.status_code == 200
    refused(client.post(stx["id"], "start/cash"), "wrong_status")
    refused(client.call("PUT", f"{STX}/{stx['id']}", {}), "wrong_status")
    assert sandbox.card_balance(CARD) == 1000


def test_a_completed_transaction_cannot_be_aborted(client):
    stx = client.create()
    client.post(stx["id"], "start/cash")
    refused(client.post(stx["id"], "abort"), "wrong_status")


def test_unstarted_transactions_expire_after_their_last_change(sandbox, client, clock):
    lifetime = secu.ASSUMED_SMART_TRANSACTION_LIFETIME
    stx = client.create()
    clock.advance(lifetime - timedelta(seconds=1))
    client.token = Client(sandbox).token
    client.post(stx["id"], "preTransaction")  # a change: the lifetime starts again
    clock.advance(lifetime - timedelta(seconds=1))
    client.token = Client(sandbox).token
    assert client.call("GET", f"{STX}/{stx['id']}").json()["status"] == "processing"
    clock.advance(seconds=1)
    assert client.call("GET", f"{STX}/{stx['id']}").json()["status"] == "cancelled"
    refused(client.post(stx["id"], "start/loyalty"), "expired")
    refused(client.post(stx["id"], "preTransaction"), "expired")
    assert client.post(stx["id"], "abort").json()["status"] == "cancelled"  # releasing it is harmless


def test_a_started_transaction_never_expires(sandbox, client, clock):
    stx = client.create()
    client.post(stx["id"], "start/cash")
    clock.advance(hours=2)
    client.token = Client(sandbox).token
    assert client.call("GET", f"{STX}/{stx['id']}").json()["status"] == "ok"


def test_cancel_reverses_within_the_window_once(sandbox, client, clock):
    stx = client.create()
    client.post(stx["id"], "preTransaction")
    client.post(stx["id"], "start/loyalty")
    clock.advance(secu.ASSUMED_REFUND_WINDOW - timedelta(seconds=1))
    client.token = Client(sandbox).token
    first = client.post(stx["id"], "cancel")
    again = client.post(stx["id"], "cancel")
    assert first.json()["status"] == "cancelled" and again.content == first.content
    assert sandbox.card_balance(CARD) == 1000
    assert sandbox.loyalty_transactions[0].reversed_at == clock.now()
    texts = [line["value"]["text"] for line in first.json()["receipt"] if line["type"] == "textline"]
    assert texts == ["Storno erfasst:", "5,47 EUR", "Guthaben gutgeschrieben:", "5,47 EUR",
                     "Aktuelles Guthaben", "10,00 EUR"]
    assert conserved(sandbox)


def test_cancel_at_the_end_of_the_window_is_refused(sandbox, client, clock):
    stx = client.create()
    client.post(stx["id"], "preTransaction")
    client.post(stx["id"], "start/loyalty")
    clock.advance(secu.ASSUMED_REFUND_WINDOW)
    client.token = Client(sandbox).token
    refused(client.post(stx["id"], "cancel"), "refund_window_closed")
    assert sandbox.card_balance(CARD) == 453


def test_only_completed_transactions_are_cancelled(client):
    refused(client.post(client.create()["id"], "cancel"), "wrong_status")


def test_amounts_on_receipts_are_written_the_german_way(sandbox, client):
    sandbox.add_card("9276000000000033", cash_balance=123456)
    big = [{"id": 1, "articleNumber": "", "ean": "", "desc": "Cake", "quantity": 1, "priceOne": 123456,
            "tax": 7}]
    stx = client.create("9276000000000033", products=big)
    client.post(stx["id"], "preTransaction")
    done = client.post(stx["id"], "start/loyalty").json()
    texts = [line["value"]["text"] for line in done["receipt"] if line["type"] == "textline"]
    assert texts[1] == "1.234,56 EUR" and texts[-1] == "0,00 EUR"


def test_the_demo_sandbox_knows_the_seeds_card():
    sandbox = SecuconnectSandbox()
    assert sandbox.card_balance("9276004429942845") == 1000
    assert sandbox.cards["9276004429942845"].card_id == "CRD_2U7MTNAMM3PMBPAB50C9G2AEHA9GPJ"
