"""Value types: invalid money, lines and baskets cannot be constructed."""

from decimal import Decimal

import pytest

from txengine import Basket, LineItem, Money, PricedLine
from txengine.errors import ValidationError
from txengine.money import CURRENCY_EXPONENTS


class TestMoney:
    def test_parses_decimal_strings_exactly(self):
        assert Money.of("3.49", "EUR") == Money(349, "EUR")
        assert Money.of("500", "HUF") == Money(50000, "HUF")
        assert Money.of("1.234", "KWD") == Money(1234, "KWD")
        assert Money.of("150", "JPY") == Money(150, "JPY")

    @pytest.mark.parametrize("amount,currency", [("3.499", "EUR"), ("1.5", "JPY"), ("0.0001", "KWD")])
    def test_refuses_more_decimals_than_the_currency_has_instead_of_rounding(self, amount, currency):
        with pytest.raises(ValidationError, match="more decimals"):
            Money.of(amount, currency)

    @pytest.mark.parametrize("amount", [3.49, float("nan"), True])
    def test_refuses_floats_and_bools(self, amount):
        with pytest.raises(ValidationError):
            Money.of(amount, "EUR")
        with pytest.raises(ValidationError):
            Money(amount, "EUR")

    @pytest.mark.parametrize("amount", ["NaN", "Infinity", "-inf", "abc", ""])
    def test_refuses_non_finite_and_garbage_strings(self, amount):
        with pytest.raises(ValidationError):
            Money.of(amount, "EUR")

    @pytest.mark.parametrize("currency", ["XXX", "eur", "EURO", "", None])
    def test_refuses_unknown_currencies(self, currency):
        with pytest.raises(ValidationError, match="currency"):
            Money(100, currency)

    def test_arithmetic_keeps_currency_and_refuses_mixing(self):
        assert Money(100, "EUR") + Money(49, "EUR") == Money(149, "EUR")
        assert Money(100, "EUR") * 3 == Money(300, "EUR")
        with pytest.raises(ValidationError, match="cannot mix"):
            Money(100, "EUR") + Money(100, "USD")
        with pytest.raises(ValidationError, match="cannot mix"):
            Money(100, "EUR") < Money(100, "HUF")

    def test_prints_in_major_units(self):
        assert str(Money(349, "EUR")) == "3.49 EUR"
        assert str(Money(150, "JPY")) == "150 JPY"
        assert Money(349, "EUR").to_decimal() == Decimal("3.49")

    def test_exponent_table_covers_the_usual_suspects(self):
        assert CURRENCY_EXPONENTS["EUR"] == 2
        assert CURRENCY_EXPONENTS["JPY"] == 0
        assert CURRENCY_EXPONENTS["BHD"] == 3


def line(quantity=1, price=Money(500, "EUR"), vat=27, name="Beer", product_id="p1"):
    return LineItem(product_id, name, quantity, price, vat)


class TestLineItemAndBasket:
    @pytest.mark.parametrize("quantity", [0, -1, 1.5, True, 10**7])
    def test_refuses_impossible_quantities(self, quantity):
        with pytest.raises(ValidationError, match="quantity"):
            line(quantity=quantity)

    def test_refuses_negative_prices_and_bad_vat(self):
        with pytest.raises(ValidationError, match="negative"):
            line(price=Money(-1, "EUR"))
        for vat in (-1, 101, 7.5, "abc"):
            with pytest.raises(ValidationError, match="vat"):
                line(vat=vat)

    def test_accepts_decimal_vat_as_string(self):
        assert line(vat="5.5").vat_percent == Decimal("5.5")
        assert line(vat=27).vat_percent == 27

    @pytest.mark.parametrize("name", ["", "   ", "a" * 201, "bad\x00name"])
    def test_refuses_unprintable_or_empty_names(self, name):
        with pytest.raises(ValidationError, match="name"):
            line(name=name)

    def test_unicode_names_are_fine(self):
        assert line(name="Pálinka 🍑").name == "Pálinka 🍑"

    def test_product_id_may_be_none(self):
        assert line(product_id=None).product_id is None

    def test_basket_is_non_empty_and_in_one_currency(self):
        with pytest.raises(ValidationError, match="at least one"):
            Basket([])
        with pytest.raises(ValidationError, match="one currency"):
            Basket([line(), line(price=Money(100, "USD"))])
        with pytest.raises(ValidationError):
            Basket(["not a line"])
        basket = Basket([line(quantity=3), line(price=Money(9, "EUR"))])
        assert basket.currency == "EUR"
        assert basket.gross == Money(1509, "EUR")


class TestPricedLine:
    def test_parts_must_add_up_to_gross(self):
        item = line(quantity=3)
        priced = PricedLine(item, Money(600, "EUR"), Money(800, "EUR"), Money(100, "EUR"))
        assert priced.gross == Money(1500, "EUR")
        with pytest.raises(ValidationError, match="!= gross"):
            PricedLine(item, Money(600, "EUR"), Money(800, "EUR"), Money(99, "EUR"))

    def test_parts_cannot_be_negative_or_in_another_currency(self):
        item = line()
        with pytest.raises(ValidationError, match="negative"):
            PricedLine(item, Money(-100, "EUR"), Money(0, "EUR"), Money(600, "EUR"))
        with pytest.raises(ValidationError, match="currencies"):
            PricedLine(item, Money(0, "USD"), Money(0, "EUR"), Money(500, "EUR"))

    def test_unpriced_lines_are_paid_in_full(self):
        fee = PricedLine.unpriced(line(price=Money(9, "EUR")))
        assert (fee.discount, fee.credits, fee.outstanding) == (Money(0, "EUR"), Money(0, "EUR"), Money(9, "EUR"))


@pytest.mark.parametrize("text", ["\ud800", "Beer \udfff"])
def test_names_and_product_ids_must_be_encodable_text(text):
    with pytest.raises(ValidationError, match="not valid Unicode"):
        LineItem(None, text, 1, Money(100, "EUR"), 0)
    with pytest.raises(ValidationError, match="not valid Unicode"):
        LineItem(text, "Beer", 1, Money(100, "EUR"), 0)


class TestDriverEnvironments:
    """A driver talks where it is told: no silent default host."""

    def test_a_driver_without_base_url_or_environment_is_refused_naming_the_choices(self):
        from txengine.providers.cheers import CheersDriver

        with pytest.raises(ValidationError, match="environment='sandbox' or 'production'"):
            CheersDriver(api_key="k")

    def test_an_unknown_environment_is_refused(self):
        from txengine.providers.cheers import CheersDriver

        with pytest.raises(ValidationError, match="unknown environment 'staging'"):
            CheersDriver(api_key="k", environment="staging")

    def test_each_environment_maps_to_the_documented_host_and_the_repr_says_which(self):
        from txengine.providers.cheers import CheersDriver

        sandbox = CheersDriver(api_key="secret-key-1", environment="sandbox")
        production = CheersDriver(api_key="secret-key-1", environment="production")
        assert sandbox.base_url == "https://api.dev.votesess.com"
        assert production.base_url == "https://api.uniqpon.com"
        assert repr(production) == "CheersDriver(environment='production', base_url='https://api.uniqpon.com')"
        assert "secret-key-1" not in repr(sandbox)

    def test_an_explicit_base_url_needs_no_environment(self):
        from txengine.providers.cheers import CheersDriver

        driver = CheersDriver(api_key="k", base_url="http://127.0.0.1:8080/")
        assert driver.base_url == "http://127.0.0.1:8080"
        assert repr(driver) == "CheersDriver(base_url='http://127.0.0.1:8080')"
