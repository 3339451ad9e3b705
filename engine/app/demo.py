"""``txengine demo``: a short POS session on the SQLite default, against embedded sandboxes.

Time runs on a ``FakeClock`` so the demo can show a preview expiring without waiting.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable

import click

from ..clock import FakeClock
from ..engine import Engine
from ..errors import ProviderRejected, UnsupportedOperation
from ..journal import replay
from ..models import Basket, LineItem, Transaction
from ..money import Money
from ..report import lines_table, receipt_lines, shorten, step_line
from .wiring import demo_pairs

#: Providers whose API counts whole units (Cheers: forints): their amounts show no decimals.
WHOLE_UNITS = frozenset({"cheers"})

#: A colour per state, for a terminal (click drops the colour when the output is piped).
STATE_COLOURS = {"previewed": "cyan", "updated": "cyan", "payment_pending": "yellow",
                 "finalized": "green", "refunded": "magenta", "cancelled": "red", "expired": "red"}


def coloured(line: str, tx: Transaction) -> str:
    colour = STATE_COLOURS.get(tx.state)
    return line.replace(f" {tx.state} ", f" {click.style(tx.state, fg=colour, bold=True)} ", 1) if colour else line


class Narrator:
    """Writes the session as it happens: one line per transition, at most 80 columns."""

    def __init__(self, engine: Engine, write: Callable[[str], None] = print, *, colour: bool = False) -> None:
        self.engine = engine
        self.write = write
        self.colour = colour
        # the sessions fix their idempotency keys; a run's own id keeps them fresh when the
        # demo runs again on the same database (each run's sandboxes are new)
        self.run_id = uuid.uuid4().hex[:12]

    def title(self, text: str) -> None:
        self.write("")
        self.write(click.style(shorten(text, 79), bold=True) if self.colour else shorten(text, 79))

    def step(self, event: str, tx: Transaction, *, show_lines: bool = False) -> Transaction:
        whole = tx.provider in WHOLE_UNITS
        line = step_line(event, tx, whole_units=whole)
        self.write(coloured(line, tx) if self.colour else line)
        if show_lines:
            for row in lines_table(tx, whole_units=whole):
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
                                            idempotency_key=f"demo-1-{say.run_id}"), show_lines=True)
    clock.advance(minutes=4)
    tx = say.step("update", engine.update(tx.id, [LineItem(None, "Service fee", 1, eur(9), 27),
                                                  LineItem(None, "Tip", 1, eur(100), 0)]), show_lines=True)
    clock.advance(minutes=1)
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    say.write(f"    (the cashier collects {tx.outstanding} by card)")
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    deliveries sent: {engine.deliver_pending()}")
    say.write(f"    wallet now {eur(sandbox.balance(customer))}")
    clock.advance(hours=2)
    tx = say.step("refund", engine.refund(tx.id, comment="Customer returned the order"))
    say.write(f"    wallet back to {eur(sandbox.balance(customer))}")

    say.title("Session 2 (reference): the customer walks away; the preview expires")
    tx = say.step("preview", engine.preview("reference", beers, customer_token=customer))
    assert tx.expires_at is not None  # a preview always has its deadline
    clock.set(tx.expires_at)
    say.write(f"    expire_due() expired {engine.expire_due()} transaction(s)")
    say.step("expire", engine.get(tx.id))

    say.title("Session 3 (reference): the card is declined; the POS cancels")
    tx = say.step("preview", engine.preview("reference", beers, customer_token=customer))
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    say.write("    (card declined)")
    say.step("cancel", engine.cancel(tx.id))
    say.write(f"    wallet untouched: {eur(sandbox.balance(customer))}")


def cheers_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    from txengine.providers.cheers import sandbox as cheers

    sandbox.seed_worked_example()
    huf = lambda units: Money(units * 100, "HUF")  # noqa: E731  (Cheers speaks whole forints)
    beers = Basket([LineItem(cheers.WORKED_EXAMPLE_PRODUCT_ID, "Draft Beer 0.5L", 3, huf(500), 27)])
    wallet = cheers.WORKED_EXAMPLE_WALLET

    say.title(f"Session 4 (Cheers): the guide's worked example; wallet {sandbox.wallet_balance(wallet)} credits")
    tx = say.step("preview", engine.preview("cheers", beers, customer_token=cheers.WORKED_EXAMPLE_TRANSACTION_KEY,
                                            idempotency_key=f"demo-4-{say.run_id}"),
                  show_lines=True)
    tx = say.step("update", engine.update(tx.id, [LineItem(None, "Service fee", 1, huf(9), 27),
                                                  LineItem(None, "Tip", 1, huf(100), 0)]), show_lines=True)
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    wallet now {sandbox.wallet_balance(wallet)} credits")
    tx = say.step("refund", engine.refund(tx.id, comment="Customer returned the order"))
    say.write(f"    wallet back to {sandbox.wallet_balance(wallet)} credits")

    say.title("Session 5 (Cheers): all in credits, with too few; the POS falls back")
    key = sandbox.issue_transaction_key(wallet)
    try:
        engine.preview("cheers", Basket([LineItem(None, "Tasting menu", 1, huf(5000), 27)]),
                       customer_token=key, payment_type="CREDIT")
    except ProviderRejected as refused:
        say.write(f"    preview refused: {refused.code}")
        say.write(shorten(f"      {refused.provider_message}", 79))
    tx = say.step("preview", engine.preview("cheers", Basket([LineItem(None, "Tasting menu", 1, huf(5000), 27)]),
                                            customer_token=key, payment_type="EXTERNAL_PAYMENT"))
    say.step("cancel", engine.cancel(tx.id))


def rekonect_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    from txengine.providers.rekonect.sandbox import DOCS_PAYER_PHONE

    sandbox.seed_demo()
    eur = lambda minor: Money(minor, "EUR")  # noqa: E731
    breakfast = Basket([LineItem("COFFEE", "Flat white", 1, eur(350), 10),
                        LineItem("PASTRY", "Croissant", 2, eur(250), 10)])
    say.title("Session 6 (Rekonect): a member pays part with points; submitted")
    tx = say.step("preview", engine.preview("rekonect", breakfast, customer_token=DOCS_PAYER_PHONE),
                  show_lines=True)
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    deliveries queued: {', '.join(d.kind for d in engine.deliveries(tx.id))}")
    say.write(f"    delivered now: {engine.deliver_pending()}")
    say.title("Session 7 (Rekonect): a walk-in customer, no membership: submitted all the same")
    tx = say.step("preview", engine.preview("rekonect", breakfast))
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    delivered now: {engine.deliver_pending()}")


def forloy_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    eur = lambda amount: Money.of(amount, "EUR")  # noqa: E731
    card = sandbox.add_discount_card(discount_rate="0.10")
    lunch = Basket([LineItem("latte", "Latte", 2, eur("3.90"), 7), LineItem("cake", "Carrot cake", 1, eur("4.20"), 7)])
    say.title("Session 8 (Forloy): a discount card, recorded at finalize; no refunds")
    tx = say.step("preview", engine.preview("forloy", lunch, customer_token=card.qr_code_data), show_lines=True)
    tx = say.step("finalize", engine.finalize(tx.id))
    try:
        engine.refund(tx.id)
    except UnsupportedOperation as refused:
        say.write(shorten(f"    refund: {refused.detail}", 79))


def secuconnect_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    from txengine.providers.secuconnect import sandbox as secu

    eur = lambda minor: Money(minor, "EUR")  # noqa: E731
    bakery = Basket([LineItem("30037", "Sandwich Romano", 1, eur(349), 7),
                     LineItem("30200", "Fruit salad, small bowl", 1, eur(249), 7),
                     LineItem("51", "Water, mildly sprinkling, 0.25 ltr.", 2, eur(99), 19)])
    say.title("Session 9 (secuconnect): a customer card pays it all; a receipt to print")
    tx = say.step("preview", engine.preview("secuconnect", bakery, customer_token=secu.DEMO_CARD_NUMBER),
                  show_lines=True)
    tx = say.step("finalize", engine.finalize(tx.id))
    say.receipt(tx)
    tx = say.step("refund", engine.refund(tx.id))
    say.receipt(tx)


SESSIONS = {
    "reference": reference_sessions,
    "cheers": cheers_sessions,
    "rekonect": rekonect_sessions,
    "forloy": forloy_sessions,
    "secuconnect": secuconnect_sessions,
}


def run_sessions(engine: Engine, pairs: dict[str, tuple], clock: FakeClock, write: Callable[[str], None],
                 *, colour: bool = False, known: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
    """Every provider's sessions on ``engine``; True when replay rebuilds every snapshot."""
    say = Narrator(engine, write, colour=colour)
    for name, session in SESSIONS.items():
        session(engine, pairs[name][0], clock, say)
    ids = [tx_id for tx_id in engine.store.transaction_ids() if tx_id not in known]
    exact = all(replay(engine.store.journal(i)) == engine.store.load(i) for i in ids)
    write("")
    write(f"{len(ids)} transactions stored; replaying each journal rebuilds its snapshot: {'yes' if exact else 'NO'}")
    return exact


def run(db_path: str | None = None, write: Callable[[str], None] = print, *, colour: bool = False) -> int:
    """The demo on ``db_path`` (kept), or on a temporary database removed afterwards.

    Run twice on one database it works as well: its sandboxes are new each run, so the
    idempotency keys it fixes are salted with the run's start so they stay fresh."""
    if db_path is not None:
        return _run(db_path, write, colour, keep=True)
    with tempfile.TemporaryDirectory(prefix="txengine-demo-") as directory:
        return _run(os.path.join(directory, "txengine.db"), write, colour, keep=False)


def _run(db_path: str, write: Callable[[str], None], colour: bool, *, keep: bool) -> int:
    clock = FakeClock()
    pairs = demo_pairs(clock)
    write("txengine demo: POS sessions on SQLite, time on a fake clock")
    write(f"database: {db_path}")
    if not keep:
        write("(a temporary one, removed at the end: keep one with --db FILE)")
    with Engine.open(f"sqlite:///{db_path}", providers={name: pair[1] for name, pair in pairs.items()},
                     clock=clock) as engine:
        known = set(engine.store.transaction_ids())
        exact = run_sessions(engine, pairs, clock, write, colour=colour, known=known)
        if keep:
            write(f"inspect one: txengine show {sorted(set(engine.store.transaction_ids()) - known)[0]} --db {db_path}")
    return 0 if exact else 1
