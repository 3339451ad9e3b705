"""Storage failures are EngineErrors: StoreUnavailable before a provider call, and
OutcomeUnknown (settled later by recover()) when the write after a provider call fails.

Faults are real: a full tmpfs, a filesystem remounted read-only, a file replaced or
deleted under the engine, a lock held past the busy timeout, a file that is not a
database.  Mounting needs root; those tests skip with the reason where it is refused.
"""

import os
import shutil
import sqlite3
import subprocess
from datetime import timedelta

import httpx
import pytest

from txengine import Engine
from txengine.errors import EngineError, OutcomeUnknown, StoreUnavailable
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
from txengine.store.sqlite import SQLiteStore

from .conftest import CUSTOMER


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), unmounted afterwards."""
    directory = tmp_path / "disk"
    directory.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory))
    except (OSError, subprocess.SubprocessError) as refused:
        pytest.skip(f"cannot mount a tmpfs here ({refused}); the SQLite-limit tests still run")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True, timeout=10)


def remount(directory, mode: str) -> None:
    # Only possible with no file open for writing: "turned read-only under a running
    # engine" cannot be staged on Linux (open descriptors keep writing), so the open
    # case is tested here and the running case by a full disk.
    _mount("-o", f"remount,{mode}", str(directory))


class FaultBefore(httpx.BaseTransport):
    """The real sandbox, with a real fault injected just before it handles one path."""

    def __init__(self, inner: httpx.BaseTransport, path_suffix: str, fault) -> None:
        self.inner, self.path_suffix, self.fault = inner, path_suffix, fault

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(self.path_suffix) and self.fault is not None:
            fault, self.fault = self.fault, None
            fault()
        return self.inner.handle_request(request)


def engine_on(path, sandbox, clock, transport=None, **store_options) -> Engine:
    driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key,
                             transport=transport or sandbox.transport())
    return Engine(SQLiteStore(str(path), **store_options), {"reference": driver}, clock)


def fill(directory) -> None:
    """Take every free block of the filesystem."""
    with open(directory / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass


def test_a_full_disk_is_store_unavailable_and_leaves_nothing_half_applied(small_disk, sandbox, clock, basket):
    with engine_on(small_disk / "txengine.db", sandbox, clock) as engine:
        engine.preview("reference", basket, customer_token=CUSTOMER)
        fill(small_disk)
        stored, failure = [], None
        for _ in range(500):  # the WAL reuses its free frames first: write until the disk says full
            sent = len(sandbox.requests)
            try:
                stored.append(engine.preview("reference", basket).id)
            except StoreUnavailable as error:
                failure = error
                break
        assert failure is not None, "the disk never filled"
        assert len(sandbox.requests) == sent  # refused before the provider was called
        assert str(small_disk / "txengine.db") in str(failure)
        assert "full" in str(failure).lower()
        os.remove(small_disk / "filler")
        assert all(engine.get(tx_id).state == "previewed" for tx_id in stored)
        assert engine.preview("reference", basket).state == "previewed"  # space back: it works again


def test_a_read_only_database_at_open_is_store_unavailable(small_disk, sandbox, clock):
    SQLiteStore(str(small_disk / "txengine.db")).close()
    os.remove(small_disk / "txengine.db-wal") if (small_disk / "txengine.db-wal").exists() else None
    remount(small_disk, "ro")
    try:
        with pytest.raises(StoreUnavailable, match="txengine.db"):
            engine_on(small_disk / "txengine.db", sandbox, clock)
        with pytest.raises(StoreUnavailable, match="new.db"):
            engine_on(small_disk / "new.db", sandbox, clock)
    finally:
        remount(small_disk, "rw")


def test_a_failed_write_after_the_provider_committed_is_outcome_unknown_then_recovered(
        small_disk, sandbox, clock, basket):
    """Finalize succeeds at the provider; the disk fills up before we can record it."""
    path = small_disk / "txengine.db"
    transport = FaultBefore(sandbox.transport(), "/finalize", lambda: fill(small_disk))
    with engine_on(path, sandbox, clock, transport=transport) as engine:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        with pytest.raises(OutcomeUnknown, match="could not be stored") as unknown:
            engine.finalize(tx.id)
        os.remove(small_disk / "filler")
        assert unknown.value.tx_id == tx.id
        assert isinstance(unknown.value.__cause__, StoreUnavailable)
        finalized_at_provider = sandbox.balance(CUSTOMER)
        assert engine.get(tx.id).in_doubt  # the claim committed before the call is what remains
        clock.advance(engine.core.intent_leases["reference"] + timedelta(seconds=1))
        assert engine.recover() == 1
        assert engine.get(tx.id).state == "finalized"
        assert sandbox.balance(CUSTOMER) == finalized_at_provider  # settled, not charged twice


def test_a_database_replaced_under_the_engine_is_detected_before_the_next_commit(tmp_path, sandbox, clock, basket):
    path = tmp_path / "txengine.db"
    with engine_on(path, sandbox, clock) as engine:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        shutil.copy(path, tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", path)  # a restore, or a deploy script, swaps the file
        sent = len(sandbox.requests)
        with pytest.raises(StoreUnavailable, match="replaced"):
            engine.finalize(tx.id)
        assert len(sandbox.requests) == sent


def test_a_database_deleted_under_the_engine_is_detected_before_the_next_commit(tmp_path, sandbox, clock, basket):
    path = tmp_path / "txengine.db"
    with engine_on(path, sandbox, clock) as engine:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
        with pytest.raises(StoreUnavailable, match="deleted"):
            engine.finalize(tx.id)
        assert not path.exists()


def test_a_file_replaced_during_the_provider_call_makes_the_outcome_unknown(tmp_path, sandbox, clock, basket):
    path = tmp_path / "txengine.db"

    def replace():
        shutil.copy(path, tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", path)

    transport = FaultBefore(sandbox.transport(), "/finalize", replace)
    with engine_on(path, sandbox, clock, transport=transport) as engine:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        with pytest.raises(OutcomeUnknown, match="replaced"):
            engine.finalize(tx.id)


def test_a_lock_held_past_the_busy_timeout_is_store_unavailable(tmp_path, sandbox, clock, basket):
    path = tmp_path / "txengine.db"
    with engine_on(path, sandbox, clock, busy_timeout_ms=50) as engine:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            sent = len(sandbox.requests)
            with pytest.raises(StoreUnavailable, match="locked"):
                engine.finalize(tx.id)
            assert len(sandbox.requests) == sent
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert engine.finalize(tx.id).state == "finalized"


def test_a_file_that_is_not_a_database_is_store_unavailable(tmp_path, driver, clock):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StoreUnavailable, match="not a database") as refused:
        Engine.open(f"sqlite:///{path}", providers={"reference": driver}, clock=clock)
    assert str(path) in str(refused.value)
    assert isinstance(refused.value, EngineError)


def test_a_failed_write_after_a_preview_was_priced_is_outcome_unknown(small_disk, sandbox, clock, basket):
    transport = FaultBefore(sandbox.transport(), "/previews", lambda: fill(small_disk))
    with engine_on(small_disk / "txengine.db", sandbox, clock, transport=transport) as engine:
        with pytest.raises(OutcomeUnknown, match="could not be stored") as unknown:
            engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="sale-1")
        assert unknown.value.tx_id is not None and isinstance(unknown.value.__cause__, StoreUnavailable)
        os.remove(small_disk / "filler")
        # The claim committed before the call remains, leased: once the lease runs out the
        # same key resumes the preview (the provider replays it: one preview, not two).
        clock.advance(engine.core.intent_leases["reference"] + timedelta(seconds=1))
        assert engine.preview("reference", basket, customer_token=CUSTOMER,
                              idempotency_key="sale-1").id == unknown.value.tx_id
