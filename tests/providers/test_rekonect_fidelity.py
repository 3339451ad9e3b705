"""Rekonect against its public docs (#12) and the newcomer's sandbox (#9 item 7).

One contract test per documented example, request and answer, each naming its source:

- [seed]    /work/shared/seeds/001_275983c781b9ee73.txt (the ``/transaction`` call)
- [format]  https://docs.rekonect.works/docs/overview/communication-format
            (= https://docs.protelloyalty.com/docs/overview/communication-format)
- [flow]    https://docs.rekonect.works/docs/flows/general-flow
- [member]  https://bade-docs.netlify.app/docs/api-calls/member-details
- [payment] https://bade-docs.netlify.app/docs/api-calls/payment
"""

from __future__ import annotations

import httpx
import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import ProviderRejected
from txengine.providers.rekonect import RekonectDriver, RekonectSandbox
from txengine.providers.rekonect import driver as policy
from txengine.providers.rekonect.sandbox import DOCS_MEMBER_KEY, rekonect_pair

HEADERS = {"x-source-type": "POS", "x-source-name": "docs", "x-pos-id": "P1", "x-branch-id": "B1"}

# [member] the request example, verbatim
MEMBER_DETAILS_EXAMPLE = {
    "member": {"phoneNumber": "530229344"},
    "transaction": {
        "transactionId": "TX-DEMO-01",
        "dateTime": "2025-06-17T18:30:00Z",
        "totalAmount": 1500,
        "items": [{"lineId": "1", "code": "LATTE001", "name": "Latte", "departmentCode": "DRINKS",
                   "departmentName": "Beverages", "quantity": 1, "subtotal": 1500, "total": 1500,
                   "tags": []}],
        "payments": [{"type": "CASH", "amount": 1500}],
        "employee": "Demo Cashier",
    },
    "usedAssets": [],
}

# [payment] the request example, verbatim
PAYMENT_EXAMPLE = {
    "member": {"phoneNumber": "5511122233"},
    "payment": {"action": "pay", "amount": 300},
    "transaction": {
        "transactionId": "TX300POINTS-003",
        "dateTime": "2025-06-18T12:15:00Z",
        "totalAmount": 3000,
        "items": [{"lineId": "1", "code": "PRD001", "name": "Espresso Machine",
                   "departmentCode": "APPLIANCES", "departmentName": "Home Appliances", "quantity": 1,
                   "subtotal": 3000, "total": 3000, "tags": []}],
        "payments": [{"type": "POINTS", "amount": 300}, {"type": "CASH", "amount": 2700}],
        "employee": "Cashier #3",
    },
}
# [payment] the answers, verbatim
PAYMENT_ANSWER_EXAMPLE = {"status": "success",
                          "data": {"confirmationCode": "ABC123XYZ", "newBalance": {"points": 1700, "credit": 0}}}
PAYMENT_ERROR_EXAMPLE = {"status": "error", "error": {
    "code": "407", "message": "creditBalance balance for members is insufficient to process the payment!"}}
# [seed] the submit's answer and error, verbatim
SUBMIT_ANSWER_EXAMPLE = {"status": "success", "data": {}}
SUBMIT_ERROR_EXAMPLE = {"status": "error", "error": {"code": "522", "message": "Used asset is already used."}}
# [format] the error example, verbatim
FORMAT_ERROR_EXAMPLE = {"status": "error", "error": {
    "code": "4001012", "message": "Member not found", "path": "body.member.phoneNumber"}}


def post(sandbox, path: str, body, **headers) -> httpx.Response:
    sent = {"x-api-key": sandbox.api_key, **HEADERS, **headers}
    with httpx.Client(transport=sandbox.transport(), base_url=sandbox.base_url) as client:
        return client.post(path, json=body, headers=sent)


@pytest.fixture
def seeded(clock) -> RekonectSandbox:
    sandbox = RekonectSandbox(clock)
    sandbox.seed_demo()
    return sandbox


def answering(body, status: int = 200) -> RekonectDriver:
    """A driver whose every call is answered with one documented body."""
    return RekonectDriver(environment="sandbox", api_key="k", source_name="s", pos_id="p", branch_id="b",
                          transport=httpx.MockTransport(lambda request: httpx.Response(status, json=body)))


def basket() -> Basket:
    return Basket([LineItem("PRD001", "Espresso Machine", 1, Money(3000, "EUR"), 20)])


def sale(engine: Engine, token: str):
    tx = engine.preview("rekonect", basket(), customer_token=token)
    return engine.finalize(tx.id)


# --- the sandbox answers the documented requests -----------------------------------------------


class TestDocumentedRequests:
    def test_member_details_example_with_benefits(self, seeded):  # [member]
        answer = post(seeded, "/v1/member/details", MEMBER_DETAILS_EXAMPLE, **{"x-return-benefits": "true"})
        assert answer.status_code == 200
        data = answer.json()["data"]
        assert data["member"]["membershipKey"] == DOCS_MEMBER_KEY
        assert (data["member"]["firstName"], data["member"]["lastName"]) == ("John", "Doe")
        assert data["benefits"]["totalDiscount"] == 0

    def test_payment_example_answers_the_documented_balance(self, seeded):  # [payment]
        answer = post(seeded, "/v1/payment", PAYMENT_EXAMPLE)
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == "success"
        # the docs' member pays 300 with points and keeps 1700 points, 0 credit
        assert body["data"]["newBalance"] == PAYMENT_ANSWER_EXAMPLE["data"]["newBalance"]

    def test_payment_example_beyond_the_balance_is_the_documented_407(self, seeded):  # [payment]
        refused = post(seeded, "/v1/payment", {**PAYMENT_EXAMPLE, "payment": {"action": "pay", "amount": 2001}})
        assert refused.json()["error"]["code"] == PAYMENT_ERROR_EXAMPLE["error"]["code"]

    def test_submit_example_answers_the_documented_empty_data(self, seeded):  # [seed]
        seeded.add_member("1234567890")
        seeded.add_asset("1234567890", "string", key="string")
        seeded.add_deal("any", key="string")
        from tests.providers.test_rekonect import SEED_SUBMIT_EXAMPLE

        answer = post(seeded, "/v1/transaction", SEED_SUBMIT_EXAMPLE)
        assert answer.json() == SUBMIT_ANSWER_EXAMPLE

    def test_unknown_member_is_the_documented_error_with_its_path(self, seeded):  # [format]
        answer = post(seeded, "/v1/member/details", {"member": {"phoneNumber": "999999999"}})
        assert answer.json() == FORMAT_ERROR_EXAMPLE

    def test_each_call_takes_its_own_documented_shape(self, seeded):  # [member] [payment] [seed]
        seed_shaped = {**PAYMENT_EXAMPLE["transaction"], "openTime": "2025-06-18T12:15:00Z"}
        del seed_shaped["dateTime"]
        refused = post(seeded, "/v1/payment", {**PAYMENT_EXAMPLE, "transaction": seed_shaped})
        assert refused.json()["status"] == "error"


# --- the driver works with the documented answers ----------------------------------------------


class TestDocumentedAnswers:
    def test_the_payment_answer_example_finalizes(self, clock):  # [payment]
        paying = answering(PAYMENT_ANSWER_EXAMPLE)
        outcome = paying.run(paying.finalize(fake_paid_tx(clock), "fin-1"))
        assert outcome.provider_ref == "ABC123XYZ"
        assert outcome.details["balance"] == {"points": 1700, "credit": 0}

    def test_the_submit_answer_example_delivers(self, clock):  # [seed]
        from tests.providers.test_rekonect import submit_delivery

        driver = answering(SUBMIT_ANSWER_EXAMPLE)
        assert driver.run(driver.deliver((submit_delivery(driver, fake_paid_tx(clock)),))) is None

    def test_the_payment_error_example_is_a_refusal(self, clock):  # [payment]
        driver = answering(PAYMENT_ERROR_EXAMPLE, status=400)
        tx = fake_paid_tx(clock)
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.finalize(tx, "fin-1"))
        assert refused.value.code == "407" and refused.value.provider_message == policy.CASHIER_MESSAGES["407"]

    def test_the_format_error_example_is_a_refusal_by_its_code(self, clock):  # [format]
        from tests.providers.test_rekonect import preview_request

        driver = answering(FORMAT_ERROR_EXAMPLE, status=404)
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.preview(preview_request(clock)))
        assert refused.value.code == "4001012"

    def test_the_submit_error_example_parks_nothing_silently(self, clock):  # [seed]
        from tests.providers.test_rekonect import submit_delivery

        driver = answering(SUBMIT_ERROR_EXAMPLE, status=400)
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.deliver((submit_delivery(driver, fake_paid_tx(clock)),)))
        assert refused.value.code == "522"

    def test_refund_with_the_documented_submit_answer(self, clock, db_url):  # [seed] #12 item 3
        sandbox, driver = rekonect_pair(clock)  # answers the submit with data: {}
        sandbox.seed_demo()
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            tx = sale(engine, "5511122233")
            assert engine.deliver_pending() == 1
            refunded = engine.refund(tx.id)
        assert refunded.state == "refunded"
        assert refunded.details["payment_cancelled"] is True
        assert refunded.details["purchase_cancelled"] is False
        assert refunded.details["purchase_not_cancelled"] == policy.NO_PURCHASE_CODE_REASON
        assert any(line.text == policy.NO_PURCHASE_CODE_RECEIPT for line in refunded.receipt)
        assert sandbox.balance("5511122233") == sandbox.opening_balances["5511122233"]
        assert sandbox.purchases[tx.id].status == "recorded"  # no code to cancel it by

    def test_refund_with_a_confirmation_code_cancels_the_purchase(self, clock, db_url):  # [seed] cancel flow
        sandbox, driver = rekonect_pair(clock, sandbox_options={"submit_answers_code": True})
        sandbox.seed_demo()
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            tx = sale(engine, "5511122233")
            refunded = engine.refund(tx.id)
        assert refunded.details["purchase_cancelled"] and refunded.details["payment_cancelled"]
        assert sandbox.purchases[tx.id].status == "cancelled"

    def test_published_hosts(self):  # [format]
        assert RekonectDriver.environments == {"sandbox": "https://dev-pos-api.fidelizacion.app",
                                               "production": "https://pos-api.fidelizacion.app"}


# --- the wallet a payment draws is the business's configuration ----------------------------


class TestPaymentAsset:  # [flow] "determined automatically based on business' configuration"
    def test_a_points_business_never_promises_credit(self, clock, db_url):
        sandbox, driver = rekonect_pair(clock)
        sandbox.add_member("5550001111", points=100, credit=5000)
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            tx = engine.preview("rekonect", basket(), customer_token="5550001111")
            assert tx.total_credits.amount_minor == 100  # not 3000: the credit would be refused
            assert engine.finalize(tx.id).state == "finalized"
        assert (sandbox.balance("5550001111").points, sandbox.balance("5550001111").credit) == (0, 5000)

    def test_a_credit_business_pays_with_credit(self, clock, db_url):
        sandbox, driver = rekonect_pair(clock, sandbox_options={"payment_asset": "credit"})
        assert driver.payment_asset == "credit"  # from sandbox.credentials()
        sandbox.add_member("5550001111", points=5000, credit=700)
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            tx = engine.preview("rekonect", basket(), customer_token="5550001111")
            assert tx.details["loyalty_payment"] == {"credit": 700, "points": 0}
            done = engine.finalize(tx.id)
        assert [(r.name, r.value) for r in done.receipt][0] == ("Paid with credit", "7.00 EUR")
        assert sandbox.balance("5550001111").credit == 0 and sandbox.balance("5550001111").points == 5000

    def test_a_mismatched_configuration_is_a_407_not_a_silent_charge(self, clock, db_url):
        sandbox, driver = rekonect_pair(clock, payment_asset="credit")  # the business draws points
        sandbox.add_member("5550001111", points=0, credit=700)
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            tx = engine.preview("rekonect", basket(), customer_token="5550001111")
            with pytest.raises(ProviderRejected) as refused:
                engine.finalize(tx.id)
        assert refused.value.code == "407" and not sandbox.payments

    def test_payment_asset_is_validated(self):
        from txengine.errors import ValidationError

        with pytest.raises(ValidationError, match="payment_asset"):
            RekonectDriver(environment="sandbox", api_key="k", source_name="s", pos_id="p", branch_id="b",
                           payment_asset="miles")


# --- a sandbox a newcomer can use (#9 item 7) ---------------------------------------------------


class TestNewcomerSandbox:
    def test_seed_demo_seeds_the_docs_members_once(self, clock):
        sandbox = RekonectSandbox(clock)
        first = sandbox.seed_demo()
        again = sandbox.seed_demo()
        assert [c["customer_token"] for c in first] == ["530229344", DOCS_MEMBER_KEY, "5511122233"]
        assert all(set(c) == {"customer_token", "description"} and c["description"] for c in first)
        assert [c["customer_token"] for c in again] == [c["customer_token"] for c in first]
        assert len(sandbox.members) == 2 and len(sandbox.assets) == 1 and len(sandbox.deals) == 1

    def test_credentials_and_every_seeded_customer_make_a_sale(self, clock, db_url):
        sandbox = RekonectSandbox(clock)
        customers = sandbox.seed_demo()
        driver = RekonectDriver(**sandbox.credentials(), environment="sandbox", transport=sandbox.transport())
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            for customer in customers:
                assert sale(engine, customer["customer_token"]).state == "finalized"

    def test_issue_customer_gives_a_new_funded_member_each_time(self, clock, db_url):
        sandbox = RekonectSandbox(clock)
        sandbox.seed_demo()
        first, second = sandbox.issue_customer(), sandbox.issue_customer()
        assert first["customer_token"] != second["customer_token"]
        assert "points" in first["description"]
        driver = RekonectDriver(**sandbox.credentials(), environment="sandbox", transport=sandbox.transport())
        with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
            for customer in (first, second):
                tx = sale(engine, customer["customer_token"])
                assert (tx.state, tx.total_credits.amount_minor) == ("finalized", 3000)

    def test_credentials_are_sandbox_only_demo_values(self, clock):
        sandbox = RekonectSandbox(clock)
        assert set(sandbox.credentials()) == {"api_key", "source_type", "source_name", "pos_id", "branch_id",
                                              "payment_asset"}
        assert sandbox.credentials()["api_key"] == sandbox.api_key


# --- helpers: a transaction as the engine would hand it over -----------------------------------


def fake_paid_tx(clock):
    """A member's previewed transaction paying 1500 with points (what finalize receives)."""
    from tests.providers.test_rekonect import previewed

    sandbox = RekonectSandbox(clock)
    sandbox.add_member("5511122233", points=1500)
    driver = RekonectDriver(environment="sandbox", api_key=sandbox.api_key, source_name="s", pos_id="p",
                            branch_id="b", transport=sandbox.transport())
    return previewed(driver, clock)


def test_the_employee_travels_in_every_documented_transaction(clock, db_url):  # [member] [payment] [seed]
    import json

    sandbox, driver = rekonect_pair(clock, employee="Cashier #3")
    sandbox.seed_demo()
    with Engine.open(db_url, providers={"rekonect": driver}, clock=clock) as engine:
        sale(engine, "5511122233")
        engine.deliver_pending()
    sent = [json.loads(request.body)["transaction"] for request in sandbox.requests[1:]]
    assert [t["employee"] for t in sent] == ["Cashier #3"] * 3  # benefits, pay, submit
    assert "employee" not in json.loads(sandbox.requests[0].body)  # identify: a member only
