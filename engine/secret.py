"""A wrapper that keeps credentials and customer keys out of reprs, logs and errors.

Anything secret enters txengine as a ``Secret``; only the code that writes an HTTP
header calls ``reveal()``.  Where a secret must be matched later (an idempotent preview
re-sent with the same customer key) we keep ``fingerprint()``, a keyed hash, never the
value.
"""

from __future__ import annotations

import hashlib
import hmac

from .errors import ValidationError


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("a Secret wraps a str")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Refused here, before any hashing or header: never echo the value.
            raise ValidationError("a secret (customer key, credential) must be valid Unicode text") from None
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self, key: bytes) -> str:
        """A keyed hash (HMAC-SHA256) of the value: safe to store and compare."""
        return hmac.new(key, self._value.encode(), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self):
        # Pickling would write the value to wherever the pickle goes.
        raise TypeError("a Secret cannot be pickled")


def as_secret(value: str | Secret | None) -> Secret | None:
    return None if value is None else Secret(value)
