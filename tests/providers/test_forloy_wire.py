"""Forloy on the wire: paths, methods, headers, field names and exact money, per shape.

Two sources of truth: the sandbox's request log (what the driver sends), and the
integration guide's own example answers, replayed verbatim (what the driver must read).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from txengine import Basket, LineItem, Money
from txengine.clock import UTC
from txengine.drivers import Delivery, PreviewRequest
from txengine.errors import ProviderRejected, ValidationError
from txengine.secret import Secret
from txengine.providers.forloy import ForloyDriver, ForloySandbox, forloy_pair
from txengine.providers.forloy import driver as forloy

BASE = "https://api.forloy.com/api/v1"


@pytest.fixture
def pair(clock):
    return forloy_pair(clock, pos_terminal_id="pos3")


def basket(*prices: str, currency: str = "EUR") -> Basket:
    return Basket([LineItem(f"p{i}", f"Item {i}", 1, Money.of(p, currency), 7) for i, p in enumerate(prices)])


def preview(driver, clock, token: str, items: Basket, key: str = "k1"):
    request = PreviewRequest("tx_1", items, Secret(token), "SPLIT_PAYMENT", key, clock.now())
    return driver.run(driver.preview(request))


def previewed_tx(quote, items: Basket, clock, tx_id: str = "tx_1"):
    """A snapshot as the engine would hold it after this quote (no engine needed)."""
    from txengine.models import Transaction

    return Transaction(id=tx_id, provider="forloy", state="previewed", items=quote.lines,
                       currency=items.currency, details=dict(quote.details),
                       created_at=clock.now(), updated_at=clock.now())


def sent(sandbox, operation_path: str):
    return [r for r in sandbox.requests if r.path == f"/api/v1{operation_path}"]


class TestRequests:
    def test_login_is_a_plain_post_of_email_and_password(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        preview(driver, clock, card.barcode_value, basket("4.50"))
        (login,) = sent(sandbox, "/auth/login")
        assert login.method == "POST"
        assert login.header("content-type") == "application/json"
        assert login.header("authorization") is None
        assert json.loads(login.body) == {"email": ForloySandbox.STAFF_EMAIL,
                                          "password": ForloySandbox.STAFF_PASSWORD}

    def test_lookup_by_qr_sends_the_base64_payload_with_the_bearer_token(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        preview(driver, clock, card.qr_code_data, basket("4.50"))
        (lookup,) = sent(sandbox, "/cards/lookup")
        assert lookup.method == "POST"
        assert lookup.header("authorization") == f"Bearer {driver._session.access_token.reveal()}"
        assert json.loads(lookup.body) == {"qr_code_data": card.qr_code_data}

    def test_lookup_by_barcode_sends_the_numeric_display_id(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        preview(driver, clock, card.barcode_value, basket("4.50"))
        (lookup,) = sent(sandbox, "/cards/lookup")
        assert json.loads(lookup.body) == {"barcode_value": card.barcode_value}

    def test_punch_record_carries_every_documented_field_and_no_qr(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card(current_punches=7)
        items = basket("4.50")
        quote = preview(driver, clock, card.qr_code_data, items)
        driver.run(driver.finalize(previewed_tx(quote, items, clock), "txn_20260115_103000_pos3"))
        (record,) = sent(sandbox, "/transactions/record")
        assert record.method == "POST"
        assert record.header("authorization").startswith("Bearer ")
        assert json.loads(record.body, parse_float=Decimal) == {
            "card_instance_id": card.card_instance_id,
            "location_id": "loc_001",
            "staff_user_id": "staff_042",
            "purchase_amount": Decimal("4.50"),
            "punch_count": 1,
            "idempotency_key": "txn_20260115_103000_pos3",
            "pos_reference_id": "tx_1",
            "pos_terminal_id": "pos3",
        }
        # a JSON number with the cents written out, exactly as the guide shows it
        assert b'"purchase_amount":4.50' in record.body
        assert card.qr_code_data.encode() not in record.body

    def test_cashback_record_has_no_punch_count(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_cashback_card()
        items = basket("85.00")
        quote = preview(driver, clock, card.barcode_value, items)
        driver.run(driver.finalize(previewed_tx(quote, items, clock), "txn_20260115_104500_pos3"))
        body = json.loads(sent(sandbox, "/transactions/record")[0].body, parse_float=Decimal)
        assert "punch_count" not in body
        assert body["purchase_amount"] == Decimal("85.00")

    @pytest.mark.parametrize(("currency", "price", "wire"), [
        ("EUR", "24.50", b"24.50"), ("JPY", "450", b"450"), ("KWD", "1.250", b"1.250"),
    ])
    def test_money_goes_out_in_decimal_major_units_of_the_configured_currency(self, clock, currency, price, wire):
        sandbox = ForloySandbox(clock, currency=currency)
        sandbox_card = sandbox.add_cashback_card(cashback_rate="0.10")
        driver = ForloyDriver(environment="production", email=sandbox.STAFF_EMAIL, password=sandbox.STAFF_PASSWORD,
                              location_id="loc_001", staff_user_id="staff_042", currency=currency,
                              clock=clock, transport=sandbox.transport())
        items = basket(price, currency=currency)
        quote = preview(driver, clock, sandbox_card.barcode_value, items)
        outcome = driver.run(driver.finalize(previewed_tx(quote, items, clock), "k"))
        assert b'"purchase_amount":' + wire + b"," in sent(sandbox, "/transactions/record")[0].body
        assert sandbox.transactions[0].purchase_amount == Decimal(price)
        earned = Money.of(outcome.details["cashback_earned"], currency)
        assert earned == Money.of((Decimal(price) / 10).quantize(Decimal(1).scaleb(-earned.exponent)), currency)

    def test_sync_batches_records_with_their_keys_and_client_timestamps(self, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        card = sandbox.add_cashback_card()
        items = basket("12.30")
        quote = preview(driver, clock, card.qr_code_data, items)
        tx = previewed_tx(quote, items, clock)
        from attrs import evolve

        tx = evolve(tx, state="finalized", finalized_at=datetime(2026, 1, 15, 10, 30, 5, 120000, tzinfo=UTC))
        payload = driver.delivery_payload("record", tx)
        delivery = Delivery(1, tx.id, "forloy", "record", payload, f"{tx.id}:record")
        driver.run(driver.deliver((delivery,)))
        (sync,) = sent(sandbox, "/transactions/sync")
        assert sync.method == "POST"
        # the offline-sync guide (staging-api.forloy.com/en/guide/offline-sync): qr_code_data per record
        assert json.loads(sync.body, parse_float=Decimal) == {"transactions": [{
            "qr_code_data": card.qr_code_data,
            "location_id": "loc_001",
            "staff_user_id": "staff_042",
            "purchase_amount": Decimal("12.30"),
            "pos_reference_id": "tx_1",
            "client_timestamp": "2026-01-15T10:30:05.120Z",
            "idempotency_key": "tx_1:record",
        }]}

    def test_history_is_a_get_with_documented_query_parameters(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        driver.run(driver.transaction_history(
            card.card_instance_id, page=2, page_size=10, transaction_type="punch",
            from_date=datetime(2026, 1, 1, tzinfo=UTC), to_date=datetime(2026, 1, 31, tzinfo=UTC)))
        (history,) = sent(sandbox, "/transactions/history")
        assert history.method == "GET" and history.body == b""
        assert history.query == {
            "card_instance_id": card.card_instance_id, "page": "2", "page_size": "10",
            "transaction_type": "punch", "from_date": "2026-01-01T00:00:00.000Z",
            "to_date": "2026-01-31T00:00:00.000Z",
        }

    def test_claim_and_me(self, pair):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        profile = driver.run(driver.me())
        assert profile["id"] == "staff_042"
        (me,) = sent(sandbox, "/auth/me")
        assert me.method == "GET" and me.header("authorization").startswith("Bearer ")
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.claim_reward(card.card_instance_id))
        assert refused.value.code == forloy.ASSUMED_NO_PENDING_REWARDS
        (claim,) = sent(sandbox, "/rewards/claim")
        assert json.loads(claim.body) == {"card_instance_id": card.card_instance_id,
                                          "location_id": "loc_001", "staff_user_id": "staff_042"}


class TestJsonCodec:
    def test_decimals_are_written_as_numbers_exactly(self):
        assert forloy.dumps({"a": Decimal("24.50"), "b": [Decimal("0.10"), 1, None, True, "x"]}) == (
            b'{"a":24.50,"b":[0.10,1,null,true,"x"]}'
        )

    def test_floats_and_non_finite_amounts_never_go_out(self):
        with pytest.raises(TypeError):
            forloy.dumps({"purchase_amount": 24.5})
        with pytest.raises(ValueError):
            forloy.dumps(Decimal("NaN"))

    def test_answers_parse_fractions_as_decimals_and_refuse_nan(self):
        assert forloy.loads(b'{"x": 4.25, "n": 3}') == {"x": Decimal("4.25"), "n": 3}
        assert type(forloy.loads(b"0.1")) is Decimal
        with pytest.raises(ValueError):
            forloy.loads(b'{"x": NaN}')

    def test_timestamps_are_utc_milliseconds_with_z(self):
        assert forloy.wire_timestamp(datetime(2026, 1, 15, 10, 30, 0, 999999, tzinfo=UTC)) == (
            "2026-01-15T10:30:00.999Z"
        )


# --- the guide's own example answers, replayed verbatim ----------------------------------------

SEED_META = '"meta": {"request_id": "req_abc123", "timestamp": "2026-01-15T10:30:00.000Z"}'
SEED_LOOKUP = """{
"success": true,
"data": {
"card_instance_id": "a1b2c3d4-e5f6-7890-abcd-ef1234567890",
"card_type": "punch",
"card_title": "Coffee Rewards",
"merchant_name": "Bean & Brew",
"customer_name": "Jane Doe",
"status": "active",
"balance": {
"current_punches": 7,
"punch_requirement": 10,
"pending_rewards": 0,
"lifetime_punches": 27
}
},
"meta": {
"request_id": "req_abc123",
"timestamp": "2026-01-15T10:30:00.000Z"
}
}"""
SEED_PUNCH = """{"success": true, "data": {
"transaction_id": "txn_9f8e7d6c-5b4a-3210-fedc-ba0987654321", "card_type": "punch",
"punches_added": 1, "new_punch_count": 8, "reward_earned": false, "reward": null}, %s}""" % SEED_META
SEED_REWARD = """{"success": true, "data": {
"transaction_id": "txn_1a2b3c4d-5e6f-7890-abcd-ef1234567890", "card_type": "punch",
"punches_added": 1, "new_punch_count": 10, "reward_earned": true,
"reward": {"reward_id": "rwd_abc123", "title": "Free Coffee",
"description": "One free drink of your choice", "status": "pending_claim"}}, %s}""" % SEED_META
SEED_IDEMPOTENT = """{"success": true, "data": {
"transaction_id": "txn_9f8e7d6c-5b4a-3210-fedc-ba0987654321", "card_type": "punch",
"punches_added": 1, "new_punch_count": 8, "reward_earned": false, "reward": null,
"idempotent": true}, %s}""" % SEED_META
SEED_CASHBACK = """{"success": true, "data": {
"transaction_id": "txn_cb001122-3344-5566-7788-99aabbccddee", "card_type": "cashback",
"purchase_amount": 85.00, "cashback_rate": 0.05, "cashback_earned": 4.25,
"new_balance": 32.75, "tier_changed": false}, %s}""" % SEED_META
SEED_DISCOUNT = """{"success": true, "data": {
"transaction_id": "txn_dc112233-4455-6677-8899-aabbccddeeff", "card_type": "discount",
"purchase_amount": 120.00, "discount_rate": 0.10, "discount_amount": 12.00,
"final_amount": 108.00}, %s}""" % SEED_META
SEED_HISTORY = """{"success": true, "data": {"transactions": [
{"transaction_id": "txn_9f8e7d6c-5b4a-3210-fedc-ba0987654321", "transaction_type": "punch",
 "purchase_amount": 4.50, "punches_added": 1, "created_at": "2026-01-15T10:30:05.000Z",
 "location_name": "Downtown Branch", "staff_name": "Alex M."},
{"transaction_id": "txn_1a2b3c4d-5e6f-7890-abcd-ef1234567890", "transaction_type": "punch",
 "purchase_amount": 5.00, "punches_added": 1, "created_at": "2026-01-14T09:15:00.000Z",
 "location_name": "Airport Kiosk", "staff_name": "Sam K."}],
"pagination": {"page": 1, "page_size": 10, "total_count": 27, "total_pages": 3}}, %s}""" % SEED_META
# Login's shape beyond the three documented fields is ours (ASSUMED in the fidelity note).
LOGIN = '{"success": true, "data": {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}}'


def seed_driver(routes: dict[str, str], clock) -> tuple[ForloyDriver, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path.removeprefix("/api/v1")
        body = LOGIN if path == "/auth/login" else routes[path]
        return httpx.Response(200, content=body.encode(), headers={"content-type": "application/json"})

    driver = ForloyDriver(environment="production", email="e@x", password="pw", location_id="loc_001", staff_user_id="staff_042",
                          clock=clock, transport=httpx.MockTransport(answer))
    return driver, seen


class TestTheGuidesExamples:
    def test_a_punch_card_lookup_prices_nothing_and_keeps_the_card(self, clock):
        driver, seen = seed_driver({"/cards/lookup": SEED_LOOKUP}, clock)
        items = basket("4.50")
        quote = preview(driver, clock, "eyJjYXJkX2luc3RhbmNlX2lkIjoiYTFiMmMzZDQtZTVmNi4uLiJ9", items)
        assert [str(seen[0].url), str(seen[1].url)] == [f"{BASE}/auth/login", f"{BASE}/cards/lookup"]
        (line,) = quote.lines
        assert (line.discount, line.credits, line.outstanding) == (Money(0, "EUR"), Money(0, "EUR"), Money(450, "EUR"))
        assert quote.details["card_instance_id"] == "a1b2c3d4-e5f6-7890-abcd-ef1234567890"
        assert quote.details["card_type"] == "punch"
        assert quote.details["balance"]["current_punches"] == 7
        assert ("Punches", "7/10") in [(r.name, r.value) for r in quote.receipt]

    @pytest.mark.parametrize(("answer", "replay", "count", "reward"), [
        (SEED_PUNCH, False, 8, None), (SEED_IDEMPOTENT, True, 8, None),
        (SEED_REWARD, False, 10, {"reward_id": "rwd_abc123", "title": "Free Coffee",
                                  "description": "One free drink of your choice", "status": "pending_claim"}),
    ])
    def test_punch_answers(self, clock, answer, replay, count, reward):
        driver, _ = seed_driver({"/cards/lookup": SEED_LOOKUP, "/transactions/record": answer}, clock)
        items = basket("4.50")
        quote = preview(driver, clock, "12345", items)
        outcome = driver.run(driver.finalize(previewed_tx(quote, items, clock), "k"))
        assert outcome.details["new_punch_count"] == count
        assert outcome.details["idempotent_replay"] is replay
        assert outcome.details["reward_earned"] is (reward is not None)
        assert outcome.details["reward"] == reward
        assert outcome.provider_ref.startswith("txn_")
        if reward:
            assert any("Free Coffee" in line.text for line in outcome.receipt)

    def test_cashback_answer(self, clock):
        lookup = SEED_LOOKUP.replace('"punch"', '"cashback"')
        driver, _ = seed_driver({"/cards/lookup": lookup, "/transactions/record": SEED_CASHBACK}, clock)
        items = basket("60.00", "25.00")
        quote = preview(driver, clock, "12345", items)
        outcome = driver.run(driver.finalize(previewed_tx(quote, items, clock), "k"))
        assert outcome.provider_ref == "txn_cb001122-3344-5566-7788-99aabbccddee"
        assert {k: outcome.details[k] for k in ("cashback_earned", "cashback_rate", "new_balance", "tier_changed")} == {
            "cashback_earned": "4.25", "cashback_rate": "0.05", "new_balance": "32.75", "tier_changed": False}

    def test_discount_answer_matches_the_local_quote(self, clock):
        lookup = SEED_LOOKUP.replace('"punch"', '"discount"').replace(
            '"current_punches": 7,', '"discount_rate": 0.10, "current_tier_name": "Silver", "current_punches": 7,')
        driver, _ = seed_driver({"/cards/lookup": lookup, "/transactions/record": SEED_DISCOUNT}, clock)
        items = basket("100.00", "20.00")
        quote = preview(driver, clock, "12345", items)
        assert [line.discount for line in quote.lines] == [Money(1000, "EUR"), Money(200, "EUR")]
        outcome = driver.run(driver.finalize(previewed_tx(quote, items, clock), "k"))
        assert outcome.details["discount_amount"] == "12.00"
        assert outcome.details["final_amount"] == "108.00"
        assert outcome.details["discount_matches_preview"] is True

    def test_history_page(self, clock):
        driver, _ = seed_driver({"/transactions/history": SEED_HISTORY}, clock)
        page = driver.run(driver.transaction_history("a1b2c3d4-e5f6-7890-abcd-ef1234567890", page_size=10))
        assert (page.page, page.page_size, page.total_count, page.total_pages) == (1, 10, 27, 3)
        assert [t["purchase_amount"] for t in page.transactions] == [Decimal("4.50"), Decimal("5.00")]


def test_the_production_environment_is_forloys_published_api():
    driver = ForloyDriver(environment="production", email="e", password="p", location_id="l", staff_user_id="s")
    assert driver.base_url == BASE == forloy.DEFAULT_BASE_URL


def test_the_sandbox_serves_the_same_paths(clock):
    assert ForloySandbox(clock).base_url == BASE


def test_lifetimes_documented_and_assumed_are_named_constants():
    assert forloy.ACCESS_TOKEN_TTL == timedelta(seconds=3600)
    assert forloy.PUNCH_COOLDOWN == timedelta(minutes=1)
    assert forloy.SYNC_BATCH_LIMIT == 100
    assert forloy.ASSUMED_REFRESH_PATH == "/auth/refresh"
    assert forloy.ASSUMED_CARD_NOT_FOUND_STATUS == 404


def test_an_amount_in_another_currency_is_refused_before_any_call(pair, clock):
    sandbox, driver = pair
    card = sandbox.add_punch_card()
    with pytest.raises(ValidationError, match="EUR"):
        preview(driver, clock, card.barcode_value, basket("4.50", currency="USD"))
    assert sandbox.requests == []
