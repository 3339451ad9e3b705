"""The sandbox toolkit a newcomer meets: customers on demand over HTTP, and a request log
that shows what happened without showing a secret."""

from __future__ import annotations

import logging

import httpx
import pytest

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import ADMIN_CUSTOMERS, Fault, Sandbox, serve


def test_a_new_customer_issued_over_http_can_pay_at_once(tmp_path):
    sandbox = ReferenceSandbox(FakeClock())
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as client:
        issued = client.post(ADMIN_CUSTOMERS)
    assert issued.status_code == 201
    customer = issued.json()["customer"]
    driver = ReferenceDriver(environment="sandbox", transport=sandbox.transport(), **sandbox.credentials())
    with Engine.open(f"sqlite:///{tmp_path / 'pos.db'}", providers={"reference": driver}) as engine:
        tx = engine.preview("reference", Basket([LineItem("beer", "Beer", 2, Money(500, "EUR"), 27)]),
                            customer_token=customer)
        assert engine.finalize(tx.id).state == "finalized"
    assert sandbox.balance(customer) == 10_000 - 1000  # unseeded: no discount, all in credits


def test_the_demo_seed_is_idempotent_and_names_its_customers():
    sandbox = ReferenceSandbox(FakeClock())
    first = sandbox.seed_demo()
    assert sandbox.seed_demo() == first
    assert {row["customer"] for row in first} == set(sandbox.wallets)


def test_a_sandbox_without_customers_on_demand_answers_404_with_a_reason():
    class Bare(Sandbox):
        name = "bare"

    response = httpx.Client(transport=Bare().transport(), base_url="https://bare.invalid").post(ADMIN_CUSTOMERS)
    assert response.status_code == 404
    assert response.json()["error"] == {"code": "NOT_OFFERED",
                                         "message": "the bare sandbox cannot issue customers on demand"}


def test_the_request_log_names_each_call_and_masks_secrets(caplog):
    sandbox = ReferenceSandbox(FakeClock())
    caplog.set_level(logging.INFO, logger="txengine.sandbox")
    with serve(sandbox) as served, httpx.Client(base_url=served.base_url, timeout=5) as client:
        customer = client.post(ADMIN_CUSTOMERS).json()["customer"]
        client.post("/previews", headers={"X-Api-Key": sandbox.api_key},
                    json={"customer": customer, "currency": "EUR",
                          "items": [{"name": "Tea", "quantity": 1, "unit_price": 250, "vat": "7"}]})
        client.get(f"/lookup/{customer}", params={"api_key": sandbox.api_key, "page": "2"})
    lines = [record.getMessage() for record in caplog.records if record.name == "txengine.sandbox"]
    assert lines[0].startswith(f"reference POST {ADMIN_CUSTOMERS}  -> 201 in ")
    assert lines[1].startswith("reference POST /previews  -> 200 in ")
    assert lines[2].startswith("reference GET /lookup/*** ?api_key=***&page=2 -> 404 in ")
    assert not any(customer in line or sandbox.api_key in line for line in lines)


def test_a_simulated_timeout_is_logged_as_one(caplog):
    sandbox = ReferenceSandbox(FakeClock())
    sandbox.faults.inject("preview", Fault.TIMEOUT_BEFORE_COMMIT)
    caplog.set_level(logging.INFO, logger="txengine.sandbox")
    with pytest.raises(httpx.ReadTimeout):
        httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url).post("/previews")
    assert "-> timeout (simulated) in" in caplog.records[-1].getMessage()
