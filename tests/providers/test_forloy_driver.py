"""The Forloy driver against its sandbox: pricing, errors, faults, transports, offline sync."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal

import attrs
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from txengine import Basket, LineItem, Money
from txengine.drivers import Delivery, PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected, ValidationError
from txengine.models import Transaction
from txengine.secret import Secret
from txengine.providers.forloy import ForloyDriver, ForloySandbox, forloy_pair
from txengine.providers.forloy import driver as forloy
from txengine.testing.sandbox import Fault, serve


@pytest.fixture
def pair(clock):
    return forloy_pair(clock)


def eur(amount: str) -> Money:
    return Money.of(amount, "EUR")


def basket(*prices: str) -> Basket:
    return Basket([LineItem(f"p{i}", f"Item {i}", 1, eur(p), 7) for i, p in enumerate(prices)])


def preview_request(clock, token, items: Basket, payment_type="SPLIT_PAYMENT") -> PreviewRequest:
    return PreviewRequest("tx_1", items, None if token is None else Secret(token), payment_type, "k", clock.now())


def as_tx(quote, items: Basket, clock, state="payment_pending") -> Transaction:
    return Transaction(id="tx_1", provider="forloy", state=state, items=quote.lines, currency=items.currency,
                       details=dict(quote.details), created_at=clock.now(), updated_at=clock.now())


def previewed(driver, clock, card, *prices: str):
    items = basket(*prices)
    quote = driver.run(driver.preview(preview_request(clock, card.qr_code_data, items)))
    return quote, as_tx(quote, items, clock)


def records(sandbox) -> list:
    return [r for r in sandbox.requests if r.path.endswith("/transactions/record")]


class TestPreview:
    def test_punch_and_cashback_cards_leave_everything_outstanding(self, pair, clock):
        sandbox, driver = pair
        for card in (sandbox.add_punch_card(), sandbox.add_cashback_card(balance="27.50")):
            quote, tx = previewed(driver, clock, card, "4.50", "2.25")
            assert [(l.discount, l.credits, l.outstanding) for l in quote.lines] == [
                (eur("0"), eur("0"), eur("4.50")), (eur("0"), eur("0"), eur("2.25"))]
            assert quote.details["card_type"] == card.card_type
            assert quote.details["purchase_amount"] == "6.75"
            assert quote.provider_ref is None  # nothing exists on Forloy's side yet

    def test_a_discount_card_is_priced_locally_and_sums_exactly(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_discount_card(discount_rate="0.10")
        quote, tx = previewed(driver, clock, card, "3.33", "3.33", "3.33")
        # 9.99 x 10% = 0.999 -> 1.00; shares are 0.333 each: the first line takes the cent
        assert [l.discount for l in quote.lines] == [eur("0.34"), eur("0.33"), eur("0.33")]
        assert all(l.discount + l.credits + l.outstanding == l.gross for l in quote.lines)
        assert tx.total_discount == eur("1.00") and tx.outstanding == eur("8.99")
        assert quote.details["discount_rate"] == "0.10"
        outcome = driver.run(driver.finalize(tx, "k1"))
        assert outcome.details["discount_amount"] == "1.00" and outcome.details["discount_matches_preview"]

    def test_the_customer_key_never_reaches_the_details_or_receipt(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        quote, tx = previewed(driver, clock, card, "4.50")
        outcome = driver.run(driver.finalize(tx, "k1"))
        stored = json.dumps([dict(quote.details), dict(outcome.details)]) + repr(quote) + repr(outcome)
        assert card.qr_code_data not in stored and card.barcode_value not in stored
        assert set(quote.details) >= {"card_instance_id", "card_type", "card_title", "balance"}

    @pytest.mark.parametrize(("token", "why"), [
        (None, "QR code or barcode"), ("", "empty"), ("not base64!", "neither"), ("9" * 5000, "too long"),
    ])
    def test_bad_customer_tokens_fail_before_any_call(self, pair, clock, token, why):
        sandbox, driver = pair
        with pytest.raises(ValidationError, match=why):
            driver.run(driver.preview(preview_request(clock, token, basket("1.00"))))
        assert sandbox.requests == []

    def test_payment_types_it_cannot_honour_fail_before_any_call(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        with pytest.raises(ValidationError, match="CREDIT"):
            driver.run(driver.preview(preview_request(clock, card.barcode_value, basket("1.00"), "CREDIT")))
        assert sandbox.requests == []

    def test_an_unknown_card_is_card_not_found(self, pair, clock):
        sandbox, driver = pair
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.preview(preview_request(clock, "90009999999999", basket("1.00"))))
        assert refused.value.code == forloy.CARD_NOT_FOUND

    def test_an_inactive_card_is_refused_at_preview(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card(status="suspended")
        with pytest.raises(ProviderRejected) as refused:
            previewed(driver, clock, card, "1.00")
        assert refused.value.code == forloy.ASSUMED_CARD_INACTIVE
        assert "suspended" in str(refused.value)


@given(
    cents=st.lists(st.integers(0, 250_000), min_size=1, max_size=8),
    quantities=st.lists(st.integers(1, 7), min_size=8, max_size=8),
    rate=st.decimals(min_value=0, max_value=1, places=4),
)
def test_discount_allocation_sums_to_forloys_rounding_of_the_total(cents, quantities, rate):
    items = [LineItem(None, f"line {i}", q, Money(c, "EUR"), 7) for i, (c, q) in enumerate(zip(cents, quantities))]
    lines = forloy.discount_lines(items, rate)
    gross = sum(item.gross.amount_minor for item in items)
    expected = (Decimal(gross) * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    assert sum(line.discount.amount_minor for line in lines) == expected
    for line in lines:
        share = Decimal(line.gross.amount_minor) * rate
        assert abs(line.discount.amount_minor - share) < 1  # never more than a minor unit off
        assert line.discount + line.outstanding == line.gross and not line.credits


class TestFinalize:
    def test_the_record_answer_becomes_the_outcome(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card(current_punches=9)
        quote, tx = previewed(driver, clock, card, "4.50")
        outcome = driver.run(driver.finalize(tx, "k1"))
        (recorded,) = sandbox.transactions
        assert outcome.provider_ref == recorded.transaction_id == outcome.details["forloy_transaction_id"]
        assert outcome.details["reward_earned"] is True
        assert outcome.details["reward"]["title"] == "Free Coffee"
        assert outcome.details["idempotent_replay"] is False
        assert recorded.pos_reference_id == "tx_1" and recorded.idempotency_key == "k1"

    def test_a_cooldown_is_a_definite_no_with_retry_after(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        _, first = previewed(driver, clock, card, "4.50")
        driver.run(driver.finalize(first, "k1"))
        clock.advance(seconds=15)
        _, second = previewed(driver, clock, card, "3.00")
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.finalize(second, "k2"))
        assert refused.value.code == forloy.COOLDOWN_ACTIVE
        assert refused.value.retry_after == 45
        clock.advance(seconds=45)
        driver.run(driver.finalize(second, "k2"))  # same key: refusals were not remembered
        assert len(sandbox.transactions) == 2

    def test_a_card_suspended_after_preview_is_refused_at_finalize(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_cashback_card()
        _, tx = previewed(driver, clock, card, "10.00")
        card.status = "suspended"
        with pytest.raises(ProviderRejected) as refused:
            driver.run(driver.finalize(tx, "k1"))
        assert refused.value.code == forloy.ASSUMED_CARD_INACTIVE

    def test_lines_added_after_preview_are_not_recorded_as_purchase(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_cashback_card(cashback_rate="0.10")
        quote, tx = previewed(driver, clock, card, "20.00")
        from txengine.models import PricedLine

        tip = PricedLine.unpriced(LineItem(None, "Tip", 1, eur("5.00"), 0))
        tx = attrs.evolve(tx, items=tx.items + (tip,))
        outcome = driver.run(driver.finalize(tx, "k1"))
        assert sandbox.transactions[0].purchase_amount == Decimal("20.00")
        assert outcome.details["cashback_earned"] == "2.00"

    def test_a_transaction_this_driver_did_not_preview_is_refused_before_any_call(self, pair, clock):
        sandbox, driver = pair
        tx = as_tx(forloy_quote_without_details(), basket("1.00"), clock)
        with pytest.raises(ValidationError, match="not previewed"):
            driver.run(driver.finalize(tx, "k1"))
        assert sandbox.requests == []

    def test_lifecycle_calls_forloy_has_not_are_not_drivable(self, pair, clock):
        sandbox, driver = pair
        caps = driver.capabilities
        assert caps.remote == {"preview", "finalize"}
        assert caps.local == {"begin_payment", "update", "cancel"}
        assert "refund" not in caps.supported
        for call in (lambda: driver.refund(None, "k", None), lambda: driver.cancel(None, "k")):
            with pytest.raises(NotImplementedError):
                next(call())


def forloy_quote_without_details():
    from txengine.models import PricedLine, Quote

    return Quote(lines=[PricedLine.unpriced(LineItem(None, "x", 1, eur("1.00"), 7))])


class TestFaults:
    @pytest.mark.parametrize("fault", [Fault.SERVER_ERROR, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT])
    def test_untrustworthy_lookup_answers_are_unknown(self, pair, clock, fault):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        sandbox.faults.inject("lookup", fault)
        with pytest.raises(OutcomeUnknown):
            previewed(driver, clock, card, "1.00")

    @pytest.mark.parametrize("fault", [Fault.SERVER_ERROR, Fault.GARBAGE_AFTER_COMMIT, Fault.TRUNCATED_AFTER_COMMIT])
    def test_untrustworthy_record_answers_are_unknown_and_the_retry_replays(self, pair, clock, fault):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        _, tx = previewed(driver, clock, card, "4.50")
        sandbox.faults.inject("record", fault)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.finalize(tx, "k1"))
        outcome = driver.run(driver.finalize(tx, "k1"))
        assert len(sandbox.transactions) == 1
        assert outcome.details["idempotent_replay"] is (fault is not Fault.SERVER_ERROR)

    @pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.DROP_CONNECTION, Fault.TIMEOUT_BEFORE_COMMIT])
    def test_one_transport_failure_is_resent_at_once_with_the_same_key(self, pair, clock, fault):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        _, tx = previewed(driver, clock, card, "4.50")
        sandbox.faults.inject("record", fault)
        outcome = driver.run(driver.finalize(tx, "k1"))
        first, second = records(sandbox)
        assert first.body == second.body
        assert len(sandbox.transactions) == 1
        assert outcome.details["idempotent_replay"] is (fault is Fault.TIMEOUT_AFTER_COMMIT)

    @pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.DROP_CONNECTION])
    def test_repeated_transport_failures_are_unknown(self, pair, clock, fault):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        _, tx = previewed(driver, clock, card, "4.50")
        sandbox.faults.inject("record", fault, times=1 + forloy.SAFE_RETRIES)
        with pytest.raises(OutcomeUnknown):
            driver.run(driver.finalize(tx, "k1"))
        assert len(records(sandbox)) == 1 + forloy.SAFE_RETRIES

    @pytest.mark.parametrize(("answer", "why"), [
        ({"card_type": "discount", "purchase_amount": 10, "discount_rate": 0.1, "discount_amount": 1,
          "final_amount": 8}, "final_amount"),
        ({"card_type": "discount", "purchase_amount": 99, "discount_rate": 0.1, "discount_amount": 1,
          "final_amount": 98}, "different purchase_amount"),
        ({"card_type": "punch", "punches_added": 1, "new_punch_count": 2}, "expected 'discount'"),
        ({"card_type": "discount", "purchase_amount": 10, "discount_rate": 0.1, "discount_amount": 1.001,
          "final_amount": 8.999}, "not an amount"),
        ({"card_type": "discount"}, "purchase_amount"),
    ])
    def test_record_answers_that_break_the_contract_are_protocol_errors(self, clock, answer, why):
        def forloy_api(request: httpx.Request) -> httpx.Response:
            path = request.url.path.removeprefix("/api/v1")
            if path == "/auth/login":
                return httpx.Response(200, json={"success": True, "data": {
                    "access_token": "a", "refresh_token": "r", "expires_in": 3600}})
            return httpx.Response(200, content=forloy.dumps({"success": True, "data": {
                "transaction_id": "txn_1", **json.loads(json.dumps(answer), parse_float=Decimal)}}))

        driver = ForloyDriver(environment="production", email="e", password="p", location_id="l", staff_user_id="s", clock=clock,
                              transport=httpx.MockTransport(forloy_api))
        items = basket("10.00")
        lines = forloy.discount_lines(items.items, Decimal("0.10"))
        tx = Transaction(id="tx_1", provider="forloy", state="previewed", items=lines, currency="EUR",
                         details={"card_instance_id": "c", "card_type": "discount", "purchase_amount": "10.00"},
                         created_at=clock.now(), updated_at=clock.now())
        with pytest.raises(OutcomeUnknown, match=why):
            driver.run(driver.finalize(tx, "k"))

    @pytest.mark.parametrize(("status", "body", "expected"), [
        (404, b"<html>Not Found</html>", OutcomeUnknown),
        (400, b'{"success": false}', OutcomeUnknown),
        (200, b'{"success": true}', OutcomeUnknown),
        (200, b'{"success": false, "error": {"code": "CARD_NOT_FOUND", "message": "x"}}', OutcomeUnknown),  # an error envelope with HTTP 200 contradicts itself
        (200, b'{"success": true, "data": {"card_instance_id": "c", "card_type": "gift", '
              b'"status": "active", "balance": {}}}', OutcomeUnknown),
        (200, b'{"success": true, "data": {"card_instance_id": "c", "card_type": "discount", '
              b'"status": "active", "balance": {"discount_rate": 1.5}}}', OutcomeUnknown),
    ])
    def test_lookup_answers_are_read_strictly(self, clock, status, body, expected):
        def forloy_api(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/auth/login"):
                return httpx.Response(200, json={"success": True, "data": {
                    "access_token": "a", "refresh_token": "r", "expires_in": 3600}})
            return httpx.Response(status, content=body)

        driver = ForloyDriver(environment="production", email="e", password="p", location_id="l", staff_user_id="s", clock=clock,
                              transport=httpx.MockTransport(forloy_api))
        with pytest.raises(expected):
            driver.run(driver.preview(preview_request(clock, "12345", basket("1.00"))))


class TestTransports:
    def test_base_urls_must_be_https_except_on_loopback(self):
        creds = dict(email="e", password="p", location_id="l", staff_user_id="s")
        with pytest.raises(ValidationError):
            ForloyDriver(base_url="http://api.forloy.com/api/v1", **creds)
        assert ForloyDriver(base_url="http://127.0.0.1:8000/api/v1", **creds).base_url.startswith("http://127")
        assert ForloyDriver(base_url="https://staging.forloy.example/api/v1/", **creds).base_url.endswith("/api/v1")

    async def test_async_in_process(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card(current_punches=2)
        items = basket("4.50")
        quote = await driver.arun(driver.preview(preview_request(clock, card.qr_code_data, items)))
        outcome = await driver.arun(driver.finalize(as_tx(quote, items, clock), "k1"))
        assert outcome.details["new_punch_count"] == 3
        await driver.aclose()

    async def test_async_through_asgi(self, clock):
        sandbox = ForloySandbox(clock)
        driver = ForloyDriver(environment="production", email=sandbox.STAFF_EMAIL, password=sandbox.STAFF_PASSWORD, location_id="loc_001",
                              staff_user_id="staff_042", clock=clock, async_transport=sandbox.asgi_transport())
        card = sandbox.add_discount_card(discount_rate="0.15")
        items = basket("20.00")
        quote = await driver.arun(driver.preview(preview_request(clock, card.barcode_value, items)))
        assert quote.lines[0].discount == eur("3.00")
        outcome = await driver.arun(driver.finalize(as_tx(quote, items, clock), "k1"))
        assert outcome.details["final_amount"] == "17.00"
        await driver.aclose()

    def test_over_a_real_loopback_socket_sync_and_async(self, clock):
        import asyncio

        sandbox = ForloySandbox(clock)
        card = sandbox.add_cashback_card(balance="28.50")
        with serve(sandbox) as served:
            driver = ForloyDriver(base_url=served.base_url, email=sandbox.STAFF_EMAIL,
                                  password=sandbox.STAFF_PASSWORD, location_id="loc_001",
                                  staff_user_id="staff_042", clock=clock, timeout=5)
            items = basket("85.00")
            quote = driver.run(driver.preview(preview_request(clock, card.qr_code_data, items)))
            outcome = driver.run(driver.finalize(as_tx(quote, items, clock), "k1"))
            assert outcome.details["new_balance"] == "32.75"

            async def again():
                replay = await driver.arun(driver.finalize(as_tx(quote, items, clock), "k1"))
                await driver.aclose()
                return replay

            assert asyncio.run(again()).details["idempotent_replay"] is True
            driver.close()
        assert len(sandbox.transactions) == 1


class TestOffline:
    def finalized(self, driver, clock, card, price="4.50", tx_id="tx_1"):
        items = basket(price)
        quote = driver.run(driver.preview(preview_request(clock, card.qr_code_data, items)))
        tx = attrs.evolve(as_tx(quote, items, clock, state="finalized"), id=tx_id, finalized_at=clock.now())
        return tx, Delivery(int(tx_id.split("_")[1]), tx.id, "forloy", "record",
                            driver.delivery_payload("record", tx), f"{tx.id}:record")

    def test_offline_capabilities_defer_the_record(self, clock):
        _, driver = forloy_pair(clock, offline=True)
        caps = driver.capabilities
        assert caps.remote == {"preview"}
        assert caps.local == {"begin_payment", "update", "cancel", "finalize"}
        assert dict(caps.deferred) == {"finalize": ("record",)}
        assert caps.delivery_batch == forloy.SYNC_BATCH_LIMIT == 100

    def test_the_payload_is_json_safe_but_the_qr_code_which_is_a_secret_for_the_engine_to_seal(self, clock):
        sandbox, driver = forloy_pair(clock, offline=True, pos_terminal_id="pos3")
        card = sandbox.add_punch_card()
        tx, delivery = self.finalized(driver, clock, card)
        payload = dict(delivery.payload)
        qr = payload.pop("qr_code_data")
        assert isinstance(qr, Secret) and qr.reveal() == card.qr_code_data and card.qr_code_data not in repr(payload)
        assert json.loads(json.dumps(payload)) == {
            "card_instance_id": card.card_instance_id, "card_type": "punch", "location_id": "loc_001",
            "staff_user_id": "staff_042", "purchase_amount": "4.50", "pos_reference_id": "tx_1",
            "punch_count": 1, "pos_terminal_id": "pos3", "client_timestamp": "2026-01-15T10:00:00.000Z"}

    def test_one_sync_carries_the_batch_and_replays_harmlessly(self, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        cards = [sandbox.add_cashback_card(cashback_rate="0.10") for _ in range(3)]
        deliveries = tuple(self.finalized(driver, clock, card, "10.00", f"tx_{i}")[1] for i, card in enumerate(cards))
        assert driver.run(driver.deliver(deliveries)) is None
        assert driver.run(driver.deliver(deliveries)) is None  # e.g. after a lost answer
        syncs = [r for r in sandbox.requests if r.path.endswith("/transactions/sync")]
        assert len(syncs) == 2 and records(sandbox) == []
        assert [c.balance for c in cards] == [Decimal("1.00")] * 3
        assert len(sandbox.transactions) == 3

    def test_a_refused_record_is_named_and_the_rest_of_the_batch_stands(self, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        card = sandbox.add_punch_card()
        _, first = self.finalized(driver, clock, card, "1.00", "tx_1")
        clock.advance(seconds=20)
        _, second = self.finalized(driver, clock, card, "1.00", "tx_2")
        refused = driver.run(driver.deliver((first, second)))
        assert set(refused) == {second.id}
        assert refused[second.id].code == forloy.COOLDOWN_ACTIVE
        assert "tx_2" in str(refused[second.id])
        assert len(sandbox.transactions) == 1, "the first record was accepted"

    def test_batch_limits(self, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        assert driver.run(driver.deliver(())) is None and sandbox.requests == []
        card = sandbox.add_cashback_card()
        _, delivery = self.finalized(driver, clock, card)
        with pytest.raises(ValueError, match="100"):
            driver.run(driver.deliver((delivery,) * (forloy.SYNC_BATCH_LIMIT + 1)))

    def test_a_sync_answer_that_omits_a_record_is_unknown(self, clock):
        sandbox, driver = forloy_pair(clock, offline=True)
        card = sandbox.add_cashback_card()
        _, delivery = self.finalized(driver, clock, card)

        def answers_for_one(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/auth/login"):
                return httpx.Response(200, json={"success": True, "data": {
                    "access_token": "a", "refresh_token": "r", "expires_in": 3600}})
            return httpx.Response(200, json={"success": True, "data": {"results": [
                {"idempotency_key": delivery.idempotency_key, "success": True, "data": {}}]}})

        forgetful = ForloyDriver(environment="production", email="e", password="p", location_id="loc_001", staff_user_id="staff_042",
                                 clock=clock, offline=True, transport=httpx.MockTransport(answers_for_one))
        forgetful._qr_by_card = driver._qr_by_card  # the QR scanned at preview (held in memory only)
        stranger = attrs.evolve(delivery, tx_id="tx_9", idempotency_key="tx_9:record")
        assert forgetful.run(forgetful.deliver((delivery,))) is None
        with pytest.raises(OutcomeUnknown, match="tx_9"):
            forgetful.run(forgetful.deliver((delivery, stranger)))


class TestBeyondTheLifecycle:
    def test_claim_the_oldest_reward_and_read_the_history(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card(current_punches=9)
        _, tx = previewed(driver, clock, card, "4.50")
        earned = driver.run(driver.finalize(tx, "k1")).details["reward"]
        claimed = driver.run(driver.claim_reward(card.card_instance_id))
        assert claimed["reward_id"] == earned["reward_id"] and claimed["pending_rewards_remaining"] == 0
        page = driver.run(driver.transaction_history(card.card_instance_id))
        assert page.total_count == 1 and page.transactions[0]["purchase_amount"] == Decimal("4.50")
        with pytest.raises(ValidationError):
            driver.run(driver.transaction_history(card.card_instance_id, page_size=0))
