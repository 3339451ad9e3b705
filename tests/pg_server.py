"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory,
listen on a free loopback port, one fresh database per test cloned from a migrated
template, everything removed at the end.

On a fresh machine without PostgreSQL it is installed with apt-get when running as
root; otherwise the PostgreSQL tests are skipped with the reason.  PostgreSQL refuses
to run as root, so the cluster belongs to the ``postgres`` user then.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def find_binaries() -> Path:
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin"):
        for directory in sorted(glob.glob(pattern), reverse=True):  # newest major first
            if Path(directory, "initdb").exists():
                return Path(directory)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    if os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["apt-get", "update"], check=False, **quiet)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "postgresql"], check=False, env=env, **quiet)
        for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
            return Path(directory)
    raise PostgresUnavailable("no PostgreSQL binaries (install the postgresql package)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One cluster on 127.0.0.1: ``start()``, ``stop()``, ``restart()``, ``new_database()``."""

    TEMPLATE = "txengine_template"

    def __init__(self) -> None:
        self.bin = find_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="txengine-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no postgres user") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as_user, str(self.bin / tool), *args],
                                capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{tool} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> None:
        # fsync off: a test cluster need not survive a power cut, and commits stay fast on
        # a busy shared machine; a stop/start (the outage tests) still keeps every commit
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
                   " -c shared_buffers=64MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def prepare_template(self) -> None:
        """A migrated database that every test's database is cloned from (fast)."""
        import psycopg

        from txengine.store.postgres import migrate

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {self.TEMPLATE}")
        migrate(self.url(self.TEMPLATE))

    def new_database(self, *, migrated: bool = True) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        template = f" TEMPLATE {self.TEMPLATE}" if migrated else ""
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}{template}")
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def destroy(self) -> None:
        try:
            self.stop()
        except PostgresUnavailable:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def query_one(db_url: str, statement: str, params: tuple = ()) -> tuple | None:
    """One row of a raw query against either store (``?`` placeholders): what tests use to
    look at what is stored, whichever database the URL names."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
            return db.execute(statement, params).fetchone()
    import psycopg

    with psycopg.connect(db_url) as db:
        return db.execute(statement.replace("?", "%s"), params).fetchone()


def execute(db_url: str, statement: str, params: tuple = ()) -> None:
    """A raw write against either store (``?`` placeholders), committed: what tests use to
    damage a row behind the engine's back."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
            db.execute(statement, params)
        return
    import psycopg

    with psycopg.connect(db_url) as db:
        db.execute(statement.replace("?", "%s"), params)
