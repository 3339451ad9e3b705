"""Item 7: a preview whose answer was lost names something the POS can query, a keyless
preview exposes the key the engine generated, and ``recover()`` settles it without the
POS: completed into a stored transaction before its deadline (re-sent under its own key,
so the provider holds the customer's credits once), abandoned after it.  The customer key
it needs is kept sealed only while the preview is in doubt."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sqlite3

import httpx
import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.core import PREVIEW_ABANDONED
from txengine.errors import OutcomeUnknown, ProviderRejected, TransactionInDoubt, TransactionNotFound
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.sandbox import DEFAULT_API_KEY, WORKED_EXAMPLE_TRANSACTION_KEY, WORKED_EXAMPLE_WALLET
from txengine.providers.reference import TIMERS, ReferenceDriver, ReferenceSandbox
from txengine.testing.sandbox import Fault
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from txengine.secret import Secret

from .conftest import CUSTOMER

POS_SECRET = "till-7 secret key for lost previews"


def db_bytes(db_url: str) -> bytes:
    path = pathlib.Path(db_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def holds(db_url: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as db:
        return db.execute("SELECT key, tx_id, sealed_token FROM preview_holds").fetchall()


def lose_preview(engine, sandbox, *, times: int = 1, **options):
    sandbox.faults.inject("preview", Fault.TIMEOUT_AFTER_COMMIT, times=times)
    with pytest.raises(OutcomeUnknown) as lost:
        engine.preview(**options)
    sandbox.faults.clear()
    return lost.value


# --- what the POS is told ----------------------------------------------------------------------


def test_a_lost_keyless_preview_names_a_queryable_id_and_its_generated_key(engine, sandbox, basket):
    sandbox.faults.inject("preview", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown) as lost:
        engine.preview("reference", basket, customer_token=CUSTOMER)
    key = lost.value.idempotency_key
    assert key and key.startswith("auto:")

    with pytest.raises(TransactionInDoubt, match="retry the preview with idempotency key"):
        engine.get(lost.value.tx_id)

    tx = engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key=key)
    assert tx.id == lost.value.tx_id and engine.get(tx.id).state == "previewed"
    assert len(sandbox.previews) == 1  # resumed, not previewed twice


def test_a_lost_command_names_the_key_to_retry_with(engine, sandbox, basket):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    engine.begin_payment(tx.id)
    sandbox.faults.inject("finalize", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown) as lost:
        engine.finalize(tx.id)
    assert lost.value.idempotency_key == f"auto:{tx.id}:finalize:{tx.version + 2}"


# --- recover() completes it --------------------------------------------------------------------


@pytest.mark.parametrize("idempotency_key", [None, "till-7:sale-42"], ids=["keyless", "keyed"])
@pytest.mark.parametrize("secret_key", [None, POS_SECRET], ids=["db-key", "pos-key"])
def test_recover_completes_a_lost_reference_preview_once(db_url, driver, sandbox, clock, basket,
                                                         idempotency_key, secret_key):
    with Engine.open(db_url, providers={"reference": driver}, clock=clock, secret_key=secret_key) as engine:
        lost = lose_preview(engine, sandbox, provider="reference", basket=basket, customer_token=CUSTOMER,
                            idempotency_key=idempotency_key)
        [(key, tx_id, sealed)] = holds(db_url)
        assert (key, tx_id) == (lost.idempotency_key, lost.tx_id)
        assert sealed and CUSTOMER.encode() not in db_bytes(db_url), "held sealed, never in plain text"

        clock.advance(TIMERS.preview_ttl / 2)
        assert engine.recover() == 1

        tx = engine.get(lost.tx_id)
        assert (tx.state, tx.pending, tx.gross) == ("previewed", None, basket.gross)
        assert tx.expires_at == tx.created_at + TIMERS.preview_ttl, "its deadline runs from the first attempt"
        assert len(sandbox.previews) == 1 and sandbox.previews[tx.provider_ref].customer == CUSTOMER
        assert holds(db_url) == [], "the sealed key is deleted with the settlement"
        assert engine.recover() == 0
        # the POS's own retry now replays the stored transaction
        again = engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key=lost.idempotency_key)
        assert again.id == tx.id and len(sandbox.previews) == 1

        engine.finalize(tx.id)
        assert [action for _, action in sandbox.commits] == ["finalize"], "charged once"
    stored = db_bytes(db_url)  # closed: the WAL is checkpointed into the file
    assert CUSTOMER.encode() not in stored
    assert sealed.encode() not in stored, "not even the sealed key lingers in free pages"


def test_recover_completes_a_lost_cheers_preview_holding_the_credits_once(db_url, clock):
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_worked_example()
    driver = CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=sandbox.transport())
    beers = Basket([LineItem("f04ce0c0-1034-40bf-a066-3e313f68c781", "Draft Beer 0.5L", 3,
                             Money(50000, "HUF"), 27)])
    before = sandbox.wallet_available(WORKED_EXAMPLE_WALLET)
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        # the driver re-sends a replayed preview inline first: the answer is lost every time
        lost = lose_preview(engine, sandbox, times=1 + cheers.TRANSPORT_RETRIES, provider="cheers",
                            basket=beers, customer_token=WORKED_EXAMPLE_TRANSACTION_KEY)
        held = sandbox.wallet_available(WORKED_EXAMPLE_WALLET)
        assert held < before, "Cheers holds the credits of the lost preview"

        assert engine.recover() == 1

        tx = engine.get(lost.tx_id)
        assert (tx.state, sandbox.status(tx.provider_ref)) == ("previewed", "PREVIEWED")
        assert sandbox.wallet_available(WORKED_EXAMPLE_WALLET) == held, "held once, not twice"
        assert holds(db_url) == []
        engine.finalize(tx.id)
        assert [entry.kind for entry in sandbox.ledger] == ["finalize"]
        assert sandbox.wallet_balance(WORKED_EXAMPLE_WALLET) == held, "charged once"
    assert WORKED_EXAMPLE_TRANSACTION_KEY.encode() not in db_bytes(db_url)


def test_the_secret_key_may_come_from_the_environment(db_url, driver, sandbox, clock, basket, monkeypatch):
    monkeypatch.setenv("TXENGINE_SECRET_KEY", POS_SECRET)
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        lost = lose_preview(engine, sandbox, provider="reference", basket=basket, customer_token=CUSTOMER)
    monkeypatch.delenv("TXENGINE_SECRET_KEY")
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as other:
        assert other.recover() == 0, "sealed under the POS's key: the database's own key cannot open it"
        with pytest.raises(TransactionInDoubt):
            other.get(lost.tx_id)
    with Engine.open(db_url, providers={"reference": driver}, clock=clock, secret_key=POS_SECRET) as engine:
        assert engine.recover() == 1
        assert engine.get(lost.tx_id).state == "previewed" and len(sandbox.previews) == 1


# --- recover() gives it up -----------------------------------------------------------------------


def test_a_lost_preview_past_its_deadline_is_abandoned_not_completed(engine, db_url, sandbox, clock, basket):
    lost = lose_preview(engine, sandbox, provider="reference", basket=basket, customer_token=CUSTOMER)
    sent = len(sandbox.requests)
    clock.advance(TIMERS.preview_ttl)

    assert engine.recover() == 1

    assert len(sandbox.requests) == sent, "not sent again"
    assert holds(db_url) == []
    with pytest.raises(TransactionNotFound):
        engine.get(lost.tx_id)
    with pytest.raises(ProviderRejected, match="deadline passed") as replayed:
        engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key=lost.idempotency_key)
    assert replayed.value.code == PREVIEW_ABANDONED
    assert engine.recover() == 0


def test_a_lost_secuconnect_preview_is_abandoned_not_made_twice(db_url, clock):
    sandbox = SecuconnectSandbox(clock)
    driver = SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID,
                               client_secret=DEFAULT_CLIENT_SECRET, clock=clock, transport=sandbox.transport())
    lunch = [LineItem("30037", "Sandwich Romano", 1, Money(349, "EUR"), 7)]
    with Engine.open(db_url, providers={"secuconnect": driver}, clock=clock) as engine:
        sandbox.faults.inject("preTransaction", Fault.TIMEOUT_AFTER_COMMIT, times=2)
        with pytest.raises(OutcomeUnknown) as lost:
            engine.preview("secuconnect", lunch, customer_token="9276004429942845")
        sandbox.faults.clear()
        made = len(sandbox.smart_transactions)

        assert engine.recover() == 1

        assert len(sandbox.smart_transactions) == made, "a re-sent create would make another one"
        assert holds(db_url) == []
        with pytest.raises(ProviderRejected, match="new preview on every send"):
            engine.preview("secuconnect", lunch, customer_token="9276004429942845",
                           idempotency_key=lost.value.idempotency_key)


# --- the customer key is nowhere in clear ------------------------------------------------------


def test_no_customer_key_in_the_database_logs_errors_or_reprs(db_url, driver, sandbox, clock, basket, caplog):
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    with Engine.open(db_url, providers={"reference": driver}, clock=clock, secret_key=POS_SECRET) as engine:
        lost = lose_preview(engine, sandbox, provider="reference", basket=basket, customer_token=CUSTOMER)
        shown += [str(lost), repr(lost), repr(engine), repr(engine.core._sealer_cache)]
        [hold] = engine.store.previews_to_settle(clock.now(), 10, ["reference"])
        shown.append(repr(hold))
        assert CUSTOMER.encode() not in db_bytes(db_url) and POS_SECRET.encode() not in db_bytes(db_url)
        engine.recover()
        shown += [repr(engine.get(lost.tx_id)), repr(engine.history(lost.tx_id))]
    shown += [record.getMessage() for record in caplog.records]
    stored = db_bytes(db_url)
    for secret in (CUSTOMER, POS_SECRET):
        assert secret.encode() not in stored
        assert all(secret not in text for text in shown)
    assert engine.core._sealer_cache.unseal(hold.sealed_token, "another hold") is None, "bound to its hold"
    assert engine.core._sealer_cache.unseal(hold.sealed_token, f"{hold.key}\n{hold.tx_id}") == Secret(CUSTOMER)


# --- a preview whose process died mid-call --------------------------------------------------------


class Killed(BaseException):
    """The process died: nothing after the provider call ran (not an ``Exception``)."""


def test_a_preview_cut_off_mid_call_is_completed_once_its_lease_ran_out(db_url, sandbox, clock, basket):
    inner = sandbox.transport()

    def die_after_the_provider_committed(request):
        inner.handle_request(request)
        raise Killed

    dying = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key,
                            transport=httpx.MockTransport(die_after_the_provider_committed))
    with Engine.open(db_url, providers={"reference": dying}, clock=clock) as crashed:
        with pytest.raises(Killed):
            crashed.preview("reference", basket, customer_token=CUSTOMER)
    [(key, tx_id, _)] = holds(db_url)

    driver = ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=inner)
    with Engine.open(db_url, providers={"reference": driver}, clock=clock) as engine:
        assert engine.recover() == 0, "its lease still covers a call that may be live"
        clock.advance(engine.core.intent_leases["reference"])
        assert engine.recover() == 1
        assert engine.get(tx_id).state == "previewed" and len(sandbox.previews) == 1
        assert holds(db_url) == []


def test_both_facades_settle_a_lost_preview(pos, sandbox, basket):
    lost = lose_preview(pos, sandbox, provider="reference", basket=basket, customer_token=CUSTOMER)
    assert pos.recover() == 1
    assert pos.get(lost.tx_id).state == "previewed" and len(sandbox.previews) == 1
