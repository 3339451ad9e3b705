"""Forloy against its public guides (#12 items 4 and 5) and the newcomer sandbox interface.

Sources named per test: seed 002 (the integration excerpt) and the public guides at
staging-api.forloy.com/en/guide/ (QR codes, offline-sync).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import ValidationError
from txengine.providers.forloy import forloy_pair
from txengine.providers.forloy import driver as forloy

COFFEE = Basket([LineItem("cof", "Coffee", 1, Money.of("4.50", "EUR"), 7)])


@pytest.fixture
def offline(clock):
    return forloy_pair(clock, offline=True)


def open_engine(db_url, driver, clock):
    return Engine.open(db_url, providers={"forloy": driver}, clock=clock)


def test_the_qr_guides_example_payload_is_scanned_and_recorded(clock, db_url):
    """QR guide: a card's QR payload looks like ``forloy_enr_abc123def456``."""
    sandbox, driver = forloy_pair(clock)
    (punch, *_) = sandbox.seed_demo()
    assert punch["customer_token"] == "forloy_enr_abc123def456"
    with open_engine(db_url, driver, clock) as pos:
        tx = pos.finalize(pos.preview("forloy", COFFEE, customer_token="forloy_enr_abc123def456").id)
    assert tx.state == "finalized"
    assert tx.details["reward_earned"] is True  # the demo card held 9 of 10 punches
    assert len(sandbox.transactions) == 1


@pytest.mark.parametrize("token", ["forloy enr", "forloy_enr_<script>", "ab\ncd"])
def test_tokens_that_cannot_be_a_qr_payload_are_refused_before_any_call(clock, token, db_url):
    sandbox, driver = forloy_pair(clock)
    with open_engine(db_url, driver, clock) as pos, pytest.raises(ValidationError, match="QR payload"):
        pos.preview("forloy", COFFEE, customer_token=token)
    assert sandbox.requests == []


def test_offline_sync_records_carry_the_qr_code_and_the_store_never_does(offline, clock, db_url, tmp_path):
    """Offline-sync guide: ``qr_code_data`` is required in every synced record."""
    sandbox, driver = offline
    card = sandbox.add_cashback_card(qr_code_data="forloy_enr_abc123def456")
    with open_engine(db_url, driver, clock) as pos:
        tx = pos.finalize(pos.preview("forloy", COFFEE, customer_token=card.qr_code_data).id)
        assert sandbox.transactions == []  # committed locally, recorded later
        pos.deliver_pending()
    (sync,) = [r for r in sandbox.requests if r.path.endswith("/transactions/sync")]
    (record,) = json.loads(sync.body)["transactions"]
    assert record["qr_code_data"] == "forloy_enr_abc123def456"
    assert [t.pos_reference_id for t in sandbox.transactions] == [tx.id]
    stored = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert b"forloy_enr_abc123def456" not in stored


def test_an_offline_sale_by_barcode_is_refused_up_front(offline, clock, db_url):
    sandbox, driver = offline
    card = sandbox.add_cashback_card()
    with open_engine(db_url, driver, clock) as pos, pytest.raises(ValidationError, match="QR code"):
        pos.preview("forloy", COFFEE, customer_token=card.barcode_value)
    assert sandbox.requests == []


def test_a_record_whose_qr_was_lost_with_a_restart_before_finalize_is_parked_not_sent(offline, clock, db_url):
    """The QR code lives in memory from the scan until finalize queues the record (which
    keeps it sealed): a restart between the two loses it, and the record cannot be sent
    in the documented shape."""
    sandbox, driver = offline
    card = sandbox.add_cashback_card()
    with open_engine(db_url, driver, clock) as pos:
        tx = pos.preview("forloy", COFFEE, customer_token=card.qr_code_data)
    restarted = forloy.ForloyDriver(base_url=sandbox.base_url, transport=sandbox.transport(), clock=clock,
                                    offline=True, **sandbox.credentials())
    with open_engine(db_url, restarted, clock) as pos:
        pos.finalize(tx.id)
        pos.deliver_pending()
        (delivery,) = pos.deliveries(tx.id)
    assert delivery.status == "dead" and forloy.QR_UNAVAILABLE in str(delivery.last_error)
    assert not any(r.path.endswith("/transactions/sync") for r in sandbox.requests)


def test_the_sandbox_refuses_a_synced_record_without_qr_code_data(clock):
    sandbox, driver = forloy_pair(clock)
    card = sandbox.add_cashback_card()
    record = {"card_instance_id": card.card_instance_id, "location_id": "loc_001",
              "staff_user_id": "staff_042", "purchase_amount": Decimal("4.50"), "idempotency_key": "k1",
              "client_timestamp": "2026-01-15T10:00:00.000Z"}
    answer = driver.run(driver._call("POST", "/transactions/sync", {"transactions": [record]}))
    (result,) = answer["results"]
    assert result["success"] is False and "qr_code_data" in result["error"]["message"]
    assert sandbox.transactions == []


class TestNewcomerSandbox:
    def test_seed_demo_is_idempotent_and_describes_each_card(self, clock):
        sandbox, _ = forloy_pair(clock)
        first = sandbox.seed_demo()
        assert sandbox.seed_demo() == first and len(sandbox.cards) == 3
        assert {"punch", "cashback", "discount"} == {c.card_type for c in sandbox.cards.values()}
        assert all(entry["customer_token"] and entry["description"] for entry in first)

    def test_credentials_and_a_fresh_customer_make_two_sales(self, clock, db_url):
        sandbox, _ = forloy_pair(clock)
        driver = forloy.ForloyDriver(base_url=sandbox.base_url, transport=sandbox.transport(),
                                     clock=clock, **sandbox.credentials())
        with open_engine(db_url, driver, clock) as pos:
            for _ in range(2):
                customer = sandbox.issue_customer()
                tx = pos.finalize(pos.preview("forloy", COFFEE, customer_token=customer["customer_token"]).id)
                assert tx.state == "finalized"
        assert len(sandbox.transactions) == 2


# --- the rewards guide (staging-api.forloy.com/en/guide/rewards), examples verbatim ---

GUIDE_PUNCH_LOOKUP = {"card_instance_id": "ci_abc123", "card_type": "punch", "card_name": "Coffee Loyalty Card",
                      "current_punches": 3, "punch_requirement": 10, "pending_rewards": 2,
                      "lifetime_punches": 23, "status": "active"}
GUIDE_CLAIM_BODY = {"card_instance_id": "ci_abc123", "location_id": "loc_456",
                    "staff_user_id": "a1b2c3d4-e5f6-7890-abcd-ef1234567890"}
GUIDE_CLAIM_ANSWER = {"transaction_id": "txn_reward_789", "reward_id": "rw_001", "reward_name": "Free Coffee",
                      "reward_amount": 1, "earned_at": "2026-03-08T14:30:00Z", "pending_rewards_remaining": 1}


def guide_driver(clock, answers: dict, seen: list):
    import httpx

    def answer(request):
        seen.append(request)
        if request.url.path.endswith("/auth/login"):
            data = {"access_token": "a", "refresh_token": "r", "expires_in": 3600}
        else:
            data = answers[request.url.path.rsplit("/api/v1", 1)[-1]]
        return httpx.Response(200, json={"success": True, "data": data})

    return forloy.ForloyDriver(environment="production", email="e", password="p", location_id="loc_456",
                               staff_user_id="a1b2c3d4-e5f6-7890-abcd-ef1234567890", clock=clock,
                               transport=httpx.MockTransport(answer))


def test_the_guides_flat_punch_lookup_prices_a_basket(clock):
    from tests.providers.test_forloy_driver import preview_request
    driver = guide_driver(clock, {"/cards/lookup": GUIDE_PUNCH_LOOKUP}, [])
    quote = driver.run(driver.preview(preview_request(clock, "forloy_enr_abc123def456", COFFEE)))
    assert quote.details["card_instance_id"] == "ci_abc123" and quote.details["card_title"] == "Coffee Loyalty Card"
    assert [line.value for line in quote.receipt if line.name == "Punches"] == ["3/10"]


def test_the_guides_claim_request_and_answer(clock):
    seen: list = []
    driver = guide_driver(clock, {"/rewards/claim": GUIDE_CLAIM_ANSWER}, seen)
    assert driver.run(driver.claim_reward("ci_abc123")) == GUIDE_CLAIM_ANSWER
    assert json.loads(seen[-1].content) == GUIDE_CLAIM_BODY


def test_the_sandbox_answers_the_guides_flat_cashback_lookup_and_the_driver_reads_it(clock, db_url):
    from txengine.providers.forloy import ForloySandbox
    sandbox = ForloySandbox(clock, flat_lookup=True)
    card = sandbox.add_cashback_card(balance="5.00")
    driver = forloy.ForloyDriver(base_url=sandbox.base_url, transport=sandbox.transport(), clock=clock,
                                 **sandbox.credentials())
    with open_engine(db_url, driver, clock) as pos:
        tx = pos.preview("forloy", COFFEE, customer_token=card.qr_code_data)
        assert {"cashback_balance", "cashback_rate", "current_tier_name"} <= set(tx.details["balance"])
        assert pos.finalize(tx.id).state == "finalized"
