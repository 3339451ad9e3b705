"""A success must prove itself (#10 item 1): garbage in place of secuconnect's answers.

Each garbage answer replaces the sandbox's real answer to ``start`` (finalize) or
``cancel`` (refund), either AFTER the sandbox really committed or BEFORE it saw the
request.  Every one must end as ``OutcomeUnknown`` -- never a committed transition --
and ``engine.recover()`` must then settle the transaction to what the sandbox really
did, with exactly one booking (or one reversal) in the card's ledger.
"""

from __future__ import annotations

import json

import httpx
import pytest

from txengine import Engine, LineItem, Money
from txengine.errors import OutcomeUnknown
from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox

CARD = "9276004429942845"  # the seed's card: 10,00 EUR
BASKET = [LineItem("30037", "Sandwich Romano", 1, Money(349, "EUR"), 7),
          LineItem("51", "Water, mildly sprinkling, 0.25 ltr.", 2, Money(99, "EUR"), 19)]  # 547


def garbage(real: dict) -> dict[str, bytes]:
    """Garbage answers, some built from the real one so only one thing is wrong."""
    def changed(**fields) -> bytes:
        return json.dumps({**real, **fields}).encode()

    text = json.dumps(real).encode()
    return {
        "empty": b"",
        "empty-object": b"{}",
        "error-envelope-200": b'{"status":"error","code":"MAINTENANCE"}',
        "id-as-number": changed(id=123),
        "status-as-bool": changed(status=True),
        "sum-as-string": changed(basket_info={**real["basket_info"], "sum": str(real["basket_info"]["sum"])}),
        "sum-as-bool": changed(basket_info={**real["basket_info"], "sum": True}),
        "another-transaction": changed(id="STX_SOMEONE_ELSES_TRANSACTION0"),
        "wrong-sum": changed(basket_info={**real["basket_info"], "sum": real["basket_info"]["sum"] + 1}),
        "wrong-currency": changed(basket_info={**real["basket_info"], "currency": "HUF"}),
        "wrong-line-count": changed(basket={**real["basket"], "products": real["basket"]["products"][:1]}),
        "no-basket-info": json.dumps({k: v for k, v in real.items() if k != "basket_info"}).encode(),
        "truncated": text[: len(text) // 2],
        "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        "huge": b'{"padding": "' + b"x" * (4 * 1024 * 1024) + b'"}',
    }


class Substitute(httpx.BaseTransport):
    """The sandbox, except that one call's answers are replaced by garbage ``armed`` times."""

    def __init__(self, sandbox: SecuconnectSandbox, suffix: str, kind: str, *, after_commit: bool) -> None:
        self.sandbox, self.real = sandbox, sandbox.transport()
        self.suffix, self.kind, self.after_commit = suffix, kind, after_commit
        self.armed = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not (self.armed and request.url.path.endswith(self.suffix)):
            return self.real.handle_request(request)
        self.armed -= 1
        if self.after_commit:
            real = self.real.handle_request(request).json()
        else:  # the sandbox never sees the request: garbage built from its current view
            stx_id = request.url.path.removesuffix(self.suffix).rsplit("/", 1)[-1]
            real = self.sandbox.smart_transaction(stx_id)
        return httpx.Response(200, content=garbage(real)[self.kind],
                              headers={"content-type": "application/json"})


KINDS = list(garbage({"id": "x", "basket_info": {"sum": 1}, "basket": {"products": []}}))


@pytest.fixture
def sandbox(clock) -> SecuconnectSandbox:
    return SecuconnectSandbox(clock)


def engine_with(sandbox, transport, db_url, clock) -> Engine:
    driver = SecuconnectDriver(base_url=sandbox.base_url, transport=transport, clock=clock,
                               **sandbox.credentials())
    return Engine.open(db_url, providers={"secuconnect": driver}, clock=clock)


@pytest.mark.parametrize("after_commit", [True, False], ids=["after-commit", "before-commit"])
@pytest.mark.parametrize("kind", KINDS)
def test_garbage_in_place_of_the_start_answer_is_unknown_and_recovered_once(
        sandbox, clock, db_url, kind, after_commit):
    transport = Substitute(sandbox, "/start/loyalty", kind, after_commit=after_commit)
    with engine_with(sandbox, transport, db_url, clock) as pos:
        tx = pos.preview("secuconnect", BASKET, customer_token=CARD)
        transport.armed = 1  # start is never re-sent blind
        with pytest.raises(OutcomeUnknown):
            pos.finalize(tx.id)
        assert pos.get(tx.id).state != "finalized", "garbage never commits"
        assert len(sandbox.loyalty_transactions) == int(after_commit)

        assert pos.recover() == 1
        assert pos.get(tx.id).state == "finalized"
    assert len(sandbox.loyalty_transactions) == 1, "one booking, never two"
    assert sandbox.card_balance(CARD) == 1000 - 547


@pytest.mark.parametrize("after_commit", [True, False], ids=["after-commit", "before-commit"])
@pytest.mark.parametrize("kind", KINDS)
def test_garbage_in_place_of_the_cancel_answer_is_unknown_and_recovered_once(
        sandbox, clock, db_url, kind, after_commit):
    transport = Substitute(sandbox, "/cancel", kind, after_commit=after_commit)
    with engine_with(sandbox, transport, db_url, clock) as pos:
        tx = pos.finalize(pos.preview("secuconnect", BASKET, customer_token=CARD).id)
        transport.armed = 2  # cancel is safe to repeat: the driver re-sends it once itself
        with pytest.raises(OutcomeUnknown):
            pos.refund(tx.id)
        transport.armed = 0  # the provider answers properly again
        assert pos.get(tx.id).state == "finalized", "garbage never commits a refund"

        assert pos.recover() == 1
        assert pos.get(tx.id).state == "refunded"
    (booking,) = sandbox.loyalty_transactions
    assert booking.reversed_at is not None, "reversed once"
    assert sandbox.card_balance(CARD) == 1000
