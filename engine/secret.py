"""A wrapper that keeps credentials and customer keys out of reprs, logs and errors.

Anything secret enters txengine as a ``Secret``; only the code that writes an HTTP
header calls ``reveal()``.  Where a secret must be matched later (an idempotent preview
re-sent with the same customer key) we keep ``fingerprint()``, a keyed hash, never the
value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any, NoReturn

from .errors import ValidationError


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str | Secret) -> None:
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

    def __reduce__(self) -> NoReturn:
        # Pickling would write the value to wherever the pickle goes.
        raise TypeError("a Secret cannot be pickled")


def as_secret(value: str | Secret | None) -> Secret | None:
    return None if value is None else Secret(value)


class Sealer:
    """Encrypts a customer key for the short time an in-doubt preview may still need it.

    A preview whose answer was lost can only be completed by re-sending it, and that
    needs the customer key; so the engine keeps it, sealed with AES-256-GCM, in the
    preview's hold row, which is deleted when the preview settles or its deadline
    passes.  The sealed value is bound to its hold (``bound_to``, authenticated but not
    encrypted): a ciphertext copied into another row does not open there.

    The key is derived (HKDF-SHA256) from the POS's secret (``Engine.open(...,
    secret_key=...)`` or ``TXENGINE_SECRET_KEY``) or, failing that, from a random key
    kept in the database itself.
    """

    __slots__ = ("_aead",)

    _INFO = b"txengine preview hold v1"
    _NONCE = 12

    def __init__(self, secret_key: str | bytes) -> None:
        # Imported here: the rest of the engine does not need the library loaded.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        material = secret_key.encode() if isinstance(secret_key, str) else secret_key
        if not isinstance(material, bytes) or len(material) < 16:
            raise ValidationError("secret_key must be a str or bytes of at least 16 bytes")
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=self._INFO).derive(material)
        self._aead = AESGCM(derived)

    def seal(self, secret: Secret, bound_to: str) -> str:
        nonce = os.urandom(self._NONCE)
        sealed = self._aead.encrypt(nonce, secret.reveal().encode(), bound_to.encode())
        return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def unseal(self, sealed: str, bound_to: str) -> Secret | None:
        """The secret, or None if it was sealed under another key (or tampered with)."""
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.urlsafe_b64decode(sealed.encode("ascii"))
            plain = self._aead.decrypt(raw[: self._NONCE], raw[self._NONCE:], bound_to.encode())
        except (InvalidTag, ValueError):
            return None
        return Secret(plain.decode())

    def __repr__(self) -> str:
        return "Sealer('***')"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Sealer cannot be pickled")


#: Where a delivery payload keeps its sealed secrets (field name -> sealed text).
SEALED_FIELDS = "$sealed"


def seal_payload(sealer: Sealer, payload: Mapping[str, Any], bound_to: str) -> dict[str, Any]:
    """A delivery payload fit for the outbox: each ``Secret`` value sealed, bound to its
    delivery and field (a driver's store-and-forward record that needs a customer key)."""
    plain = {name: value for name, value in payload.items() if not isinstance(value, Secret)}
    sealed = {name: sealer.seal(value, f"{bound_to}\n{name}") for name, value in payload.items()
              if isinstance(value, Secret)}
    return {**plain, SEALED_FIELDS: sealed} if sealed else plain


def open_payload(sealer: Sealer, payload: Mapping[str, Any], bound_to: str) -> dict[str, Any]:
    """The payload as the driver built it, each sealed value a ``Secret`` again; one sealed
    under another key is left out (the driver then treats it as lost)."""
    plain = {name: value for name, value in payload.items() if name != SEALED_FIELDS}
    sealed_fields = payload.get(SEALED_FIELDS)
    for name, sealed in (sealed_fields.items() if isinstance(sealed_fields, Mapping) else ()):
        opened = sealer.unseal(str(sealed), f"{bound_to}\n{name}")
        if opened is not None:
            plain[name] = opened
    return plain


def has_secrets(payload: Mapping[str, Any]) -> bool:
    return any(isinstance(value, Secret) for value in payload.values())
