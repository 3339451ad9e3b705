"""Spoiled answers, made from a provider's real one: pure functions over parsed JSON.

They fit any provider because they read no schema: ids are fields whose name says id
or reference, amounts are the other numbers (and numeric strings under a money-like
name).  A driver must take none of them for a success (``txengine.answers``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

_ID_NAME = re.compile(r"(^|_)id$|[a-z]Id$|^id$|ref(erence)?$|Ref(erence)?$|uuid", re.IGNORECASE)
_MONEY_NAME = re.compile(r"total|amount|balance|credit|sum|price|point|discount|outstanding|value|cash",
                         re.IGNORECASE)
#: how big a huge answer is
HUGE_BYTES = 4 * 1024 * 1024


def _walk(value: Any, leaf: Callable[[str | None, Any], Any], name: str | None = None) -> Any:
    if isinstance(value, dict):
        return {key: _walk(item, leaf, key) for key, item in value.items()}
    if isinstance(value, list):
        return [_walk(item, leaf, name) for item in value]
    return leaf(name, value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wrong_types(answer: Any) -> Any:
    """Every number sent as a string (``5`` -> ``"5"``)."""
    return _walk(answer, lambda name, value: str(value) if _is_number(value) else value)


def wrong_ids(answer: Any) -> Any:
    """Every id another transaction's."""
    def leaf(name: str | None, value: Any) -> Any:
        if name is None or not _ID_NAME.search(name) or value is None or isinstance(value, bool):
            return value
        return value + 7919 if _is_number(value) else f"{value}-other"

    return _walk(answer, leaf)


def wrong_totals(answer: Any) -> Any:
    """Every amount off by one (numbers, and numeric strings under a money-like name); ids kept."""
    def leaf(name: str | None, value: Any) -> Any:
        if name is not None and _ID_NAME.search(name):
            return value
        if _is_number(value):
            return value + 1
        if isinstance(value, str) and name is not None and _MONEY_NAME.search(name):
            try:
                return str(Decimal(value) + 1)
            except InvalidOperation:
                return value
        return value

    return _walk(answer, leaf)


def huge(answer: Any) -> Any:
    """The answer with several megabytes of padding beside it."""
    padding = "x" * HUGE_BYTES
    return {**answer, "padding": padding} if isinstance(answer, dict) else [answer, padding]


def respoil(body: bytes, spoil: Callable[[Any], Any]) -> bytes:
    """``spoil`` applied to a JSON body; a body that is not JSON is cut in half instead."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body[: len(body) // 2]
    return json.dumps(spoil(answer)).encode()
