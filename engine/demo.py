"""``txengine demo``: a short POS session on the SQLite default, against embedded sandboxes.

Time runs on a ``FakeClock`` so the demo can show a preview expiring without waiting.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .clock import FakeClock
from .engine import Engine
from .journal import replay
from .models import Basket, LineItem, Transaction
from .money import Money
from .report import lines_table, receipt_lines, step_line


class Narrator:
    def __init__(self, engine: Engine, write: Callable[[str], None] = print) -> None:
        self.engine = engine
        self.write = write

    def title(self, text: str) -> None:
        self.write("")
        self.write(text)

    def step(self, event: str, tx: Transaction, *, show_lines: bool = False) -> Transaction:
        self.write(step_line(event, tx))
        if show_lines:
            for row in lines_table(tx):
                self.write(row)
        return tx

    def receipt(self, tx: Transaction) -> None:
        if tx.receipt:
            self.write("    receipt:")
            for row in receipt_lines(tx):
                self.write(row)


def reference_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    customer = "5ccd7850844b415091071c027930101f"
    sandbox.open_wallet(customer, 800)
    sandbox.set_discount("beer", 40)
    eur = lambda minor: Money(minor, "EUR")  # noqa: E731
    beers = Basket([LineItem("beer", "Draft Beer 0.5L", 3, eur(500), 27)])

    say.title(f"Session 1 (reference): beers at the bar; wallet {eur(sandbox.balance(customer))}")
    tx = say.step("preview", engine.preview("reference", beers, customer_token=customer,
                                            idempotency_key="demo-1"), show_lines=True)
    clock.advance(minutes=4)
    tx = say.step("update", engine.update(tx.id, [LineItem(None, "Service fee", 1, eur(9), 27),
                                                  LineItem(None, "Tip", 1, eur(100), 0)]), show_lines=True)
    clock.advance(minutes=1)
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    say.write(f"    (the cashier collects {tx.outstanding} by card)")
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    deliveries sent: {engine.deliver_pending()}; wallet now {eur(sandbox.balance(customer))}")
    clock.advance(hours=2)
    tx = say.step("refund", engine.refund(tx.id, comment="Customer returned the order"))
    say.write(f"    wallet back to {eur(sandbox.balance(customer))}")

    say.title("Session 2 (reference): the customer walks away; the preview expires")
    tx = say.step("preview", engine.preview("reference", beers, customer_token=customer))
    clock.set(tx.expires_at)
    say.write(f"    expire_due() expired {engine.expire_due()} transaction(s)")
    say.step("expire", engine.get(tx.id))

    say.title("Session 3 (reference): the card is declined; the POS cancels")
    tx = say.step("preview", engine.preview("reference", beers, customer_token=customer))
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    say.write("    (card declined)")
    say.step("cancel", engine.cancel(tx.id))
    say.write(f"    wallet untouched: {eur(sandbox.balance(customer))}")


def run(db_path: str | None = None, write: Callable[[str], None] = print) -> int:
    from providers.reference import ReferenceDriver, ReferenceSandbox

    directory = None
    if db_path is None:
        directory = tempfile.mkdtemp(prefix="txengine-demo-")
        db_path = os.path.join(directory, "txengine.db")
    clock = FakeClock()
    sandbox = ReferenceSandbox(clock)
    driver = ReferenceDriver(api_key=ReferenceSandbox.api_key, transport=sandbox.transport())
    write(f"txengine demo: a POS session on SQLite ({db_path}), time on a fake clock")
    with Engine.open(f"sqlite:///{db_path}", providers={"reference": driver}, clock=clock) as engine:
        say = Narrator(engine, write)
        reference_sessions(engine, sandbox, clock, say)
        ids = engine.store.transaction_ids()
        exact = all(replay(engine.store.journal(i)) == engine.store.load(i) for i in ids)
        write("")
        write(f"{len(ids)} transactions stored; journal replay rebuilds every snapshot: {'yes' if exact else 'NO'}")
        write(f"inspect one: txengine show {ids[0]} --db {db_path}")
    return 0 if exact else 1
