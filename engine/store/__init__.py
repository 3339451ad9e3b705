"""Stores: where snapshots, the journal, intents and the outbox live."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ..errors import ValidationError
from .base import Store
from .sqlite import SQLiteStore

__all__ = ["Store", "SQLiteStore", "open_store"]


def open_store(url: str) -> Store:
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ValidationError("a sqlite URL names a file: sqlite:///txengine.db")
        return SQLiteStore(path)
    if parts.scheme in ("postgres", "postgresql"):
        raise ValidationError("the PostgreSQL store is not available in this version")
    raise ValidationError(f"unsupported store URL scheme {parts.scheme!r}")
