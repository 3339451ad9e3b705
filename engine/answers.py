"""Reading provider answers: a success must prove itself.

A driver commits a transition only when the provider's answer is the documented success
shape for that call and agrees with the transaction (ids, amounts, currency, line
count).  Anything else -- ``{}``, an empty body, an error envelope sent with HTTP 200,
numbers sent as strings, another transaction's id -- means the provider *may* have
acted: ``ProtocolError``, so the outcome is unknown and ``recover()`` asks again.

Every driver reads its answers through ``Answer``: one object per JSON object, read
field by field with the type the documentation gives.  A missing field, a wrong type or
a value that disagrees with what was asked raises ``ProtocolError`` naming the call and
the field (never the value: answers can echo secrets).  One style for every driver, so a
reviewer checks a driver's trust in one place: the lines that read its answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

from .errors import ProtocolError

_MISSING = object()


class Answer:
    """A JSON object from a provider, read strictly.  ``where`` names it in errors."""

    __slots__ = ("_body", "provider", "where")

    def __init__(self, body: Any, *, provider: str, where: str) -> None:
        if not isinstance(body, Mapping):
            raise ProtocolError(f"{where}: the answer is not a JSON object", provider=provider)
        self._body: Mapping[str, Any] = body
        self.provider = provider
        self.where = where

    def __repr__(self) -> str:
        # Field names only: values can carry tokens, card numbers and customer keys.
        return f"Answer({self.where}, fields={sorted(self._body)})"

    def __contains__(self, name: str) -> bool:
        return name in self._body

    def fail(self, message: str) -> ProtocolError:
        return ProtocolError(f"{self.where}: {message}", provider=self.provider)

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        value = self._body.get(name, default)
        if value is _MISSING:
            raise self.fail(f"{name} is missing")
        return value

    def _typed(self, name: str, kinds: type | tuple[type, ...], label: str, optional: bool) -> Any:
        value = self._body.get(name, _MISSING)
        if value is _MISSING or value is None:
            if optional:
                return None
            raise self.fail(f"{name} is missing")
        # bool is an int in Python, never in a provider's schema.
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            raise self.fail(f"{name} is not {label}")
        if not isinstance(value, kinds):
            raise self.fail(f"{name} is not {label}")
        return value

    def text(self, name: str, *, optional: bool = False) -> str:
        value = self._typed(name, str, "a string", optional)
        if value is not None and not value.strip():
            raise self.fail(f"{name} is empty")
        return value  # type: ignore[no-any-return]

    def integer(self, name: str, *, optional: bool = False, minimum: int | None = None) -> int:
        value = self._typed(name, int, "an integer", optional)
        if value is not None and minimum is not None and value < minimum:
            raise self.fail(f"{name} is below {minimum}")
        return value  # type: ignore[no-any-return]

    def number(self, name: str, *, optional: bool = False) -> Decimal:
        """A JSON number (int or float, never a string), exactly as written."""
        value = self._typed(name, (int, float), "a number", optional)
        if value is None:
            return None  # type: ignore[return-value]
        result = Decimal(str(value))
        if not result.is_finite():
            raise self.fail(f"{name} is not a finite number")
        return result

    def boolean(self, name: str, *, optional: bool = False) -> bool:
        return self._typed(name, bool, "true or false", optional)  # type: ignore[no-any-return]

    def obj(self, name: str, *, optional: bool = False) -> Answer:
        value = self._typed(name, Mapping, "an object", optional)
        if value is None:
            return None  # type: ignore[return-value]
        return Answer(value, provider=self.provider, where=f"{self.where}.{name}")

    def array(self, name: str, *, optional: bool = False, length: int | None = None) -> list[Any]:
        value = self._typed(name, list, "a list", optional)
        if value is not None and length is not None and len(value) != length:
            raise self.fail(f"{name} has {len(value)} entries, expected {length}")
        return value  # type: ignore[no-any-return]

    def objects(self, name: str, *, optional: bool = False, length: int | None = None) -> Iterator[Answer]:
        """Each entry of the list ``name`` as an ``Answer`` (every entry must be an object)."""
        for index, entry in enumerate(self.array(name, optional=optional, length=length) or ()):
            yield Answer(entry, provider=self.provider, where=f"{self.where}.{name}[{index}]")

    def expect(self, name: str, expected: Any) -> None:
        """The field must equal what was asked (an id, a currency, an amount)."""
        value = self._body.get(name, _MISSING)
        if value is _MISSING:
            raise self.fail(f"{name} is missing")
        if type(value) is bool and type(expected) is not bool:
            raise self.fail(f"{name} does not match the transaction")
        if value != expected:
            raise self.fail(f"{name} does not match the transaction")

    def one_of(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name)
        if value not in allowed:
            raise self.fail(f"{name} is not one of {', '.join(allowed)}")
        return value
