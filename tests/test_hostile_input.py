"""Hostile input from a POS is a ValidationError before any provider call, and cheap.

Each case here escaped as another exception (UnicodeEncodeError, TypeError, json's
ValueError, decimal.Overflow) or burned CPU before issue #10.
"""

import time

import pytest

from txengine import Engine, LineItem, Money
from txengine.errors import ValidationError
from txengine.money import MAX_AMOUNT_MINOR

from .conftest import CUSTOMER, tip

LONE_SURROGATE = "abc\ud800def"


def provider_calls(sandbox):
    return len(sandbox.requests)


def test_a_lone_surrogate_customer_key_is_refused_before_the_provider(engine, basket, sandbox):
    with pytest.raises(ValidationError, match="valid Unicode"):
        engine.preview("reference", basket, customer_token=CUSTOMER[:-1] + "\udc00")
    assert provider_calls(sandbox) == 0


def test_a_lone_surrogate_transaction_id_is_refused(engine):
    with pytest.raises(ValidationError, match="valid Unicode"):
        engine.get(LONE_SURROGATE)
    with pytest.raises(ValidationError, match="valid Unicode"):
        engine.finalize(LONE_SURROGATE)


def test_a_lone_surrogate_refund_comment_is_refused_before_the_provider(engine, basket, sandbox):
    tx = engine.finalize(engine.preview("reference", basket, customer_token=CUSTOMER).id)
    calls = provider_calls(sandbox)
    with pytest.raises(ValidationError, match="comment"):
        engine.refund(tx.id, comment=LONE_SURROGATE)
    assert provider_calls(sandbox) == calls
    assert engine.get(tx.id).state == tx.state


def test_a_lone_surrogate_idempotency_key_is_refused(engine, basket, sandbox):
    with pytest.raises(ValidationError, match="idempotency_key"):
        engine.preview("reference", basket, idempotency_key=LONE_SURROGATE)
    assert provider_calls(sandbox) == 0


@pytest.mark.parametrize("items", [5, None, 3.5, object()])
def test_update_with_something_that_is_not_line_items_is_refused(engine, basket, sandbox, items):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    calls = provider_calls(sandbox)
    with pytest.raises(ValidationError, match="LineItem"):
        engine.update(tx.id, items)
    assert provider_calls(sandbox) == calls


@pytest.mark.parametrize("amount", [10**19, 10**5000, -(10**5000), MAX_AMOUNT_MINOR + 1],
                         ids=["1e19", "1e5000", "-1e5000", "bound+1"])
def test_amounts_beyond_the_documented_bound_are_refused(amount):
    with pytest.raises(ValidationError, match="out of range"):
        Money(amount, "EUR")


def test_the_bound_itself_is_a_valid_amount():
    assert Money(MAX_AMOUNT_MINOR, "EUR").amount_minor == MAX_AMOUNT_MINOR
    assert Money(-MAX_AMOUNT_MINOR, "JPY").amount_minor == -MAX_AMOUNT_MINOR
    # Every amount within the bound is exact in an IEEE double: what a JSON-number provider parses.
    assert float(MAX_AMOUNT_MINOR) == MAX_AMOUNT_MINOR


@pytest.mark.parametrize("text", ["1E+1000000", "1E+999997", "-1E+999997", "1E-999997", "9" * 5000,
                                  "10000000000000.00"])
def test_huge_decimal_strings_are_refused_without_burning_cpu(text):
    started = time.process_time()
    with pytest.raises(ValidationError):
        Money.of(text, "EUR")
    assert time.process_time() - started < 0.05


def test_ordinary_decimal_strings_still_parse_exactly():
    assert Money.of("3.49", "EUR") == Money(349, "EUR")
    assert Money.of("9999999999999.99", "EUR").amount_minor == MAX_AMOUNT_MINOR
    assert Money.of("1.500", "EUR") == Money(150, "EUR")
    with pytest.raises(ValidationError, match="decimals"):
        Money.of("1.005", "EUR")


def test_a_basket_whose_total_exceeds_the_bound_is_refused_before_the_provider(engine, sandbox):
    # Each line is within the bound; their sum is not.
    half = Money(MAX_AMOUNT_MINOR // 2 + 1, "EUR")
    with pytest.raises(ValidationError, match="out of range"):
        engine.preview("reference", [LineItem(None, "A", 1, half, 0), LineItem(None, "B", 1, half, 0)])
    assert provider_calls(sandbox) == 0


def test_an_update_that_would_push_the_total_beyond_the_bound_is_refused(engine, sandbox):
    big = LineItem(None, "Big", 1, Money(MAX_AMOUNT_MINOR - 100, "EUR"), 0)
    tx = engine.preview("reference", [big])
    calls = provider_calls(sandbox)
    with pytest.raises(ValidationError, match="out of range"):
        engine.update(tx.id, [tip(200)])
    assert provider_calls(sandbox) == calls
    assert engine.get(tx.id).gross == big.gross


def test_an_in_memory_database_is_refused_with_a_clear_message(driver, clock):
    with pytest.raises(ValidationError, match="in-memory database"):
        Engine.open("sqlite:///:memory:", providers={"reference": driver}, clock=clock)
