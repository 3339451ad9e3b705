"""secuconnect: the seed (003) as a contract.

The seed documents one exchange verbatim: ``POST .../start/cash`` for John's Bakery's
basket (Sandwich Romano 349, Fruit salad 249, 2 x Water 99 = 796 EUR cents) paid with
card 9276004429942845 holding 10,00 EUR.  These tests hold the driver to the request
shapes of every call it makes for that basket, the sandbox to the seed's answer, field
by field, and the driver's reading of that very answer (receipt lines, loyalty
transaction, trans_id) with the card number masked wherever it is stored.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest

from txengine.drivers import PreviewRequest
from txengine.models import Basket, LineItem, Outcome, PricedLine, Quote, ReceiptLine, Transaction
from txengine.money import Money
from txengine.secret import Secret
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
from txengine.providers.secuconnect import driver as secu
from txengine.testing.sandbox import RecordingTransport
from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

SEED_CARD = "9276004429942845"
MASKED_CARD = "************2845"
SEED_STX = "STX_KJXJDUN542NR3WMRHRVU5WWM6ZQEA2"

SANDWICH = LineItem("30037", "Sandwich Romano", 1, Money(349, "EUR"), 7)
FRUIT_SALAD = LineItem("30200", "Fruit salad, small bowl", 1, Money(249, "EUR"), 7)
WATER = LineItem("51", "Water, mildly sprinkling, 0.25 ltr.", 2, Money(99, "EUR"), 19)
SEED_BASKET = Basket([SANDWICH, FRUIT_SALAD, WATER])

# The seed's answer to POST /api/v2/Smart/Transactions/STX_KJXJ.../start/cash, verbatim.
SEED_START_CASH_RESPONSE = json.loads("""{
"object": "smart.transactions",
"id": "STX_KJXJDUN542NR3WMRHRVU5WWM6ZQEA2",
"merchant": {"object": "general.merchants", "id": "MRC_35SZ3R5GGQQP4T0U2T5GFAN9P6C4PG",
             "companyname": "John's Bakery"},
"device_source": {"object": "smart.devices", "id": "SDV_2YJDXYESB2YBHECVB5GQGSYPNM8UA6"},
"transactions": [{"object": "loyalty.transactions", "id": "LTX_YBYPUETZ2HQXURG9XU0M5H4KGWW0NH"}],
"created": "2020-09-17T09:18:14+02:00",
"updated": "2020-09-17T09:43:59+02:00",
"status": "ok",
"merchantRef": null,
"transactionRef": null,
"intent": null,
"basket": {
  "products": [
    {"id": 1, "parent": null, "articleNumber": "30037", "ean": "", "desc": "Sandwich Romano",
     "quantity": 1, "priceOne": 349, "tax": 7, "group": [], "serialNumber": null,
     "item_type": "article", "reference_id": null, "contract_id": null, "sum": null},
    {"id": 2, "parent": null, "articleNumber": "30200", "ean": "", "desc": "Fruit salad, small bowl",
     "quantity": 1, "priceOne": 249, "tax": 7, "group": [], "serialNumber": null,
     "item_type": "article", "reference_id": null, "contract_id": null, "sum": null},
    {"id": 3, "parent": null, "articleNumber": "51", "ean": "4999012345678",
     "desc": "Water, mildly sprinkling, 0.25 ltr.", "quantity": 2, "priceOne": 99, "tax": 19,
     "group": [], "serialNumber": null, "item_type": "article", "reference_id": null,
     "contract_id": null, "sum": null}
  ],
  "texts": [],
  "type": "default"
},
"receipt": [
  {"type": "separator", "value": {"caption": "Kundenkarte"}},
  {"type": "name-value", "value": {"name": "Kartennummer: ", "value": "9276004429942845", "decoration": []}},
  {"type": "name-value", "value": {"name": "TA Code: ", "value": "29187332", "decoration": []}},
  {"type": "space"},
  {"type": "textline", "value": {"text": "Umsatz erfasst:", "decoration": []}},
  {"type": "textline", "value": {"text": "7,96 EUR", "decoration": ["important"]}},
  {"type": "space"},
  {"type": "textline", "value": {"text": "Aktuelles Guthaben", "decoration": []}},
  {"type": "textline", "value": {"text": "10,00 EUR", "decoration": ["important"]}}
],
"basket_info": {"sum": 796, "currency": "EUR", "gratuity": null, "missing_sum": 0},
"idents": [
  {"object": "smart.idents", "id": "smi_1", "prefix": "9276", "name": "secucard Kundenkarte",
   "type": "card", "value": "9276004429942845", "valid": true,
   "merchantcard": {
     "object": "loyalty.merchantcards", "id": "MCD_2RXTNXPRM2YG9922UMBHHAEWEGN6AJ",
     "merchant": {"object": "general.merchants", "id": "MRC_35SZ3R5GGQQP4T0U2T5GFAN9P6C4PG"},
     "created_for_merchant": {"object": "general.merchants", "id": "MRC_35SZ3R5GGQQP4T0U2T5GFAN9P6C4PG"},
     "card": {"object": "loyalty.cards", "id": "CRD_2U7MTNAMM3PMBPAB50C9G2AEHA9GPJ",
              "cardnumber": "9276004429942845", "created": "2015-09-28T16:01:20+02:00"},
     "cardgroup": {"object": "loyalty.cardgroups", "id": "CRG_2BESGJNETJJRZVVYS8R7JWGVWK4PRZ",
                   "display_name": "Geschenkgutschein", "display_name_raw": "Geschenkgutschein",
                   "stock_warn_limit": 0,
                   "picture": "https://connect.secucard.com/ds_g/8e79737df1e2513db48908b342c3cc436edf501a"},
     "created_for_store": {"object": "general.stores", "id": "STO_2ZCZRU9V6U8QA7B49K94667UP6C4PJ"},
     "customer": {"object": "loyalty.customers", "id": "CUS_2YBREKK0A2MNAXJ752TSDD9DH3PKAJ",
                  "contact": {"name": "Max Mustermann", "forename": "Max", "surname": "Mustermann",
                              "dob": "2018-02-14T00:00:00+00:00"},
                  "created": "2018-05-03T10:14:06+02:00", "consent_for_communication": true},
     "is_base_card": true, "points": 0, "cash_balance": 1000, "bonus_balance": 0, "balance": 1000,
     "last_usage": "2020-09-24T15:51:06+02:00", "last_charge": "2020-09-24T14:40:57+02:00",
     "stock_status": "active", "lock_status": "unlocked", "passcode": 0, "expiry_date": null},
   "customer": {"object": "loyalty.customers", "id": "CUS_2YBREKK0A2MNAXJ752TSDD9DH3PKAJ",
                "contact": {"name": "Max Mustermann", "forename": "Max", "surname": "Mustermann",
                            "dob": "2018-02-14T00:00:00+00:00"},
                "created": "2018-05-03T10:14:06+02:00", "consent_for_communication": true}}
],
"payment_method": "cash",
"trans_id": "29187332",
"is_demo": true,
"application_context": {"locks": {"customer": false}, "return_urls": null, "iframe_opts": null},
"checkout_links": null,
"payment_links": null
}""")

# The seed's receipt as the POS stores and prints it: the card number masked.
SEED_RECEIPT = (
    ReceiptLine("separator", text="Kundenkarte"),
    ReceiptLine("name-value", name="Kartennummer: ", value=MASKED_CARD),
    ReceiptLine("name-value", name="TA Code: ", value="29187332"),
    ReceiptLine("space"),
    ReceiptLine("textline", text="Umsatz erfasst:"),
    ReceiptLine("textline", text="7,96 EUR", decoration=("important",)),
    ReceiptLine("space"),
    ReceiptLine("textline", text="Aktuelles Guthaben"),
    ReceiptLine("textline", text="10,00 EUR", decoration=("important",)),
)


@pytest.fixture
def sandbox(clock) -> SecuconnectSandbox:
    return SecuconnectSandbox(clock)  # the demo merchant and the seed's card, 10,00 EUR


@pytest.fixture
def recorder(sandbox) -> RecordingTransport:
    return sandbox.recording_transport()


@pytest.fixture
def driver(recorder, clock) -> SecuconnectDriver:
    return SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET,
                             clock=clock, transport=recorder)


def seed_preview(clock, payment_type: str = "SPLIT_PAYMENT") -> PreviewRequest:
    return PreviewRequest(tx_id="tx-seed", basket=SEED_BASKET, customer_token=Secret(SEED_CARD),
                          payment_type=payment_type, idempotency_key="k-seed", now=clock.now())


def snapshot(quote: Quote, clock, payment_type: str = "SPLIT_PAYMENT", state: str = "previewed") -> Transaction:
    now = clock.now()
    return Transaction(id="tx-seed", provider="secuconnect", state=state, items=quote.lines, currency="EUR",
                       payment_type=payment_type, provider_ref=quote.provider_ref,
                       details=quote.details, created_at=now, updated_at=now)


def body_of(message: httpx.Request | httpx.Response):
    return json.loads(message.content)


# --- what the driver sends ------------------------------------------------------------------------


def test_preview_authenticates_with_client_credentials_as_documented(driver, recorder, clock):
    driver.run(driver.preview(seed_preview(clock)))

    (token_request,) = recorder.sent("/oauth/token")
    assert token_request.method == "POST"
    assert str(token_request.url) == "https://connect-testing.secuconnect.com/oauth/token"
    assert token_request.headers["content-type"] == "application/json"
    assert body_of(token_request) == {
        "grant_type": "client_credentials",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
    }
    token_answer = body_of(recorder.exchanges[0][1])
    assert token_answer["expires_in"] == 1200


def test_preview_creates_the_seeds_smart_transaction_field_by_field(driver, recorder, clock):
    driver.run(driver.preview(seed_preview(clock)))

    token = body_of(recorder.exchanges[0][1])["access_token"]
    (create,) = recorder.sent("/api/v2/Smart/Transactions")
    assert create.method == "POST"
    assert str(create.url) == "https://connect-testing.secuconnect.com/api/v2/Smart/Transactions"
    assert create.headers[secu.ASSUMED_AUTH_HEADER] == f"Bearer {token}"
    assert create.headers["accept"] == "application/json"
    assert create.headers["content-type"] == "application/json"
    assert body_of(create) == {
        "basket": {"products": [
            {"id": 1, "articleNumber": "30037", "ean": "", "desc": "Sandwich Romano",
             "quantity": 1, "priceOne": 349, "tax": 7},
            {"id": 2, "articleNumber": "30200", "ean": "", "desc": "Fruit salad, small bowl",
             "quantity": 1, "priceOne": 249, "tax": 7},
            # A LineItem carries one product id: it is the articleNumber; ean stays empty.
            {"id": 3, "articleNumber": "51", "ean": "", "desc": "Water, mildly sprinkling, 0.25 ltr.",
             "quantity": 2, "priceOne": 99, "tax": 19},
        ]},
        "basket_info": {"sum": 796, "currency": "EUR"},
        "idents": [{"type": "card", "value": SEED_CARD}],
        "transactionRef": "tx-seed",
    }


def test_preview_applies_the_card_balance_with_pre_transaction(driver, recorder, clock):
    quote = driver.run(driver.preview(seed_preview(clock)))

    (pre,) = recorder.sent("/preTransaction")
    assert pre.method == "POST"
    assert pre.url.path == f"/api/v2/Smart/Transactions/{quote.provider_ref}/preTransaction"
    assert pre.headers[secu.ASSUMED_AUTH_HEADER].startswith("Bearer ")
    assert body_of(pre) == {}
    # developer.secuconnect.com/integration/ (applying the loyalty card) and the PHP SDK's
    # SmartTransactionsPreTransactionModel: the answer holds these two fields only
    assert body_of(recorder.exchanges[-1][1]) == {"missing_sum": 0, "bonus_products": []}


def test_preview_reads_the_answer_as_credits_in_basket_order(driver, clock):
    quote = driver.run(driver.preview(seed_preview(clock)))

    assert quote.provider_ref.startswith("STX_")
    assert [(line.credits.amount_minor, line.discount.amount_minor, line.outstanding.amount_minor)
            for line in quote.lines] == [(349, 0, 0), (249, 0, 0), (198, 0, 0)]
    assert [line.item for line in quote.lines] == list(SEED_BASKET.items)
    assert dict(quote.details) == {
        "smart_transaction_id": quote.provider_ref,
        "smart_transaction_status": "processing",
        "basket_sum": 796,
        "missing_sum": 0,
        "card_applied": True,
        "card_valid": True,
        "card_masked": MASKED_CARD,
        "card_id": "CRD_2U7MTNAMM3PMBPAB50C9G2AEHA9GPJ",
        "merchantcard_id": "MCD_2RXTNXPRM2YG9922UMBHHAEWEGN6AJ",
    }
    assert SEED_CARD not in repr(quote)


def test_finalize_reads_the_status_then_starts_with_loyalty_when_the_card_covers_all(
        driver, recorder, sandbox, clock):
    tx = snapshot(driver.run(driver.preview(seed_preview(clock))), clock)
    before = len(recorder.exchanges)

    outcome = driver.run(driver.finalize(tx, "k-fin"))

    get, start = (request for request, _ in recorder.exchanges[before:])
    assert (get.method, get.url.path) == ("GET", f"/api/v2/Smart/Transactions/{tx.provider_ref}")
    assert get.content == b""
    assert start.method == "POST"
    assert start.url.path == f"/api/v2/Smart/Transactions/{tx.provider_ref}/start/loyalty"
    assert body_of(start) == {}
    assert start.headers["accept"] == "application/json"
    assert start.headers["content-type"] == "application/json"
    assert outcome.details["payment_method"] == "loyalty"
    assert sandbox.card_balance(SEED_CARD) == 1000 - 796


# --- what the sandbox answers -----------------------------------------------------------------------

# Fields that differ per run: generated ids, the clock, and the card's last use (now).
VOLATILE = [
    ("id",), ("created",), ("updated",), ("transactions", 0, "id"), ("trans_id",),
    ("receipt", 2, "value", "value"), ("idents", 0, "merchantcard", "last_usage"),
]


def _without_volatile(answer: dict) -> dict:
    answer = copy.deepcopy(answer)
    for path in VOLATILE:
        node = answer
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = "<volatile>"
    return answer


def test_the_sandbox_answers_the_seeds_start_cash_request_with_the_seeds_answer(sandbox, clock):
    """Create the seed's basket, then the seed's request, verbatim (header spelling too)."""
    credentials = {"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID,
                   "client_secret": DEFAULT_CLIENT_SECRET}
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as http:
        token = http.post("/oauth/token", json=credentials).json()["access_token"]
        auth = {"Authenticate": f"Bearer {token}", "Accept": "application/json"}
        sent_fields = ("id", "articleNumber", "ean", "desc", "quantity", "priceOne", "tax")
        products = [{key: product[key] for key in sent_fields}
                    for product in SEED_START_CASH_RESPONSE["basket"]["products"]]
        created = http.post("/api/v2/Smart/Transactions", headers=auth, json={
            "basket": {"products": products}, "basket_info": {"sum": 796, "currency": "EUR"},
            "idents": [{"type": "card", "value": SEED_CARD}]}).json()
        # The seed's transaction was started 25:45 after it was created (09:18:14 -> 09:43:59):
        # longer than a token lives, within the assumed Smart Transaction lifetime.
        clock.advance(minutes=25, seconds=45)
        token = http.post("/oauth/token", json=credentials).json()["access_token"]
        auth["Authenticate"] = f"Bearer {token}"
        answer = http.post(f"/api/v2/Smart/Transactions/{created['id']}/start/cash", headers=auth,
                           content=b"{\n}").json()

    assert _without_volatile(answer) == _without_volatile(SEED_START_CASH_RESPONSE)
    assert answer["id"] == created["id"]
    assert answer["id"].startswith("STX_") and len(answer["id"]) == len(SEED_STX)
    assert answer["transactions"][0]["id"].startswith("LTX_")
    assert answer["receipt"][2]["value"]["value"] == answer["trans_id"]
    assert answer["idents"][0]["merchantcard"]["last_usage"] == answer["updated"]
    # Turnover recorded, nothing redeemed: exactly the seed's numbers.
    assert sandbox.card_balance(SEED_CARD) == 1000
    (booking,) = sandbox.loyalty_transactions
    assert (booking.turnover, booking.redeemed) == (796, 0)


# --- how the driver reads the seed's answer ----------------------------------------------------------


def _respond(request: httpx.Request, status: int, payload) -> httpx.Response:
    return httpx.Response(status, json=payload, request=request)


def test_the_driver_reads_the_seeds_start_cash_answer_verbatim(clock):
    """The seed's flow: a cash sale on the card (EXTERNAL_PAYMENT), answered by the seed."""
    driver = SecuconnectDriver(environment="sandbox", client_id="id", client_secret="secret", clock=clock)
    lines = [PricedLine.unpriced(item) for item in SEED_BASKET.items]
    tx = snapshot(Quote(lines=lines, provider_ref=SEED_STX), clock, payment_type="EXTERNAL_PAYMENT")
    before_start = {**copy.deepcopy(SEED_START_CASH_RESPONSE), "status": "created", "transactions": [],
                    "receipt": [], "payment_method": None, "trans_id": None}
    before_start["basket_info"]["missing_sum"] = None

    exchange = driver.finalize(tx, "k")
    token_request = next(exchange)
    assert token_request.url.path == "/oauth/token"
    get = exchange.send(_respond(token_request, 200, {"access_token": "qb56tjj1bcvo9n2nj4u38k84lo",
                                                      "expires_in": 1200}))
    assert (get.method, get.url.path) == ("GET", f"/api/v2/Smart/Transactions/{SEED_STX}")
    start = exchange.send(_respond(get, 200, before_start))
    assert (start.method, start.url.path) == ("POST", f"/api/v2/Smart/Transactions/{SEED_STX}/start/cash")
    assert start.headers["Authorization"] == "Bearer qb56tjj1bcvo9n2nj4u38k84lo"
    with pytest.raises(StopIteration) as done:
        exchange.send(_respond(start, 200, SEED_START_CASH_RESPONSE))

    outcome: Outcome = done.value.value
    assert outcome.provider_ref == SEED_STX
    assert outcome.receipt == SEED_RECEIPT
    assert dict(outcome.details) == {
        "smart_transaction_status": "ok",
        "payment_method": "cash",
        "trans_id": "29187332",
        "loyalty_transaction_id": "LTX_YBYPUETZ2HQXURG9XU0M5H4KGWW0NH",
        "missing_sum": 0,
    }
    assert SEED_CARD not in repr(outcome)
    assert [line.render() for line in outcome.receipt] == [
        "------------- Kundenkarte --------------",
        f"Kartennummer:{MASKED_CARD:>27}",  # name left, value right, 40 columns
        f"TA Code:{'29187332':>32}",
        "",
        "Umsatz erfasst:",
        "7,96 EUR",
        "",
        "Aktuelles Guthaben",
        "10,00 EUR",
    ]


def test_the_seeds_card_number_is_masked_in_every_receipt_spelling():
    assert secu.mask_card_numbers("Kartennummer: 9276004429942845") == f"Kartennummer: {MASKED_CARD}"
    assert secu.mask_card_numbers("9276 0044 2994 2845") == "**** **** **** 2845"
    assert secu.mask_card_numbers("TA Code: 29187332") == "TA Code: 29187332"  # 8 digits: not a card
    assert secu.mask_card_numbers("Summe 7,96 EUR") == "Summe 7,96 EUR"
    assert secu.CARD_MASK_KEEP == 4
