"""Stores: where snapshots, the journal, intents and the outbox live."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from ..errors import ValidationError
from .base import Store
from .sqlite import SQLiteStore

__all__ = ["Store", "SQLiteStore", "open_existing", "open_store"]


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


def open_existing(db: str) -> Store:
    """The store an operator command reads: ``db`` is a store URL or a SQLite file path.

    A path that does not exist raises ``FileNotFoundError`` instead of creating an empty
    database: a typo must not look like an empty outbox.
    """
    if "://" in db:
        return open_store(db)
    if not os.path.isfile(db):
        raise FileNotFoundError(f"no database at {db}")
    return SQLiteStore(db)
