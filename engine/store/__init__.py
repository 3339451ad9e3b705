"""Stores: where snapshots, the journal, intents and the outbox live."""

from __future__ import annotations

import os
import sqlite3
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..errors import ValidationError
from .base import Store
from .sqlite import MIGRATIONS, SQLiteStore

__all__ = ["Store", "SQLiteStore", "migrate", "open_existing", "open_store", "schema_version", "sqlite_path"]

#: query parameters of a postgresql:// URL that configure txengine, not libpq
_POSTGRES_OPTIONS = {"pool_size": int, "statement_timeout_ms": int, "wait_timeout": float}


def open_store(url: str) -> Store:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` or
    ``postgresql://user:password@host:5432/dbname?pool_size=8&sslmode=verify-full``."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ValidationError("a sqlite URL names a file: sqlite:///txengine.db")
        return SQLiteStore(path)
    if parts.scheme in ("postgres", "postgresql"):
        from .postgres import PostgresStore  # psycopg is the optional `postgres` extra

        libpq_url, options = _postgres_url(url)
        return PostgresStore(libpq_url, **options)
    raise ValidationError(f"unsupported store URL scheme {parts.scheme!r}")


def migrate(url: str) -> int:
    """Bring the store at ``url`` to this txengine's schema (``txengine migrate --db URL``);
    returns the schema version.  PostgreSQL: safe to run from many hosts at once."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        from .postgres import migrate as migrate_postgres

        return migrate_postgres(_postgres_url(url)[0])
    path = sqlite_path(url)
    if path is None:
        raise ValidationError(f"unsupported store URL scheme {parts.scheme!r}")
    store = SQLiteStore(path)  # SQLite migrates on open
    try:
        version: int = store.schema_version
        return version
    finally:
        store.close()


def _postgres_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split txengine's own options off a PostgreSQL URL; the rest (TLS: ``sslmode``,
    ``sslrootcert``...) goes to libpq unchanged."""
    parts = urlsplit(url)
    options, libpq = {}, []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _POSTGRES_OPTIONS:
            try:
                options[name] = _POSTGRES_OPTIONS[name](value)
            except ValueError:
                raise ValidationError(f"the store URL option {name} must be a number, not {value!r}") from None
        else:
            libpq.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(libpq))), options


def sqlite_path(db: str) -> str | None:
    """The file a ``db`` argument names (a path or a ``sqlite://`` URL); None for other stores."""
    if "://" not in db:
        return db
    parts = urlsplit(db)
    if parts.scheme != "sqlite":
        return None
    return unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)


def open_existing(db: str, *, read_only: bool = False) -> Store:
    """The store an operator command works on: ``db`` is a store URL or a SQLite file path.

    It never creates a database or a schema (only ``txengine migrate`` does): a path that
    does not exist raises ``FileNotFoundError``, a file that is not a migrated txengine
    database ``ValidationError``, both naming the path.  ``read_only`` opens a view that
    takes no write lock, for the commands that only look.
    """
    path = sqlite_path(db)
    if path is None:
        if urlsplit(db).scheme in ("postgres", "postgresql"):
            from .postgres import PostgresStore

            libpq_url, options = _postgres_url(db)
            return PostgresStore(libpq_url, migrate_schema=False, **options)  # refuses an unmigrated one
        return open_store(db)  # refuses what this version cannot open
    if not path:
        raise ValidationError("a sqlite URL names a file: sqlite:///txengine.db")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no database at {path}")
    found = schema_version(path)
    if found < len(MIGRATIONS):
        raise ValidationError(
            f"{path} is not a txengine database" if found == 0 else
            f"{path} is at schema version {found} of {len(MIGRATIONS)}: run txengine migrate --db {db}")
    return SQLiteStore(path, read_only=read_only)


def schema_version(path: str) -> int:
    """The migrations applied to the SQLite file at ``path`` (0: none, or not a txengine
    database), read without writing anything."""
    connection = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
    try:
        connection.execute("PRAGMA schema_version").fetchone()  # "file is not a database" here
        if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone() is None:
            return 0
        version: int = connection.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        return version
    finally:
        connection.close()
