"""Cheers against its public pages (#12), the POS's product list, and a sandbox a newcomer can use (#9).

Sources, cited per test:

- AUTH: https://integration.cheersapp.io/docs/integrations/cheers-loyalty/authentication
  (the three headers and their examples, the environments table, the POS product endpoint);
- FLOW: https://integration.cheersapp.io/docs/integrations/cheers-loyalty/integration-flow
  (the preview curl example and its answer: the seed's worked example word for word,
  whose field-by-field contract is in ``test_cheers.py``);
- OVERVIEW: https://integration.cheersapp.io/docs/integrations/cheers-loyalty/overview
  (payment types, 1 credit = 1 unit, the endpoint summary).
"""

from __future__ import annotations

import json

import httpx
import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import ProviderRejected, ValidationError
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.driver import CatalogProduct, product_catalog
from tests.providers.test_cheers import SEED_PREVIEW_REQUEST, SEED_PREVIEW_RESPONSE

AUTH = "https://integration.cheersapp.io/docs/integrations/cheers-loyalty/authentication"
FLOW = "https://integration.cheersapp.io/docs/integrations/cheers-loyalty/integration-flow"

# AUTH's header examples, verbatim.
AUTH_API_KEY_EXAMPLE = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9..."
AUTH_TRANSACTION_KEY_EXAMPLE = "5ccd7850844b415091071c027930101f"
AUTH_IDEMPOTENCY_KEY_EXAMPLE = "a7e454c6-17ab-4fee-b823-c595bf3adb4a"
BEER_ID = "f04ce0c0-1034-40bf-a066-3e313f68c781"


def beers() -> Basket:
    return Basket([LineItem(BEER_ID, "Draft Beer 0.5L", 3, Money(50000, "HUF"), 27)])


# --- the public pages ----------------------------------------------------------------------


def test_auth_page_environments_table():
    """AUTH, "Environments": Sandbox api.dev.votesess.com, Production api.uniqpon.com."""
    assert dict(CheersDriver.environments) == {
        "sandbox": "https://api.dev.votesess.com",
        "production": "https://api.uniqpon.com",
    }


def test_auth_page_header_examples_go_out_verbatim_and_the_flow_answer_is_read(db_url, clock):
    """AUTH's three header examples and FLOW's preview curl example, against FLOW's answer."""
    sent = []

    def cheers_answers(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=SEED_PREVIEW_RESPONSE.encode())

    driver = CheersDriver(environment="sandbox", api_key=AUTH_API_KEY_EXAMPLE,
                          transport=httpx.MockTransport(cheers_answers))
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        tx = engine.preview("cheers", beers(), customer_token=AUTH_TRANSACTION_KEY_EXAMPLE,
                            idempotency_key=AUTH_IDEMPOTENCY_KEY_EXAMPLE, payment_type="SPLIT_PAYMENT")

    (request,) = sent
    assert str(request.url) == "https://api.dev.votesess.com/v3/integrations/credit-transactions/preview"
    assert request.headers["X-API-Key"] == AUTH_API_KEY_EXAMPLE
    assert request.headers["X-Transaction-Key"] == AUTH_TRANSACTION_KEY_EXAMPLE
    assert request.headers["X-Idempotency-Key"] == AUTH_IDEMPOTENCY_KEY_EXAMPLE
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == json.loads(SEED_PREVIEW_REQUEST)
    assert (tx.provider_ref, tx.total_credits, tx.total_discount) == (
        "b04ce0c0-1034-40bf-a066-3e313f68c782", Money(80000, "HUF"), Money(60000, "HUF"))


def test_the_sandbox_answers_flows_preview_example_with_flows_answer(clock):
    """FLOW, step 1: the curl example sent raw to the sandbox gets the documented answer."""
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_demo()
    response = httpx.Client(transport=sandbox.transport()).post(
        "https://api.dev.votesess.com/v3/integrations/credit-transactions/preview",
        headers={"X-API-Key": sandbox.credentials()["api_key"],
                 "X-Transaction-Key": AUTH_TRANSACTION_KEY_EXAMPLE,
                 "X-Idempotency-Key": AUTH_IDEMPOTENCY_KEY_EXAMPLE,
                 "Content-Type": "application/json"},
        content=SEED_PREVIEW_REQUEST.encode(),
    )
    assert response.status_code == 200
    assert response.json() == json.loads(SEED_PREVIEW_RESPONSE)


# --- the POS's product list (AUTH, "POS Requirements") --------------------------------------


def test_the_product_catalog_has_what_cheers_syncs_for_discount_validation():
    """AUTH: each product must include name, product id, gross price and VAT rate."""
    catalog = product_catalog([
        CatalogProduct(BEER_ID, "Draft Beer 0.5L", Money(50000, "HUF"), 27),
        CatalogProduct("lemonade-03", "Lemonade 0.3L", Money(45000, "HUF"), 5),
    ])
    assert catalog == [
        {"productId": BEER_ID, "name": "Draft Beer 0.5L", "unitPrice": 500, "vat": 27},
        {"productId": "lemonade-03", "name": "Lemonade 0.3L", "unitPrice": 450, "vat": 5},
    ]
    assert cheers.ASSUMED_CATALOG_FIELDS == ("productId", "name", "unitPrice", "vat")
    json.dumps(catalog)  # the POS serves it as JSON as it is


@pytest.mark.parametrize(
    "products",
    [
        [CatalogProduct("a", "A", Money(150, "HUF"), 27)],  # a fraction Cheers cannot price
        [CatalogProduct("a", "A", Money(100, "HUF"), 27)] * 2,  # one id, two products
        ["not a product"],
    ],
)
def test_the_product_catalog_refuses_what_cheers_could_not_match(products):
    with pytest.raises(ValidationError):
        product_catalog(products)


@pytest.mark.parametrize(
    ("product_id", "name", "vat"), [("", "A", 27), ("a", " ", 27), ("a", "A", 101), ("a", "A", True)]
)
def test_a_catalog_product_is_validated_at_the_boundary(product_id, name, vat):
    with pytest.raises((ValidationError, TypeError)):
        CatalogProduct(product_id, name, Money(100, "HUF"), vat)


# --- a sandbox a newcomer can use (#9 item 7) -------------------------------------------------


@pytest.fixture
def sandbox(clock) -> CheersSandbox:
    return CheersSandbox(clock=clock)


@pytest.fixture
def engine(db_url, sandbox, clock):
    driver = CheersDriver(environment="sandbox", **sandbox.credentials(), transport=sandbox.transport())
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        yield engine


def sale(engine, customer_token: str, key: str):
    tx = engine.preview("cheers", beers(), customer_token=customer_token, idempotency_key=key)
    return engine.finalize(tx.id)


def test_credentials_are_the_driver_keywords_for_this_sandbox(sandbox):
    assert sandbox.credentials() == {"api_key": "cheers-sandbox-terminal-key"}
    assert CheersSandbox(api_keys=["till-7"]).credentials() == {"api_key": "till-7"}


def test_seed_demo_is_idempotent_and_each_seeded_customer_can_pay(engine, sandbox):
    seeded = sandbox.seed_demo()
    assert sandbox.seed_demo() == seeded
    assert [entry["customer_token"] for entry in seeded] == [
        AUTH_TRANSACTION_KEY_EXAMPLE, "de000000c0ffeec0ffeec0ffeec0ffee"]
    assert all(set(entry) == {"customer_token", "description"} for entry in seeded)
    assert "800 credits" in seeded[0]["description"]

    worked, demo = (sale(engine, entry["customer_token"], f"sale-{n}") for n, entry in enumerate(seeded))

    # The docs' example: 600 off, 800 credits, 100 to pay (FLOW, "Reading the response").
    assert (worked.total_discount, worked.total_credits) == (Money(60000, "HUF"), Money(80000, "HUF"))
    assert demo.state == "finalized" and demo.total_credits == Money(90000, "HUF")
    assert [entry.kind for entry in sandbox.ledger] == ["finalize", "finalize"]


def test_issue_customer_gives_a_fresh_funded_one_time_key_so_a_second_sale_works(engine, sandbox):
    first, second = sandbox.issue_customer(), sandbox.issue_customer()
    assert first["customer_token"] != second["customer_token"]
    assert cheers.TRANSACTION_KEY_PATTERN.fullmatch(second["customer_token"])
    assert "credits" in first["description"]

    assert sale(engine, first["customer_token"], "sale-1").state == "finalized"
    assert sale(engine, second["customer_token"], "sale-2").state == "finalized"
    with pytest.raises(ProviderRejected, match="TRANSACTION_KEY_ALREADY_USED"):  # one-time, as at Cheers
        sale(engine, first["customer_token"], "sale-3")


def test_issue_customer_works_beside_seed_demo(sandbox):
    sandbox.seed_demo()
    issued = sandbox.issue_customer()
    assert issued["customer_token"] not in {entry["customer_token"] for entry in sandbox.seed_demo()}
