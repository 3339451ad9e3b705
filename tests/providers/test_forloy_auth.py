"""Forloy sessions: lazy login, refresh before expiry, one re-authentication on a 401."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest

from txengine import Basket, FakeClock, LineItem, Money
from txengine.drivers import PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected
from txengine.models import Transaction
from txengine.secret import Secret
from txengine.providers.forloy import ForloyDriver, ForloySandbox, forloy_pair
from txengine.providers.forloy import driver as forloy
from txengine.testing.sandbox import Fault

ITEMS = Basket([LineItem("latte", "Latte", 1, Money.of("4.50", "EUR"), 7)])
LIFETIME = forloy.ACCESS_TOKEN_TTL


@pytest.fixture
def pair(clock):
    return forloy_pair(clock)


def lookup(driver, clock, token):
    request = PreviewRequest("tx_1", ITEMS, Secret(token), "SPLIT_PAYMENT", "k", clock.now())
    return driver.run(driver.preview(request))


def paths(sandbox) -> list[str]:
    return [r.path.removeprefix("/api/v1") for r in sandbox.requests]


def finalize(driver, quote, clock, key="key-1"):
    tx = Transaction(id="tx_1", provider="forloy", state="payment_pending", items=quote.lines,
                     currency="EUR", details=dict(quote.details), created_at=clock.now(),
                     updated_at=clock.now())
    return driver.run(driver.finalize(tx, key))


class TestLogin:
    def test_nothing_is_sent_until_the_first_call_then_one_login_serves_many(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        assert sandbox.requests == []
        for _ in range(3):
            lookup(driver, clock, card.barcode_value)
        assert paths(sandbox) == ["/auth/login"] + ["/cards/lookup"] * 3
        assert sandbox.logins == 1

    def test_a_wrong_password_is_unauthorized_and_says_nothing_secret(self, clock):
        sandbox = ForloySandbox(clock)
        card = sandbox.add_punch_card()
        driver = ForloyDriver(environment="production", email=sandbox.STAFF_EMAIL, password="hunter2-wrong", location_id="loc_001",
                              staff_user_id="staff_042", clock=clock, transport=sandbox.transport())
        with pytest.raises(ProviderRejected) as refused:
            lookup(driver, clock, card.barcode_value)
        assert refused.value.code == forloy.UNAUTHORIZED
        for secret in ("hunter2-wrong", sandbox.STAFF_EMAIL, card.barcode_value):
            assert secret not in str(refused.value)
        assert paths(sandbox) == ["/auth/login"]  # never a lookup without a session

    def test_a_lost_login_answer_is_retried_because_login_is_safe(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        sandbox.faults.inject("login", Fault.TIMEOUT_AFTER_COMMIT)
        lookup(driver, clock, card.barcode_value)
        assert paths(sandbox) == ["/auth/login", "/auth/login", "/cards/lookup"]

    def test_secrets_stay_out_of_reprs(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        quote = lookup(driver, clock, card.qr_code_data)
        session = driver._session
        shown = repr(driver) + repr(session) + repr(quote) + json.dumps(dict(quote.details))
        for secret in (sandbox.STAFF_PASSWORD, sandbox.STAFF_EMAIL, card.qr_code_data,
                       session.access_token.reveal(), session.refresh_token.reveal()):
            assert secret not in shown
        assert "Secret" not in repr(quote)


class TestRefresh:
    def test_the_token_is_refreshed_before_it_expires_by_the_drivers_clock(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        lookup(driver, clock, card.barcode_value)
        first, issued_refresh = driver._session.access_token, driver._session.refresh_token.reveal()
        clock.advance(LIFETIME - forloy.REFRESH_MARGIN - timedelta(seconds=1))
        lookup(driver, clock, card.barcode_value)
        assert sandbox.refreshes == 0 and driver._session.access_token == first
        clock.advance(seconds=1)  # now inside the safety margin
        lookup(driver, clock, card.barcode_value)
        assert paths(sandbox)[-2:] == [forloy.ASSUMED_REFRESH_PATH, "/cards/lookup"]
        assert json.loads(sandbox.requests[-2].body) == {"refresh_token": issued_refresh}
        assert sandbox.refreshes == 1 and sandbox.logins == 1
        assert driver._session.access_token != first
        assert sandbox.requests[-1].header("authorization") == f"Bearer {driver._session.access_token.reveal()}"

    def test_a_refused_refresh_falls_back_to_a_fresh_login(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        lookup(driver, clock, card.barcode_value)
        sandbox.revoke_tokens()  # the refresh token is dead too
        clock.advance(LIFETIME)
        lookup(driver, clock, card.barcode_value)
        assert paths(sandbox)[-3:] == [forloy.ASSUMED_REFRESH_PATH, "/auth/login", "/cards/lookup"]
        assert sandbox.logins == 2

    def test_a_lost_refresh_answer_is_not_resent_but_replaced_by_a_login(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        lookup(driver, clock, card.barcode_value)
        clock.advance(LIFETIME)
        sandbox.faults.inject("refresh", Fault.TIMEOUT_AFTER_COMMIT)
        lookup(driver, clock, card.barcode_value)
        # the refresh committed (its token rotated) but its answer was lost
        assert paths(sandbox)[-3:] == [forloy.ASSUMED_REFRESH_PATH, "/auth/login", "/cards/lookup"]

    def test_refresh_tokens_rotate_in_the_sandbox(self, pair, clock):
        sandbox, driver = pair
        driver.run(driver.me())
        old = driver._session.refresh_token.reveal()
        clock.advance(LIFETIME)
        driver.run(driver.me())
        with httpx.Client(transport=sandbox.transport()) as client:
            again = client.post(f"{sandbox.base_url}/auth/refresh", json={"refresh_token": old})
        assert again.status_code == 401 and again.json()["error"]["code"] == forloy.UNAUTHORIZED


class TestReauthentication:
    def test_token_expired_at_the_server_is_refreshed_once_and_the_record_resent(self, clock):
        # The driver's clock lags: it believes its token is fresh, Forloy knows better.
        sandbox, driver = forloy_pair(clock, clock=FakeClock(clock.now()))
        card = sandbox.add_punch_card(current_punches=3)
        quote = lookup(driver, clock, card.barcode_value)
        clock.advance(LIFETIME)
        outcome = finalize(driver, quote, clock, key="txn_20260115_103000_pos3")
        records = [r for r in sandbox.requests if r.path.endswith("/transactions/record")]
        assert paths(sandbox)[-3:] == ["/transactions/record", forloy.ASSUMED_REFRESH_PATH, "/transactions/record"]
        assert records[0].body == records[1].body  # same body, same idempotency key
        assert records[0].header("authorization") != records[1].header("authorization")
        assert len(sandbox.transactions) == 1
        assert outcome.details["new_punch_count"] == 4

    def test_revoked_tokens_are_replaced_by_a_login_once(self, pair, clock):
        sandbox, driver = pair
        card = sandbox.add_punch_card()
        lookup(driver, clock, card.barcode_value)
        sandbox.revoke_tokens()
        lookup(driver, clock, card.barcode_value)
        assert paths(sandbox)[-3:] == ["/cards/lookup", "/auth/login", "/cards/lookup"]

    def test_a_second_401_is_a_definite_rejection_not_a_loop(self, clock):
        sent: list[str] = []

        def always_expired(request: httpx.Request) -> httpx.Response:
            path = request.url.path.removeprefix("/api/v1")
            sent.append(path)
            if path in ("/auth/login", forloy.ASSUMED_REFRESH_PATH):
                return httpx.Response(200, json={"success": True, "data": {
                    "access_token": "a", "refresh_token": "r", "expires_in": 3600}})
            return httpx.Response(401, json={"success": False, "error": {
                "code": "TOKEN_EXPIRED", "message": "Token expired"}})

        driver = ForloyDriver(environment="production", email="e", password="p", location_id="l", staff_user_id="s",
                              clock=clock, transport=httpx.MockTransport(always_expired))
        with pytest.raises(ProviderRejected) as refused:
            lookup(driver, clock, "90001234567890")
        assert refused.value.code == forloy.TOKEN_EXPIRED
        assert sent == ["/auth/login", "/cards/lookup", forloy.ASSUMED_REFRESH_PATH, "/cards/lookup"]

    def test_a_login_that_answers_without_tokens_is_a_protocol_error(self, clock):
        def tokenless(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"success": True, "data": {"expires_in": 3600}})

        driver = ForloyDriver(environment="production", email="e", password="p", location_id="l", staff_user_id="s",
                              clock=clock, transport=httpx.MockTransport(tokenless))
        with pytest.raises(OutcomeUnknown, match="access_token"):
            lookup(driver, clock, "90001234567890")


class TestSandboxTokens:
    def test_access_tokens_expire_after_expires_in_on_the_sandbox_clock(self, clock):
        sandbox = ForloySandbox(clock)
        with httpx.Client(transport=sandbox.transport()) as client:
            login = client.post(f"{sandbox.base_url}/auth/login",
                                json={"email": sandbox.STAFF_EMAIL, "password": sandbox.STAFF_PASSWORD}).json()
            assert login["data"]["expires_in"] == 3600
            bearer = {"Authorization": f"Bearer {login['data']['access_token']}"}
            clock.advance(LIFETIME - timedelta(microseconds=1))
            assert client.get(f"{sandbox.base_url}/auth/me", headers=bearer).status_code == 200
            clock.advance(timedelta(microseconds=1))  # exactly expires_in later: expired
            expired = client.get(f"{sandbox.base_url}/auth/me", headers=bearer)
            assert expired.status_code == 401 and expired.json()["error"]["code"] == "TOKEN_EXPIRED"
            missing = client.get(f"{sandbox.base_url}/auth/me")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "UNAUTHORIZED"
            assert missing.json()["success"] is False

    def test_refresh_tokens_expire_too(self, clock):
        sandbox = ForloySandbox(clock)
        with httpx.Client(transport=sandbox.transport()) as client:
            login = client.post(f"{sandbox.base_url}/auth/login",
                                json={"email": sandbox.STAFF_EMAIL, "password": sandbox.STAFF_PASSWORD}).json()
            clock.advance(forloy.ASSUMED_REFRESH_TOKEN_TTL)
            late = client.post(f"{sandbox.base_url}/auth/refresh",
                               json={"refresh_token": login["data"]["refresh_token"]})
        assert late.status_code == 401 and late.json()["error"]["code"] == "TOKEN_EXPIRED"
