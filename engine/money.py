"""Money as integer minor units of an ISO 4217 currency.

Floats never enter: they cannot hold 0.1 exactly, and a payment engine that rounds
silently loses or invents money.  ``Money.of("3.49", "EUR")`` parses a decimal string
and refuses anything finer than the currency's exponent instead of rounding it.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import attrs

from .errors import ValidationError

# ISO 4217 active codes with their minor-unit exponent.  Most currencies use 2; the
# exceptions are listed explicitly so a reader can check them against the standard.
_EXPONENT_0 = {
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI",
    "VND", "VUV", "XAF", "XOF", "XPF",
}
_EXPONENT_3 = {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"}
_EXPONENT_4 = {"CLF", "UYW"}
_EXPONENT_2 = {
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD",
    "BDT", "BGN", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR",
    "KPW", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD",
    "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MYR", "MZN", "NAD", "NGN",
    "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON",
    "RSD", "RUB", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "USD", "UYU", "UZS", "VES", "WST", "XCD", "YER", "ZAR", "ZMW", "ZWG",
}

CURRENCY_EXPONENTS: dict[str, int] = {
    **{code: 2 for code in _EXPONENT_2},
    **{code: 0 for code in _EXPONENT_0},
    **{code: 3 for code in _EXPONENT_3},
    **{code: 4 for code in _EXPONENT_4},
}


def currency_exponent(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except (KeyError, TypeError):
        raise ValidationError(f"unknown ISO 4217 currency {currency!r}") from None


#: Amounts are bounded: ``abs(amount_minor) < 10**15`` minor units (10 trillion euros).
#: Every provider can carry it: 10**15 < 2**53, so even a provider that parses JSON
#: numbers as doubles (JavaScript backends, Rekonect's decimal majors) holds it exactly,
#: and no real basket comes near it.  Bigger numbers are refused before they reach a
#: driver, the JSON encoder or the database.
MAX_AMOUNT_MINOR = 10**15 - 1

#: A decimal amount string longer than this is refused unread: no real amount needs it,
#: and ``Decimal`` would otherwise parse (and later scale) whatever it is given.
MAX_AMOUNT_TEXT = 40


def _check_amount(instance: object, attribute: object, value: int) -> None:
    # bool is an int subclass; True euros is a bug, not an amount.
    if type(value) is not int:
        raise ValidationError(
            f"Money.amount_minor must be an int of minor units, got {type(value).__name__}"
        )
    # Compare before formatting: str() of a 5000-digit int is itself refused by Python.
    if not -MAX_AMOUNT_MINOR <= value <= MAX_AMOUNT_MINOR:
        raise ValidationError(
            f"Money.amount_minor is out of range: at most {MAX_AMOUNT_MINOR} minor units either way"
        )


def _check_currency(instance: object, attribute: object, value: str) -> None:
    currency_exponent(value)


@attrs.frozen(order=False)
class Money:
    """An amount in integer minor units (cents, fillér) of one ISO 4217 currency."""

    amount_minor: int = attrs.field(validator=_check_amount)
    currency: str = attrs.field(validator=_check_currency)

    @classmethod
    def of(cls, amount: str | Decimal | int, currency: str) -> Money:
        """Parse a decimal amount in major units: ``Money.of("3.49", "EUR")``.

        Refuses floats and anything finer than the currency allows; never rounds.
        """
        if isinstance(amount, bool) or isinstance(amount, float):
            raise ValidationError(
                f"Money.of needs a decimal string, Decimal or int, not {type(amount).__name__}"
            )
        exponent = currency_exponent(currency)
        if isinstance(amount, str) and len(amount) > MAX_AMOUNT_TEXT:
            raise ValidationError(f"an amount is at most {MAX_AMOUNT_TEXT} characters")
        if isinstance(amount, int) and not -MAX_AMOUNT_MINOR <= amount <= MAX_AMOUNT_MINOR:
            raise ValidationError(f"the amount is out of range: at most {MAX_AMOUNT_MINOR} minor units")
        try:
            value = Decimal(amount) if not isinstance(amount, Decimal) else amount
        except (InvalidOperation, TypeError, ValueError):
            raise ValidationError("the amount is not a decimal number") from None
        if not value.is_finite():
            raise ValidationError(f"{value} is not a finite amount")
        # Decide on the exponent alone: scaling "1E+999997" would burn seconds of CPU
        # and "1E+1000000" overflows the decimal context.
        if value and value.adjusted() + exponent > len(str(MAX_AMOUNT_MINOR)):
            raise ValidationError(f"the amount is out of range: at most {MAX_AMOUNT_MINOR} minor units")
        # (an int here: a finite Decimal has no 'n'/'N'/'F' exponent)
        if int(value.as_tuple().exponent) < -(exponent + MAX_AMOUNT_TEXT):
            raise ValidationError(f"the amount has more decimals than {currency} allows ({exponent})")
        minor = value.scaleb(exponent)
        if minor != minor.to_integral_value():
            raise ValidationError(
                f"{value} has more decimals than {currency} allows ({exponent})"
            )
        return cls(int(minor), currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENTS[self.currency]

    def to_decimal(self) -> Decimal:
        """The amount in major units, exactly."""
        return Decimal(self.amount_minor).scaleb(-self.exponent)

    def _same_currency(self, other: Money) -> None:
        if not isinstance(other, Money):
            raise TypeError(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise ValidationError(f"cannot mix {self.currency} and {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __mul__(self, factor: int) -> Money:
        if type(factor) is not int:
            raise TypeError("Money can only be multiplied by an int")
        return Money(self.amount_minor * factor, self.currency)

    __rmul__ = __mul__

    def __neg__(self) -> Money:
        return Money(-self.amount_minor, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor < other.amount_minor

    def __le__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor <= other.amount_minor

    def __gt__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor > other.amount_minor

    def __ge__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor >= other.amount_minor

    def __bool__(self) -> bool:
        return self.amount_minor != 0

    def __str__(self) -> str:
        return f"{self.to_decimal():.{self.exponent}f} {self.currency}"
