"""JSON forms of the value types, for the journal and the snapshot column.

Amounts travel as integer minor units next to one currency per transaction; times as
ISO 8601 UTC strings with microseconds; VAT as a decimal string.  Decoding re-runs
every validator, so a tampered row cannot produce an invalid snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import attrs

from .models import LineItem, PricedLine, ReceiptLine, Transaction, TransactionHead
from .money import Money


def encode_time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def decode_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def encode_line(line: PricedLine) -> dict[str, Any]:
    return {
        "product_id": line.product_id,
        "name": line.name,
        "quantity": line.quantity,
        "unit_price": line.unit_price.amount_minor,
        "vat": str(line.vat_percent),
        "discount": line.discount.amount_minor,
        "credits": line.credits.amount_minor,
        "outstanding": line.outstanding.amount_minor,
    }


def decode_line(data: Mapping[str, Any], currency: str) -> PricedLine:
    return PricedLine(
        item=LineItem(
            product_id=data["product_id"],
            name=data["name"],
            quantity=data["quantity"],
            unit_price=Money(data["unit_price"], currency),
            vat_percent=data["vat"],
        ),
        discount=Money(data["discount"], currency),
        credits=Money(data["credits"], currency),
        outstanding=Money(data["outstanding"], currency),
    )


def encode_receipt(line: ReceiptLine) -> dict[str, Any]:
    return {
        "kind": line.kind,
        "text": line.text,
        "name": line.name,
        "value": line.value,
        "decoration": list(line.decoration),
    }


def decode_receipt(data: Mapping[str, Any]) -> ReceiptLine:
    return ReceiptLine(**data)


# Fields a transition may set, with their codecs: the journal stores exactly these.
_TIME_FIELDS = ("expires_at", "refund_deadline", "finalized_at", "created_at", "updated_at")
_PLAIN_FIELDS = ("id", "provider", "state", "currency", "payment_type", "provider_ref", "pending", "version")


def encode_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _TIME_FIELDS:
            encoded[name] = encode_time(value)
        elif name == "items":
            encoded[name] = [encode_line(line) for line in value]
        elif name == "receipt":
            encoded[name] = [encode_receipt(line) for line in value]
        elif name == "details":
            encoded[name] = json_safe(value)
        elif name in _PLAIN_FIELDS:
            encoded[name] = value
        else:
            raise KeyError(f"{name!r} is not a snapshot field")
    return encoded


def decode_fields(data: Mapping[str, Any], currency: str) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for name, value in data.items():
        if name in _TIME_FIELDS:
            decoded[name] = decode_time(value)
        elif name == "items":
            decoded[name] = tuple(decode_line(line, currency) for line in value)
        elif name == "receipt":
            decoded[name] = tuple(decode_receipt(line) for line in value)
        else:
            decoded[name] = value
    return decoded


def encode_transaction(tx: Transaction) -> dict[str, Any]:
    # Fields marked ``stored: False`` (the outbox view ``deliveries``) are read, not kept.
    return encode_fields({field.name: getattr(tx, field.name) for field in attrs.fields(Transaction)
                          if field.metadata.get("stored", True)})


def decode_transaction(data: Mapping[str, Any]) -> Transaction:
    return Transaction(**decode_fields(data, data["currency"]))


#: the snapshot fields a head holds that a transition may change, in the order stores set them
HEAD_FIELDS = ("state", "version", "expires_at", "refund_deadline", "pending", "updated_at")


def head_snapshot_fields(head: TransactionHead) -> tuple[Any, ...]:
    """A head's ``HEAD_FIELDS`` as the snapshot's JSON holds them (plain strings, ISO times)."""
    return (str(head.state), head.version, encode_time(head.expires_at), encode_time(head.refund_deadline),
            None if head.pending is None else str(head.pending), encode_time(head.updated_at))


def json_safe(value: Any) -> Any:
    """Plain JSON values: Decimals become strings, mappings dicts, tuples lists."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{type(value).__name__} cannot be stored as JSON")


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


loads = json.loads
