"""The kit's value strategies: what they generate is what they promise.

Valid money, lines and baskets (any currency, unicode names, huge baskets) go through
the engine and the reference provider end to end; every hostile recipe is refused with
``ValidationError`` before anything is stored or sent; command sequences keep the
journal and the terminal states honest.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.errors import EngineError, ValidationError
from txengine.journal import replay
from txengine.models import MAX_LINES
from txengine.money import CURRENCY_EXPONENTS
from txengine.testing import (
    RawBasket,
    SQLiteStores,
    baskets,
    command_sequences,
    currencies,
    hostile_baskets,
    hostile_customer_tokens,
    hostile_idempotency_keys,
    hostile_lines,
    huge_baskets,
    line_items,
    money,
    transaction_keys,
)
from txengine.testing.harness import SandboxTransport
from txengine.providers.reference_harness import ReferenceHarness
from txengine.testing.oracle import TERMINAL
from txengine.testing.strategies import UNENCODABLE_NAMES

HARNESS = ReferenceHarness()
CUSTOMER = "regular"


@contextlib.contextmanager
def reference_engine():
    """An engine on a fresh store with the reference sandbox: one per example."""
    stores, clock = SQLiteStores(), FakeClock()
    sandbox = HARNESS.make_sandbox(clock)
    driver = HARNESS.make_driver(sandbox, transport=SandboxTransport(sandbox), clock=clock)
    url = stores.new_url()
    engine = Engine.open(url, providers={"reference": driver}, clock=clock)
    try:
        yield engine, sandbox, clock
    finally:
        engine.close()
        stores.dispose(url)


def token() -> str:
    return HARNESS.customer_key(CUSTOMER)


# --- valid values ------------------------------------------------------------------------------------


@given(money())
def test_money_in_any_currency_round_trips_through_its_decimal_form(amount):
    assert amount.currency in CURRENCY_EXPONENTS
    assert Money.of(amount.to_decimal(), amount.currency) == amount


@given(currencies().flatmap(lambda code: money(code, whole_units=True)))
def test_whole_unit_money_has_no_minor_part(amount):
    assert amount.amount_minor % 10 ** CURRENCY_EXPONENTS[amount.currency] == 0


@given(currencies().flatmap(lambda code: st.tuples(st.just(code), line_items(code))))
def test_line_items_are_in_the_currency_asked_for(drawn):
    code, item = drawn
    assert item.currency == code and item.quantity >= 1


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(baskets())
def test_every_valid_basket_is_priced_and_stored_exactly(basket):
    with reference_engine() as (engine, sandbox, _):
        tx = engine.preview("reference", basket, customer_token=token())
        assert tuple(line.item for line in tx.items) == basket.items  # unicode names too
        assert tx.gross == basket.gross
        assert replay(engine.history(tx.id)) == engine.get(tx.id)


@settings(max_examples=5, suppress_health_check=list(HealthCheck), deadline=None)
@given(huge_baskets())
def test_huge_baskets_up_to_the_line_limit_go_through(basket):
    assert MAX_LINES // 2 <= len(basket.items) <= MAX_LINES
    with reference_engine() as (engine, _, _):
        tx = engine.finalize(engine.preview("reference", basket, customer_token=token()).id)
        assert tx.state == "finalized" and len(tx.items) == len(basket.items)


@given(transaction_keys())
def test_transaction_keys_have_cheers_shape(key):
    assert len(key) == 32 and int(key, 16) >= 0


# --- hostile values ------------------------------------------------------------------------------------


@given(hostile_lines())
def test_every_hostile_line_is_refused_by_the_value_types(raw):
    with pytest.raises(ValidationError):
        raw.build()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(hostile_baskets())
def test_every_hostile_basket_is_refused_before_anything_is_stored_or_sent(raw):
    with pytest.raises(ValidationError):
        raw.build()
    with reference_engine() as (engine, sandbox, _):
        with pytest.raises(ValidationError):
            engine.preview("reference", raw.items(), customer_token=token())
        assert sandbox.requests == [] and engine.store.transaction_ids() == []


@given(hostile_idempotency_keys())
def test_hostile_idempotency_keys_are_refused(key):
    with reference_engine() as (engine, sandbox, _):
        basket = Basket([LineItem(None, "Tea", 1, Money(250, "EUR"), 7)])
        with pytest.raises(ValidationError):
            engine.preview("reference", basket, customer_token=token(), idempotency_key=key)
        assert sandbox.requests == []


@given(hostile_customer_tokens())
def test_hostile_customer_tokens_are_refused(customer_token):
    with reference_engine() as (engine, sandbox, _):
        basket = Basket([LineItem(None, "Tea", 1, Money(250, "EUR"), 7)])
        with pytest.raises(ValidationError):
            engine.preview("reference", basket, customer_token=customer_token)
        assert sandbox.requests == []


def test_a_mixed_currency_basket_and_too_many_lines_are_among_the_hostile_ones():
    found = {"mixed": False, "too many": False}

    @settings(max_examples=200, database=None)
    @given(hostile_baskets())
    def look(raw: RawBasket):
        built = [line for line in raw.lines if not isinstance(line, (str, int, dict, bytes, type(None)))]
        found["mixed"] |= len({getattr(line, "currency", None) for line in built}) > 1
        found["too many"] |= raw.repeat > MAX_LINES

    look()
    assert found == {"mixed": True, "too many": True}


@pytest.mark.parametrize("name", UNENCODABLE_NAMES)
def test_a_name_that_cannot_be_encoded_is_refused_as_invalid_input(name):
    with reference_engine() as (engine, sandbox, _):
        with pytest.raises(ValidationError):
            engine.preview("reference", [LineItem(None, name, 1, Money(100, "EUR"), 0)], customer_token=token())
        assert sandbox.requests == []


# --- command sequences ----------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(baskets("EUR", max_lines=3), command_sequences())
def test_any_command_sequence_keeps_the_journal_and_the_terminal_states_honest(basket, steps):
    with reference_engine() as (engine, sandbox, clock):
        tx = engine.preview("reference", basket, customer_token=token())
        terminal_at = None
        for step in steps:
            if step.event == "wait":
                clock.advance(step.seconds)
                continue
            calls = len(sandbox.requests)
            try:
                arguments = {"items": [LineItem(None, "Tip", 1, Money(100, "EUR"), 0)]} if step.event == "update" else {}
                getattr(engine, step.event)(tx.id, **arguments)
            except EngineError:
                if terminal_at is not None:
                    assert len(sandbox.requests) == calls, f"{step} on a terminal transaction called the provider"
            now = engine.get(tx.id)
            assert replay(engine.history(tx.id)) == now
            if terminal_at is not None:
                assert now.version == terminal_at, f"{step} changed a terminal transaction"
            elif now.state in TERMINAL:
                terminal_at = now.version
