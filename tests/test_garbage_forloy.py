"""A success must prove itself (#10 item 1): garbage in place of Forloy's record answer.

The garbage replaces the sandbox's real answer to ``POST /transactions/record``
(finalize), AFTER the sandbox really recorded the purchase or BEFORE it saw it.  Each
must end as ``OutcomeUnknown``, never a committed transition; ``engine.recover()`` then
re-sends the record under the same idempotency key and the ledger holds it once.
"""

from __future__ import annotations

import json

import httpx
import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.errors import OutcomeUnknown
from txengine.providers.forloy import ForloyDriver, ForloySandbox

COFFEE = Basket([LineItem("latte", "Latte", 2, Money.of("3.90", "EUR"), 7),
                 LineItem("cake", "Carrot cake", 1, Money.of("4.20", "EUR"), 7)])  # 12.00


def garbage(real: dict) -> dict[str, bytes]:
    data = real.get("data", {})

    def changed(**fields) -> bytes:
        return json.dumps({**real, "data": {**data, **fields}}).encode()

    text = json.dumps(real).encode()
    return {
        "empty": b"",
        "empty-object": b"{}",
        "error-envelope-200": b'{"success": false, "error": {"code": "MAINTENANCE", "message": "x"}}',
        "status-error-200": b'{"status":"error","code":"MAINTENANCE"}',
        "no-data": json.dumps({"success": True}).encode(),
        "amount-as-string": changed(purchase_amount="12.00"),
        "amount-as-bool": changed(purchase_amount=True),
        "wrong-amount": changed(purchase_amount=13.0),
        "wrong-card-type": changed(card_type="punch"),
        "no-transaction-id": changed(transaction_id=""),
        "id-as-number": changed(transaction_id=7),
        "cashback-as-string": changed(cashback_earned="1.20"),
        "truncated": text[: len(text) // 2],
        "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        "huge": b'{"padding": "' + b"x" * (4 * 1024 * 1024) + b'"}',
    }


EXAMPLE = {"success": True, "data": {"transaction_id": "txn_x", "card_type": "cashback", "purchase_amount": 12.0,
                                     "cashback_earned": 1.2, "cashback_rate": 0.1, "new_balance": 11.2}}


class Substitute(httpx.BaseTransport):
    def __init__(self, sandbox: ForloySandbox, kind: str, *, after_commit: bool) -> None:
        self.real = sandbox.transport()
        self.kind, self.after_commit = kind, after_commit
        self.armed = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not (self.armed and request.url.path.endswith("/transactions/record")):
            return self.real.handle_request(request)
        self.armed -= 1
        real = self.real.handle_request(request).json() if self.after_commit else EXAMPLE
        return httpx.Response(200, content=garbage(real)[self.kind], headers={"content-type": "application/json"})


@pytest.mark.parametrize("after_commit", [True, False], ids=["after-commit", "before-commit"])
@pytest.mark.parametrize("kind", list(garbage(EXAMPLE)))
def test_garbage_in_place_of_the_record_answer_is_unknown_and_recovered_once(clock, db_url, kind, after_commit):
    sandbox = ForloySandbox(clock)
    card = sandbox.add_cashback_card(balance="10.00", cashback_rate="0.10")
    transport = Substitute(sandbox, kind, after_commit=after_commit)
    driver = ForloyDriver(base_url=sandbox.base_url, transport=transport, clock=clock, **sandbox.credentials())
    with Engine.open(db_url, providers={"forloy": driver}, clock=clock) as pos:
        tx = pos.preview("forloy", COFFEE, customer_token=card.qr_code_data)
        transport.armed = 10  # whatever the driver re-sends inline gets garbage too
        with pytest.raises(OutcomeUnknown):
            pos.finalize(tx.id)
        transport.armed = 0
        assert pos.get(tx.id).state != "finalized", "garbage never commits"

        assert pos.recover() == 1
        assert pos.get(tx.id).state == "finalized"
    (recorded,) = [t for t in sandbox.transactions if t.pos_reference_id == tx.id]
    assert sandbox.card(card.card_instance_id).balance == Money.of("11.20", "EUR").to_decimal()
