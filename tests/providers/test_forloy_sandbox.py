"""The Forloy sandbox's business rules, spoken to as raw HTTP (no driver in between)."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest

from txengine.providers.forloy import ForloySandbox
from txengine.providers.forloy import driver as forloy
from txengine.providers.forloy.driver import dumps, loads


class Api:
    """A logged-in staff client for the sandbox: ``api.post(path, body)`` -> (status, body)."""

    def __init__(self, sandbox: ForloySandbox) -> None:
        self.sandbox = sandbox
        self.client = httpx.Client(transport=sandbox.transport())
        status, body = self.post("/auth/login", {"email": sandbox.STAFF_EMAIL,
                                                 "password": sandbox.STAFF_PASSWORD}, auth=False)
        assert status == 200, body
        self.token = body["data"]["access_token"]

    def _headers(self, auth: bool) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if auth:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def post(self, path: str, body, auth: bool = True):
        response = self.client.post(f"{self.sandbox.base_url}{path}", content=dumps(body),
                                    headers=self._headers(auth))
        self.last = response
        return response.status_code, loads(response.content)

    def get(self, path: str, **params):
        response = self.client.get(f"{self.sandbox.base_url}{path}", params=params,
                                   headers=self._headers(True))
        self.last = response
        return response.status_code, loads(response.content)

    def record(self, card, amount="4.50", **extra):
        body = {"card_instance_id": card.card_instance_id, "location_id": "loc_001",
                "staff_user_id": "staff_042", "purchase_amount": Decimal(amount), **extra}
        return self.post("/transactions/record", body)


@pytest.fixture
def sandbox(clock) -> ForloySandbox:
    return ForloySandbox(clock)


@pytest.fixture
def api(sandbox) -> Api:
    return Api(sandbox)


def error_code(answer) -> str:
    status, body = answer
    assert body["success"] is False
    return body["error"]["code"]


class TestEnvelope:
    def test_success_and_error_envelopes_carry_meta(self, api, sandbox, clock):
        card = sandbox.add_punch_card()
        status, body = api.post("/cards/lookup", {"barcode_value": card.barcode_value})
        assert status == 200 and body["success"] is True and set(body) == {"success", "data", "meta"}
        assert re.fullmatch(r"req_[0-9a-f]{12}", body["meta"]["request_id"])
        assert body["meta"]["timestamp"] == "2026-01-15T10:00:00.000Z"
        status, body = api.post("/cards/lookup", {"barcode_value": "90000000000000"})
        assert status == forloy.ASSUMED_CARD_NOT_FOUND_STATUS
        assert body["error"] == {"code": "CARD_NOT_FOUND", "message": "Card not found"}

    def test_malformed_requests_are_validation_errors(self, api, sandbox):
        card = sandbox.add_punch_card()
        assert error_code(api.post("/cards/lookup", {})) == forloy.ASSUMED_VALIDATION_ERROR
        both = {"barcode_value": card.barcode_value, "qr_code_data": card.qr_code_data}
        assert error_code(api.post("/cards/lookup", both)) == forloy.ASSUMED_VALIDATION_ERROR
        assert error_code(api.record(card, location_id="loc_999")) == forloy.ASSUMED_VALIDATION_ERROR
        assert error_code(api.record(card, amount="4.505")) == forloy.ASSUMED_VALIDATION_ERROR
        assert error_code(api.record(card, amount="-1.00")) == forloy.ASSUMED_VALIDATION_ERROR
        assert error_code(api.record(card, punch_count=0)) == forloy.ASSUMED_VALIDATION_ERROR
        assert api.last.status_code == forloy.ASSUMED_VALIDATION_STATUS
        assert sandbox.transactions == []


class TestCards:
    def test_lookup_by_qr_or_barcode_is_read_only(self, api, sandbox):
        card = sandbox.add_punch_card(current_punches=7, lifetime_punches=27)
        by_qr = api.post("/cards/lookup", {"qr_code_data": card.qr_code_data})[1]["data"]
        by_barcode = api.post("/cards/lookup", {"barcode_value": card.barcode_value})[1]["data"]
        assert by_qr == by_barcode == {
            "card_instance_id": card.card_instance_id, "card_type": "punch",
            "card_title": "Coffee Rewards", "merchant_name": "Bean & Brew",
            "customer_name": "Jane Doe", "status": "active",
            "balance": {"current_punches": 7, "punch_requirement": 10, "pending_rewards": 0,
                        "lifetime_punches": 27},
        }
        assert sandbox.transactions == [] and card.current_punches == 7

    def test_qr_payload_is_base64_json_naming_the_card(self, sandbox):
        import base64
        import json

        card = sandbox.add_punch_card()
        assert card.qr_code_data.startswith("eyJjYXJkX2luc3RhbmNlX2lkIjoi")  # as in the guide
        assert json.loads(base64.b64decode(card.qr_code_data))["card_instance_id"] == card.card_instance_id
        assert re.fullmatch(r"9000\d{10}", card.barcode_value)
        assert card.qr_code_data not in repr(card)

    def test_balances_of_cashback_and_discount_cards(self, api, sandbox):
        cashback = sandbox.add_cashback_card(balance="28.50", cashback_rate="0.05")
        discount = sandbox.add_discount_card(tiers=[("Silver", "0", "0.10"), ("Gold", "500", "0.15")],
                                             lifetime_spend="120.00")
        assert api.post("/cards/lookup", {"barcode_value": cashback.barcode_value})[1]["data"]["balance"] == {
            forloy.CASHBACK_BALANCE_FIELD: Decimal("28.50"), "cashback_rate": Decimal("0.05"),
            forloy.TIER_FIELD: "Standard"}
        assert api.post("/cards/lookup", {"barcode_value": discount.barcode_value})[1]["data"]["balance"] == {
            "discount_rate": Decimal("0.10"), forloy.TIER_FIELD: "Silver",
            "lifetime_spend": Decimal("120.00")}

    def test_an_inactive_card_cannot_record(self, api, sandbox):
        card = sandbox.add_cashback_card(status="suspended")
        assert error_code(api.record(card)) == forloy.ASSUMED_CARD_INACTIVE
        assert api.last.status_code == forloy.ASSUMED_CARD_INACTIVE_STATUS
        assert sandbox.transactions == []


class TestPunchCards:
    def test_punches_count_up_and_the_requirement_earns_a_reward(self, api, sandbox, clock):
        card = sandbox.add_punch_card(current_punches=8)
        first = api.record(card, punch_count=1)[1]["data"]
        assert {k: first[k] for k in ("card_type", "punches_added", "new_punch_count", "reward_earned", "reward")} == {
            "card_type": "punch", "punches_added": 1, "new_punch_count": 9, "reward_earned": False, "reward": None}
        clock.advance(minutes=1)
        second = api.record(card)[1]["data"]  # punch_count defaults to 1
        assert second["new_punch_count"] == 10 and second["reward_earned"] is True
        assert second["reward"] == {"reward_id": second["reward"]["reward_id"], "title": "Free Coffee",
                                    "description": "One free drink of your choice", "status": "pending_claim"}
        assert card.current_punches == 0 and card.lifetime_punches == 10
        lookup = api.post("/cards/lookup", {"barcode_value": card.barcode_value})[1]["data"]["balance"]
        assert (lookup["current_punches"], lookup["pending_rewards"]) == (0, 1)

    def test_punches_beyond_the_requirement_carry_over(self, api, sandbox):
        card = sandbox.add_punch_card(current_punches=8, punch_requirement=10)
        data = api.record(card, punch_count=5)[1]["data"]
        assert data["new_punch_count"] == 13 and data["reward_earned"] is True
        assert card.current_punches == 3 and len(sandbox.rewards_of(card.card_instance_id)) == 1

    def test_the_one_minute_cooldown_runs_on_the_sandbox_clock(self, api, sandbox, clock):
        card = sandbox.add_punch_card()
        assert api.record(card)[0] == 200
        clock.advance(seconds=29.5)
        status, body = api.record(card)
        assert (status, body["error"]["code"]) == (forloy.COOLDOWN_STATUS, forloy.COOLDOWN_ACTIVE)
        assert body["error"][forloy.ASSUMED_RETRY_AFTER_FIELD] == 31  # seconds, rounded up
        assert api.last.headers["retry-after"] == "31"
        clock.advance(seconds=30.5)  # exactly one minute after the punch: allowed again
        assert api.record(card)[0] == 200
        assert [tx.punches_added for tx in sandbox.transactions] == [1, 1]

    def test_the_cooldown_is_per_card_and_for_punch_cards_only(self, api, sandbox):
        punch, other, cashback = sandbox.add_punch_card(), sandbox.add_punch_card(), sandbox.add_cashback_card()
        assert api.record(punch)[0] == 200
        assert api.record(other)[0] == 200
        assert api.record(cashback)[0] == 200 and api.record(cashback)[0] == 200


class TestIdempotency:
    def test_a_repeated_key_returns_the_original_result_marked_idempotent(self, api, sandbox, clock):
        card = sandbox.add_punch_card(current_punches=7)
        original = api.record(card, idempotency_key="txn_20260115_103000_pos3")[1]["data"]
        clock.advance(seconds=10)  # inside the cooldown: the replay must not be refused
        replay = api.record(card, idempotency_key="txn_20260115_103000_pos3")[1]["data"]
        assert "idempotent" not in original
        assert replay == {**original, "idempotent": True}
        assert len(sandbox.transactions) == 1 and card.current_punches == 8

    def test_refusals_are_not_remembered(self, api, sandbox, clock):
        card = sandbox.add_punch_card()
        api.record(card, idempotency_key="first")
        assert error_code(api.record(card, idempotency_key="second")) == forloy.COOLDOWN_ACTIVE
        clock.advance(minutes=1)
        assert api.record(card, idempotency_key="second")[0] == 200
        assert len(sandbox.transactions) == 2


class TestCashbackAndDiscount:
    def test_cashback_is_earned_at_the_rate_and_added_to_the_balance(self, api, sandbox):
        card = sandbox.add_cashback_card(balance="28.50", cashback_rate="0.05")
        data = api.record(card, amount="85.00")[1]["data"]
        assert {k: v for k, v in data.items() if k != "transaction_id"} == {
            "card_type": "cashback", "purchase_amount": Decimal("85.00"), "cashback_rate": Decimal("0.05"),
            "cashback_earned": Decimal("4.25"), "new_balance": Decimal("32.75"), "tier_changed": False}
        assert b'"purchase_amount":85.00' in api.last.content
        assert card.balance == Decimal("32.75")

    def test_cashback_rounds_half_up_to_the_cent_and_tiers_change(self, api, sandbox):
        card = sandbox.add_cashback_card(tiers=[("Standard", "0", "0.05"), ("Gold", "90", "0.10")])
        data = api.record(card, amount="99.90")[1]["data"]
        assert data["cashback_earned"] == Decimal("5.00")  # 4.995 rounds up
        assert data["tier_changed"] is True
        assert api.record(card, amount="10.00")[1]["data"]["cashback_rate"] == Decimal("0.10")

    def test_discount_cards_answer_rate_amount_and_final_amount(self, api, sandbox):
        card = sandbox.add_discount_card(tiers=[("Silver", "0", "0.10"), ("Gold", "200", "0.15")])
        data = api.record(card, amount="120.00")[1]["data"]
        assert {k: v for k, v in data.items() if k != "transaction_id"} == {
            "card_type": "discount", "purchase_amount": Decimal("120.00"), "discount_rate": Decimal("0.10"),
            "discount_amount": Decimal("12.00"), "final_amount": Decimal("108.00")}
        api.record(card, amount="80.00")
        assert api.record(card, amount="10.00")[1]["data"]["discount_rate"] == Decimal("0.15")


class TestSync:
    def records(self, card, count, clock, step=timedelta(minutes=2)):
        return [{"qr_code_data": card.qr_code_data, "location_id": "loc_001",
                 "staff_user_id": "staff_042", "purchase_amount": Decimal("3.00"),
                 "idempotency_key": f"offline-{i}",
                 "client_timestamp": forloy.wire_timestamp(clock.now() - step * (count - i))}
                for i in range(count)]

    @pytest.mark.parametrize("count", [0, forloy.SYNC_BATCH_LIMIT + 1])
    def test_a_batch_holds_one_to_a_hundred_records(self, api, sandbox, clock, count):
        card = sandbox.add_punch_card()
        status, body = api.post("/transactions/sync", {"transactions": self.records(card, count, clock)})
        assert (status, body["error"]["code"]) == (forloy.ASSUMED_VALIDATION_STATUS, forloy.ASSUMED_VALIDATION_ERROR)
        assert sandbox.transactions == []

    def test_a_full_batch_records_everything_at_its_client_time(self, api, sandbox, clock):
        card = sandbox.add_punch_card(punch_requirement=1000)
        records = self.records(card, forloy.SYNC_BATCH_LIMIT, clock)
        data = api.post("/transactions/sync", {"transactions": records})[1]["data"]
        assert (data["synced_count"], data["failed_count"]) == (100, 0)
        assert [r["idempotency_key"] for r in data["results"]] == [r["idempotency_key"] for r in records]
        assert all(r["success"] and r["data"]["card_type"] == "punch" for r in data["results"])
        assert card.current_punches == 100
        assert sandbox.transactions[0].created_at == clock.now() - timedelta(minutes=200)
        assert {tx.via for tx in sandbox.transactions} == {"sync"}
        again = api.post("/transactions/sync", {"transactions": records})[1]["data"]
        assert all(r["data"]["idempotent"] for r in again["results"])
        assert card.current_punches == 100

    def test_each_record_succeeds_or_fails_on_its_own(self, api, sandbox, clock):
        card = sandbox.add_punch_card()
        records = self.records(card, 3, clock, step=timedelta(seconds=20))  # punches 20 s apart
        del records[2]["idempotency_key"]
        data = api.post("/transactions/sync", {"transactions": records})[1]["data"]
        assert [r["success"] for r in data["results"]] == [True, False, False]
        assert data["results"][1]["error"]["code"] == forloy.COOLDOWN_ACTIVE  # judged at client time
        assert data["results"][2]["error"]["code"] == forloy.ASSUMED_VALIDATION_ERROR
        assert (data["synced_count"], data["failed_count"]) == (1, 2)
        assert len(sandbox.transactions) == 1


class TestRewardsAndHistory:
    def test_rewards_are_claimed_oldest_first(self, api, sandbox, clock):
        card = sandbox.add_punch_card(punch_requirement=1)
        first = api.record(card)[1]["data"]["reward"]["reward_id"]
        clock.advance(minutes=1)
        second = api.record(card)[1]["data"]["reward"]["reward_id"]
        claim = {"card_instance_id": card.card_instance_id, "location_id": "loc_001", "staff_user_id": "staff_042"}
        claimed = api.post("/rewards/claim", claim)[1]["data"]
        assert (claimed["reward_id"], claimed["pending_rewards_remaining"]) == (first, 1)
        assert api.post("/rewards/claim", claim)[1]["data"]["reward_id"] == second
        assert error_code(api.post("/rewards/claim", claim)) == forloy.ASSUMED_NO_PENDING_REWARDS

    def test_history_is_newest_first_paged_and_filtered(self, api, sandbox, clock):
        card = sandbox.add_punch_card(punch_requirement=1000)
        start = clock.now()
        for _ in range(27):
            api.record(card)
            clock.advance(minutes=1)
        status, body = api.get("/transactions/history", card_instance_id=card.card_instance_id,
                               page=3, page_size=10)
        page = body["data"]
        assert page["pagination"] == {"page": 3, "page_size": 10, "total_count": 27, "total_pages": 3}
        assert len(page["transactions"]) == 7
        assert page["transactions"][-1]["created_at"] == forloy.wire_timestamp(start)
        assert set(page["transactions"][0]) == {"transaction_id", "transaction_type", "purchase_amount",
                                                "punches_added", "created_at", "location_name", "staff_name"}
        assert page["transactions"][0]["location_name"] == "Downtown Branch"
        default = api.get("/transactions/history", card_instance_id=card.card_instance_id)[1]["data"]
        assert default["pagination"]["page_size"] == 20
        windowed = api.get("/transactions/history", card_instance_id=card.card_instance_id,
                           from_date=forloy.wire_timestamp(start + timedelta(minutes=5)),
                           to_date=forloy.wire_timestamp(start + timedelta(minutes=9)))[1]["data"]
        assert windowed["pagination"]["total_count"] == 5
        none = api.get("/transactions/history", card_instance_id=card.card_instance_id,
                       transaction_type="cashback")[1]["data"]
        assert none["pagination"]["total_count"] == 0
        too_big = api.get("/transactions/history", card_instance_id=card.card_instance_id,
                          page_size=forloy.ASSUMED_HISTORY_MAX_PAGE_SIZE + 1)
        assert error_code(too_big) == forloy.ASSUMED_VALIDATION_ERROR
        assert error_code(api.get("/transactions/history")) == forloy.ASSUMED_VALIDATION_ERROR
