"""secuconnect against its public documentation (#12) and the newcomer sandbox interface.

Sources named per test: developer.secuconnect.com/integration/ (OAuth, applying the
loyalty card, error handling), the official SDKs (secuconnect-php-sdk 2.63.0,
secuconnect-js-sdk) and seed 003.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.errors import ProviderRejected
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
from txengine.providers.secuconnect import driver as secu

SANDWICH = LineItem("30037", "Sandwich Romano", 1, Money(349, "EUR"), 7)


def driver_for(sandbox: SecuconnectSandbox, clock, transport=None) -> SecuconnectDriver:
    return SecuconnectDriver(base_url=sandbox.base_url, transport=transport or sandbox.transport(),
                             clock=clock, **sandbox.credentials())


def test_both_documented_hosts_are_explicit_environments():
    """The test host (seed 003) and production (the SDKs' default host)."""
    assert SecuconnectDriver.environments == {"sandbox": "https://connect-testing.secuconnect.com",
                                              "production": "https://connect.secucard.com"}


def test_an_expired_token_answered_403_2003_logs_in_again_once_and_keeps_no_dead_token(clock, db_url):
    """Error handling page: an expired token is HTTP 403, code 2003 (ProductNotAllowedException)."""
    sandbox = SecuconnectSandbox(clock)
    lagging = FakeClock(clock.now())  # the driver's clock runs behind: it thinks its token is fresh
    driver = driver_for(sandbox, lagging)
    (customer,) = sandbox.seed_demo()
    with Engine.open(db_url, providers={"secuconnect": driver}, clock=clock) as pos:
        pos.preview("secuconnect", Basket([SANDWICH]), customer_token=customer["customer_token"])
        clock.advance(seconds=int(secu.DOCUMENTED_TOKEN_LIFETIME.total_seconds()) + 1)
        tx = pos.preview("secuconnect", Basket([SANDWICH]), customer_token=customer["customer_token"])
        assert tx.state == "previewed"
        expired = [r for r in sandbox.requests if r.path.endswith("/Transactions")]
        assert sandbox.tokens_issued == 2 and len(expired) == 3  # one refused with 403, resent once
        pos.finalize(tx.id)
    assert sandbox.tokens_issued == 2  # the new token is kept, the dead one forgotten


def test_a_pre_transaction_offering_bonus_products_is_refused_clearly_and_released(clock):
    """preTransaction answers {missing_sum, bonus_products}; bonus products are not modelled yet."""
    sandbox = SecuconnectSandbox(clock)
    (customer,) = sandbox.seed_demo()

    def with_bonus(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/preTransaction"):
            sandbox.transport().handle_request(request)
            return httpx.Response(200, json={"missing_sum": 0, "bonus_products": [{"id": 1, "priceOne": -349}]})
        return sandbox.transport().handle_request(request)

    driver = driver_for(sandbox, clock, httpx.MockTransport(with_bonus))
    from tests.providers.test_secuconnect_driver import preview_request
    with pytest.raises(ProviderRejected) as refused:
        driver.run(driver.preview(preview_request(clock, (SANDWICH,), card=customer["customer_token"])))
    assert refused.value.code == secu.BONUS_PRODUCTS_UNSUPPORTED
    assert {stx.status for stx in sandbox.smart_transactions.values()} == {"cancelled"}


class TestNewcomerSandbox:
    def test_seed_demo_returns_the_seeds_card_idempotently(self, clock):
        sandbox = SecuconnectSandbox(clock, demo=False)
        first = sandbox.seed_demo()
        assert sandbox.seed_demo() == first
        assert first[0]["customer_token"] == "9276004429942845" and "10,00 EUR" in first[0]["description"]
        assert len(sandbox.cards) == 1

    def test_two_fresh_customers_each_pay_a_sale(self, clock, db_url):
        sandbox = SecuconnectSandbox(clock)
        with Engine.open(db_url, providers={"secuconnect": driver_for(sandbox, clock)}, clock=clock) as pos:
            for _ in range(2):
                customer = sandbox.issue_customer()
                tx = pos.preview("secuconnect", Basket([SANDWICH]), customer_token=customer["customer_token"])
                assert pos.finalize(tx.id).state == "finalized"
                assert sandbox.card_balance(customer["customer_token"]) == 1000 - 349
