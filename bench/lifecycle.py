"""A full Cheers lifecycle through the engine, against the same calls written by hand.

    python bench/lifecycle.py [--n 1500] [--chunk 25]

One lifecycle is preview, update (a tip), begin_payment, finalize, refund: four
provider calls and five durable steps, on the in-process Cheers sandbox (an httpx
``MockTransport``, so the provider costs the same for every contender).

- engine: ``Engine`` (and ``AsyncEngine``) on SQLite, WAL + synchronous=FULL.
- by hand: what a careful POS would write without txengine, with the same guarantees:
  httpx against the Cheers API, and per provider call a durable claim row committed
  before the call and one transaction (state + journal + claim removal) after it; the
  local begin_payment is one transaction.  The async one awaits ``httpx.AsyncClient``.
- no store: the four HTTP calls alone, to show what the provider itself costs.

Every contender gets its own fresh QR keys (Cheers keys are one-time) and more
transactions than the engine's snapshot cache holds, taken in a shuffled order.
Targets: engine / by hand <= 1.3, for the sync and for the async engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import tempfile
import uuid
from collections.abc import Generator

from common import durable, emit, interleave, median_ratio, per_item_ms, row

import httpx

from txengine import AsyncEngine, Basket, Engine, FakeClock, LineItem, Money
from txengine.providers.cheers import DEFAULT_API_KEY, CheersDriver, CheersSandbox

TARGET = 1.3
WALLET = "bench-wallet"
BEER = LineItem("f04ce0c0-1034-40bf-a066-3e313f68c781", "Draft Beer 0.5L", 3, Money(50000, "HUF"), 27)
TIP = LineItem(None, "Tip", 1, Money(10000, "HUF"), 0)
BASE = "https://api.dev.votesess.com"


def sandbox_with_keys(clock: FakeClock, n: int) -> tuple[CheersSandbox, list[str]]:
    sandbox = CheersSandbox(clock=clock)
    sandbox.add_wallet(WALLET, 10**9)
    return sandbox, [sandbox.issue_transaction_key(WALLET) for _ in range(n)]


# --- the engine -----------------------------------------------------------------------------------


class EngineLifecycles:
    def __init__(self, directory: str, clock: FakeClock, n: int) -> None:
        self.sandbox, self.keys = sandbox_with_keys(clock, n)
        driver = CheersDriver(api_key=DEFAULT_API_KEY, environment="sandbox", transport=self.sandbox.transport())
        self.engine = Engine.open(f"sqlite:///{directory}/engine.db", providers={"cheers": driver}, clock=clock)

    def run(self, start: int, stop: int) -> None:
        engine = self.engine
        for key in self.keys[start:stop]:
            tx = engine.preview("cheers", Basket([BEER]), customer_token=key)
            engine.update(tx.id, [TIP])
            engine.begin_payment(tx.id)
            engine.finalize(tx.id)
            engine.refund(tx.id, comment="bench")


class AsyncEngineLifecycles:
    def __init__(self, directory: str, clock: FakeClock, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.sandbox, self.keys = sandbox_with_keys(clock, n)
        driver = CheersDriver(api_key=DEFAULT_API_KEY, environment="sandbox", transport=self.sandbox.transport())
        self.engine = AsyncEngine.open(f"sqlite:///{directory}/async.db", providers={"cheers": driver}, clock=clock)
        self.loop = loop

    async def lifecycles(self, keys: list[str]) -> None:
        engine = self.engine
        for key in keys:
            tx = await engine.preview("cheers", Basket([BEER]), customer_token=key)
            await engine.update(tx.id, [TIP])
            await engine.begin_payment(tx.id)
            await engine.finalize(tx.id)
            await engine.refund(tx.id, comment="bench")

    def run(self, start: int, stop: int) -> None:
        self.loop.run_until_complete(self.lifecycles(self.keys[start:stop]))


# --- by hand ---------------------------------------------------------------------------------------


SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL,
    provider_ref TEXT, snapshot TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal (tx_id TEXT NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (tx_id, seq));
CREATE TABLE IF NOT EXISTS claims (tx_id TEXT PRIMARY KEY, event TEXT NOT NULL, idempotency_key TEXT NOT NULL);
"""


def wire(item: LineItem) -> dict[str, object]:
    return {"productId": item.product_id, "quantity": item.quantity, "unitPrice": item.unit_price.amount_minor // 100,
            "name": item.name, "vat": int(item.vat_percent)}


class ByHand:
    """The Cheers calls with httpx and the guarantees with sqlite3, no engine."""

    def __init__(self, directory: str, clock: FakeClock, n: int, name: str) -> None:
        self.sandbox, self.keys = sandbox_with_keys(clock, n)
        self.db = durable(sqlite3.connect(f"{directory}/{name}.db", isolation_level=None, check_same_thread=False))
        self.db.executescript(SCHEMA)
        self.headers = {"X-API-Key": DEFAULT_API_KEY, "Content-Type": "application/json"}

    def answer(self, response: httpx.Response) -> dict[str, object]:
        if response.status_code != 200:
            raise RuntimeError(f"Cheers answered {response.status_code}")
        body = response.json()
        if not isinstance(body, dict) or not isinstance(body.get("transactionId"), str):
            raise RuntimeError("not a Cheers transaction")
        return body

    def claim(self, tx_id: str, event: str, version: int) -> str:
        key = f"{tx_id}:{event}:{version}"
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO claims VALUES (?, ?, ?)", (tx_id, event, key))
        self.db.execute("COMMIT")
        return key

    def settle(self, tx_id: str, event: str, state: str, version: int, answer: dict[str, object]) -> None:
        data = json.dumps(answer)
        self.db.execute("BEGIN IMMEDIATE")
        changed = self.db.execute("UPDATE payments SET state = ?, version = ?, snapshot = ? WHERE id = ? AND version = ?",
                                  (state, version + 1, data, tx_id, version)).rowcount
        if changed != 1:
            raise RuntimeError("lost a race")
        self.db.execute("INSERT INTO journal VALUES (?, ?, ?, ?)", (tx_id, version + 1, event, data))
        self.db.execute("DELETE FROM claims WHERE tx_id = ?", (tx_id,))
        self.db.execute("COMMIT")

    def requests(self, key: str, ref: str | None, event: str) -> httpx.Request:
        if event == "preview":
            body = {"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF", "items": [wire(BEER)]}
            return httpx.Request("POST", f"{BASE}/v3/integrations/credit-transactions/preview", json=body,
                                 headers={**self.headers, "X-Transaction-Key": key, "X-Idempotency-Key": key})
        paths = {"update": "/v1/integrations/credit-transactions/{}/update",
                 "finalize": "/v3/integrations/credit-transactions/{}/finalize",
                 "refund": "/v1/integrations/credit-transactions/{}/refund"}
        bodies = {"update": {"currencyCode": "HUF", "newItems": [wire(TIP)]}, "finalize": None,
                  "refund": {"comment": "bench"}}
        return httpx.Request("POST", BASE + paths[event].format(ref), json=bodies[event], headers=self.headers)

    def preview_row(self, tx_id: str, answer: dict[str, object]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO payments VALUES (?, 'previewed', 1, ?, ?)",
                        (tx_id, answer["transactionId"], json.dumps(answer)))
        self.db.execute("INSERT INTO journal VALUES (?, 1, 'preview', ?)", (tx_id, json.dumps(answer)))
        self.db.execute("DELETE FROM claims WHERE tx_id = ?", (tx_id,))
        self.db.execute("COMMIT")

    def begin_payment(self, tx_id: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("UPDATE payments SET state = 'payment_pending', version = 3 WHERE id = ? AND version = 2",
                        (tx_id,))
        self.db.execute("INSERT INTO journal VALUES (?, 3, 'begin_payment', '{}')", (tx_id,))
        self.db.execute("COMMIT")


    def lifecycle(self, key: str) -> Generator[httpx.Request, httpx.Response, None]:
        """One lifecycle, sans-IO: yields each request, gets its response; claims and settles durably."""
        tx_id = uuid.uuid4().hex
        self.claim(tx_id, "preview", 0)
        answer = self.answer((yield self.requests(key, None, "preview")))
        self.preview_row(tx_id, answer)
        ref = answer["transactionId"]
        for event, state, version in (("update", "updated", 1), ("finalize", "finalized", 3),
                                      ("refund", "refunded", 4)):
            if event == "finalize":
                self.begin_payment(tx_id)
            self.claim(tx_id, event, version)
            answer = self.answer((yield self.requests(key, str(ref), event)))
            self.settle(tx_id, event, state, version, answer)


def drive(steps: Generator[httpx.Request, httpx.Response, None], client: httpx.Client) -> None:
    try:
        request = next(steps)
        while True:
            request = steps.send(client.send(request))
    except StopIteration:
        pass


async def adrive(steps: Generator[httpx.Request, httpx.Response, None], client: httpx.AsyncClient) -> None:
    try:
        request = next(steps)
        while True:
            request = steps.send(await client.send(request))
    except StopIteration:
        pass


class SyncByHand(ByHand):
    def __init__(self, directory: str, clock: FakeClock, n: int) -> None:
        super().__init__(directory, clock, n, "by-hand")
        self.client = httpx.Client(transport=self.sandbox.transport())

    def run(self, start: int, stop: int) -> None:
        for key in self.keys[start:stop]:
            drive(self.lifecycle(key), self.client)


class AsyncByHand(ByHand):
    def __init__(self, directory: str, clock: FakeClock, n: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(directory, clock, n, "async-by-hand")
        self.client = httpx.AsyncClient(transport=self.sandbox.transport())
        self.loop = loop

    async def lifecycles(self, keys: list[str]) -> None:
        for key in keys:
            await adrive(self.lifecycle(key), self.client)

    def run(self, start: int, stop: int) -> None:
        self.loop.run_until_complete(self.lifecycles(self.keys[start:stop]))


class CallsAlone(SyncByHand):
    """The four HTTP calls and nothing else."""

    def run(self, start: int, stop: int) -> None:
        for key in self.keys[start:stop]:
            ref = self.answer(self.client.send(self.requests(key, None, "preview")))["transactionId"]
            for event in ("update", "finalize", "refund"):
                self.answer(self.client.send(self.requests(key, str(ref), event)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000, help="lifecycles per contender, each on a new transaction, in shuffled key order")
    parser.add_argument("--chunk", type=int, default=25, help="lifecycles per timed slice")
    args = parser.parse_args()
    random.seed(7)
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as directory:
        clock = FakeClock()
        contenders = {
            "engine": EngineLifecycles(directory, clock, args.n),
            "by hand": SyncByHand(directory, clock, args.n),
            "async engine": AsyncEngineLifecycles(directory, clock, args.n, loop),
            "async by hand": AsyncByHand(directory, clock, args.n, loop),
            "calls alone": CallsAlone(os.path.join(directory), clock, args.n),
        }
        for contender in contenders.values():
            random.shuffle(contender.keys)
        print(f"a full Cheers lifecycle, {args.n} per contender, interleaved slices of {args.chunk}:")
        slices = interleave({name: c.run for name, c in contenders.items()}, args.n, args.chunk)
        for name in contenders:
            print(f"  {name:<14} {per_item_ms(slices, name, args.n):7.2f} ms per lifecycle")
    loop.close()
    sync, asynchronous = median_ratio(slices, "engine", "by hand"), median_ratio(slices, "async engine", "async by hand")
    emit([
        row("lifecycle", "Cheers lifecycle: Engine / httpx + sqlite3 by hand", sync, f"<= {TARGET}", sync <= TARGET,
            f"{per_item_ms(slices, 'engine', args.n):.2f} vs {per_item_ms(slices, 'by hand', args.n):.2f} ms"),
        row("lifecycle", "Cheers lifecycle: AsyncEngine / httpx.AsyncClient by hand", asynchronous, f"<= {TARGET}",
            asynchronous <= TARGET,
            f"{per_item_ms(slices, 'async engine', args.n):.2f} vs {per_item_ms(slices, 'async by hand', args.n):.2f} ms"),
        row("lifecycle", "the provider calls alone / by hand (for scale)",
            median_ratio(slices, "calls alone", "by hand"), "-", None,
            f"{per_item_ms(slices, 'calls alone', args.n):.2f} ms"),
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
