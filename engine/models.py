"""Immutable value types: what a POS hands in and what it gets back.

Every class validates at construction, so an invalid basket, a priced line whose parts
do not add up, or a snapshot with mixed currencies cannot exist.  Validation failures
are ``ValidationError`` (a ``ValueError``), raised before anything reaches a provider.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NoReturn

import attrs

from .errors import ValidationError
from .machine import TxEvent, TxState
from .money import Money

MAX_LINES = 1000
MAX_QUANTITY = 1_000_000
MAX_NAME_LENGTH = 200


def _fail(message: str) -> NoReturn:
    raise ValidationError(message)


def is_text(value: str) -> bool:
    """False for a str holding lone surrogates: valid Python, but no provider, file,
    database or header can carry it (encoding it raises ``UnicodeEncodeError``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_encodable(attribute: attrs.Attribute[Any], value: str) -> None:
    if not is_text(value):
        _fail(f"{attribute.name} is not valid Unicode text")


_CONTROL_CHARACTERS = re.compile("[\x00-\x1f]")


def _check_name(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        _fail(f"{attribute.name} must be a non-empty string")
    _check_encodable(attribute, value)
    if len(value) > MAX_NAME_LENGTH:
        _fail(f"{attribute.name} is longer than {MAX_NAME_LENGTH} characters")
    if _CONTROL_CHARACTERS.search(value):
        _fail(f"{attribute.name} contains control characters")


def _check_product_id(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > 255):
        _fail("product_id must be None or a non-empty string of at most 255 characters")
    if value is not None:
        _check_encodable(attribute, value)


def _check_quantity(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not int:
        _fail(f"quantity must be an int, got {type(value).__name__}")
    if not 0 < value <= MAX_QUANTITY:
        _fail(f"quantity must be between 1 and {MAX_QUANTITY}, got {value}")


def _check_unit_price(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Money):
        _fail("unit_price must be Money")
    if value.amount_minor < 0:
        _fail("unit_price cannot be negative")


def _vat(value: Any) -> Decimal:
    if isinstance(value, (bool, float)) or not isinstance(value, (int, Decimal, str)):
        _fail(f"vat_percent must be an int or a decimal string, got {type(value).__name__}")
    try:
        vat = Decimal(value)
    except ArithmeticError:
        _fail(f"vat_percent {value!r} is not a number")
    if not vat.is_finite() or not 0 <= vat <= 100:
        _fail(f"vat_percent must be between 0 and 100, got {value!r}")
    return vat.normalize() if vat != vat.to_integral_value() else Decimal(int(vat))


@attrs.frozen
class LineItem:
    """One basket line as the POS rings it up."""

    product_id: str | None = attrs.field(validator=_check_product_id)
    name: str = attrs.field(validator=_check_name)
    quantity: int = attrs.field(validator=_check_quantity)
    unit_price: Money = attrs.field(validator=_check_unit_price)
    vat_percent: Decimal = attrs.field(converter=_vat)

    @property
    def gross(self) -> Money:
        return self.unit_price * self.quantity

    @property
    def currency(self) -> str:
        return self.unit_price.currency


def _one_currency(items: Iterable[LineItem]) -> str:
    currencies = {item.currency for item in items}
    if len(currencies) > 1:
        _fail(f"a basket must be in one currency, got {sorted(currencies)}")
    return currencies.pop()


def _line_items(value: Any) -> tuple[LineItem, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        _fail("items must be a sequence of LineItem")
    items = tuple(value)
    if not items:
        _fail("a basket needs at least one line")
    if len(items) > MAX_LINES:
        _fail(f"a basket holds at most {MAX_LINES} lines")
    if not all(isinstance(item, LineItem) for item in items):
        _fail("every basket line must be a LineItem")
    return items


@attrs.frozen
class Basket:
    """A non-empty sequence of ``LineItem`` in one currency."""

    items: tuple[LineItem, ...] = attrs.field(converter=_line_items)
    currency: str = attrs.field(init=False)

    @currency.default
    def _currency(self) -> str:
        return _one_currency(self.items)

    def __attrs_post_init__(self) -> None:
        self.gross  # a total beyond Money's bound is refused here, not inside a driver

    @property
    def gross(self) -> Money:
        return sum((item.gross for item in self.items), Money.zero(self.currency))


@attrs.frozen
class PricedLine:
    """A basket line after the provider priced it.

    ``gross == discount + credits + outstanding`` always holds: the provider's answer
    is rejected as a protocol error otherwise, never stored.
    """

    item: LineItem
    discount: Money
    credits: Money
    outstanding: Money

    def __attrs_post_init__(self) -> None:
        # Checked in minor units (every stored line is decoded through here): each part is
        # bounded Money, and ``gross`` is refused beyond the bound as it is computed.
        discount, credits, outstanding, currency = self.discount, self.credits, self.outstanding, self.item.currency
        if discount.currency != currency or credits.currency != currency or outstanding.currency != currency:
            _fail(f"line {self.item.name!r} mixes currencies")
        if discount.amount_minor < 0 or credits.amount_minor < 0 or outstanding.amount_minor < 0:
            _fail(f"line {self.item.name!r} has a negative discount, credit or balance")
        if discount.amount_minor + credits.amount_minor + outstanding.amount_minor != self.item.gross.amount_minor:
            _fail(
                f"line {self.item.name!r}: discount {self.discount} + credits {self.credits}"
                f" + outstanding {self.outstanding} != gross {self.item.gross}"
            )

    @classmethod
    def unpriced(cls, item: LineItem) -> PricedLine:
        """A line the POS pays in full (a fee, a tip): no discount, no credits."""
        zero = Money.zero(item.currency)
        return cls(item, discount=zero, credits=zero, outstanding=item.gross)

    # The POS prints these; delegating keeps call sites short (line.name, line.gross).
    @property
    def product_id(self) -> str | None:
        return self.item.product_id

    @property
    def name(self) -> str:
        return self.item.name

    @property
    def quantity(self) -> int:
        return self.item.quantity

    @property
    def unit_price(self) -> Money:
        return self.item.unit_price

    @property
    def vat_percent(self) -> Decimal:
        return self.item.vat_percent

    @property
    def gross(self) -> Money:
        return self.item.gross


# Converters with concrete types (``converter=tuple`` would make a checker see the
# parameter as ``Iterable[_T_co]`` and refuse every list a driver passes).
def _priced_lines(value: Iterable[PricedLine]) -> tuple[PricedLine, ...]:
    return tuple(value)


def _decoration(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _receipt_lines(value: Iterable[ReceiptLine]) -> tuple[ReceiptLine, ...]:
    return tuple(value)


def _deliveries(value: Iterable[DeliveryRecord]) -> tuple[DeliveryRecord, ...]:
    return tuple(value)


RECEIPT_LINE_KINDS = ("separator", "textline", "name-value", "space")


@attrs.frozen
class ReceiptLine:
    """A line the provider asks the POS to print (secuconnect's ``receipt[]``)."""

    kind: str = attrs.field(validator=attrs.validators.in_(RECEIPT_LINE_KINDS))
    text: str = ""
    name: str = ""
    value: str = ""
    decoration: tuple[str, ...] = attrs.field(default=(), converter=_decoration)

    def render(self, width: int = 40) -> str:
        if self.kind == "separator":
            caption = f" {self.text} " if self.text else ""
            return caption.center(width, "-")
        if self.kind == "space":
            return ""
        if self.kind == "name-value":
            # Name left, value right-aligned; a pair too long for the width keeps a space.
            name, value = self.name.rstrip(), self.value.lstrip()
            gap = max(1, width - len(name) - len(value))
            return f"{name}{' ' * gap}{value}"
        return self.text.upper() if "important" in self.decoration else self.text


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@attrs.frozen
class Quote:
    """What a provider answered to a preview or an update: the priced basket."""

    lines: tuple[PricedLine, ...] = attrs.field(converter=_priced_lines)
    provider_ref: str | None = None
    receipt: tuple[ReceiptLine, ...] = attrs.field(default=(), converter=_receipt_lines)
    # Provider facts worth keeping on the snapshot (secuconnect missing_sum, Forloy card
    # type...).  Never secrets: drivers decide what goes here.
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        if not self.lines:
            _fail("a quote needs at least one line")
        _one_currency(line.item for line in self.lines)


@attrs.frozen
class Outcome:
    """What a provider answered to finalize, cancel or refund."""

    provider_ref: str | None = None
    receipt: tuple[ReceiptLine, ...] = attrs.field(default=(), converter=_receipt_lines)
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)


def _sum(lines: tuple[PricedLine, ...], part: str, currency: str) -> Money:
    return sum((getattr(line, part) for line in lines), Money.zero(currency))


@attrs.frozen
class DeliveryRecord:
    """One guaranteed delivery of a transaction (an outbox row), as operators and POS see it.

    ``status`` is ``pending`` (due at ``next_attempt_at``, ``last_error`` says why the last
    attempt failed), ``delivered`` or ``dead`` (parked after its retry schedule ran out or
    a definite refusal: visible, never dropped; an operator re-queues it).
    """

    id: int
    tx_id: str
    provider: str
    kind: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


# Lookups by value, a dict read each: snapshots are rebuilt on every command and replay.
_STATES: dict[str, TxState] = {state.value: state for state in TxState}
_EVENTS: dict[str, TxEvent] = {event.value: event for event in TxEvent}


def _state(value: str) -> TxState:
    """The state a stored or given string names (a tampered row is refused)."""
    try:
        return _STATES[value]
    except (KeyError, TypeError):
        _fail(f"state {value!r} is not one of {', '.join(TxState)}")


def _pending(value: str | None) -> TxEvent | None:
    if value is None:
        return None
    try:
        return _EVENTS[value]
    except (KeyError, TypeError):
        _fail(f"pending {value!r} is not one of {', '.join(TxEvent)}")


@attrs.frozen(kw_only=True)
class Transaction:
    """An immutable snapshot of one payment, rebuilt exactly by replaying its journal.

    ``pending`` names the event whose provider call is in flight or in doubt; while it
    is set, only that event's retry or ``recover()`` may act on the transaction.
    """

    id: str
    provider: str
    state: TxState = attrs.field(converter=_state)
    items: tuple[PricedLine, ...] = attrs.field(converter=_priced_lines)
    currency: str
    payment_type: str | None = None
    expires_at: datetime | None = None
    refund_deadline: datetime | None = None
    finalized_at: datetime | None = None
    provider_ref: str | None = None
    receipt: tuple[ReceiptLine, ...] = attrs.field(default=(), converter=_receipt_lines)
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    pending: TxEvent | None = attrs.field(default=None, converter=_pending)
    version: int = 0
    created_at: datetime
    updated_at: datetime
    # The outbox rows of this transaction (guaranteed deliveries and their progress), as
    # of when the snapshot was served.  Read from the outbox, never stored in the
    # snapshot nor the journal, and left out of equality so a replay equals the stored
    # snapshot whatever the deliveries have done since.
    deliveries: tuple[DeliveryRecord, ...] = attrs.field(
        default=(), converter=_deliveries, eq=False, metadata={"stored": False})
    # Why the pending call waits for an operator (the engine will not re-send it), as
    # read from its intent; never stored in the snapshot.
    attention: str | None = attrs.field(default=None, eq=False, metadata={"stored": False})

    def __attrs_post_init__(self) -> None:
        if any(line.item.currency != self.currency for line in self.items):
            _fail(f"transaction {self.id} mixes currencies")

    @property
    def gross(self) -> Money:
        return _sum(self.items, "gross", self.currency)

    @property
    def total_discount(self) -> Money:
        return _sum(self.items, "discount", self.currency)

    @property
    def total_credits(self) -> Money:
        return _sum(self.items, "credits", self.currency)

    @property
    def outstanding(self) -> Money:
        return _sum(self.items, "outstanding", self.currency)

    @property
    def in_doubt(self) -> bool:
        return self.pending is not None


@attrs.frozen(kw_only=True)
class TransactionHead:
    """A stored transaction's columns: its identity, state, version and deadlines.

    What a sweep decides on without reading the rest of the snapshot (the basket, the
    receipt, the provider's details): an expiry changes nothing else, so the store
    applies it to the stored snapshot's head fields in place (``Commit.head``).
    """

    id: str
    provider: str
    state: TxState = attrs.field(converter=_state)
    version: int
    expires_at: datetime | None = None
    refund_deadline: datetime | None = None
    pending: TxEvent | None = attrs.field(default=None, converter=_pending)
    updated_at: datetime

    @classmethod
    def of(cls, tx: Transaction) -> TransactionHead:
        return cls(id=tx.id, provider=tx.provider, state=tx.state, version=tx.version,
                   expires_at=tx.expires_at, refund_deadline=tx.refund_deadline, pending=tx.pending,
                   updated_at=tx.updated_at)


@attrs.frozen
class Event:
    """One journal entry.  ``seq`` is the snapshot version the entry produces.

    ``kind`` is ``transition`` (a state change, with the fields it set), ``attempt``
    (a provider call was claimed), ``rejected`` (the provider refused; state unchanged)
    or ``unknown`` (the call's outcome could not be learned; still in doubt).
    """

    tx_id: str
    seq: int
    kind: str
    at: datetime
    data: Mapping[str, Any] = attrs.field(converter=_frozen_mapping)
