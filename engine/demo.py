"""``txengine demo``: a short POS session on the SQLite default, against embedded sandboxes.

Time runs on a ``FakeClock`` so the demo can show a preview expiring without waiting.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .clock import Clock, FakeClock
from .engine import Engine
from .errors import ProviderRejected, UnsupportedOperation
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


def cheers_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    from txengine.providers.cheers import sandbox as cheers

    sandbox.seed_worked_example()
    huf = lambda units: Money(units * 100, "HUF")  # noqa: E731  (Cheers speaks whole forints)
    beers = Basket([LineItem(cheers.WORKED_EXAMPLE_PRODUCT_ID, "Draft Beer 0.5L", 3, huf(500), 27)])
    wallet = cheers.WORKED_EXAMPLE_WALLET

    say.title(f"Session 4 (Cheers Loyalty): the guide's worked example; wallet {sandbox.wallet_balance(wallet)} credits")
    tx = say.step("preview", engine.preview("cheers", beers, customer_token=cheers.WORKED_EXAMPLE_TRANSACTION_KEY,
                                            idempotency_key="a7e454c6-17ab-4fee-b823-c595bf3adb4a"),
                  show_lines=True)
    tx = say.step("update", engine.update(tx.id, [LineItem(None, "Service fee", 1, huf(9), 27),
                                                  LineItem(None, "Tip", 1, huf(100), 0)]), show_lines=True)
    tx = say.step("begin_payment", engine.begin_payment(tx.id))
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    wallet now {sandbox.wallet_balance(wallet)} credits")
    tx = say.step("refund", engine.refund(tx.id, comment="Customer returned the order"))
    say.write(f"    wallet back to {sandbox.wallet_balance(wallet)} credits")

    say.title("Session 5 (Cheers Loyalty): paying all in credits, with too few; the POS falls back")
    key = sandbox.issue_transaction_key(wallet)
    try:
        engine.preview("cheers", Basket([LineItem(None, "Tasting menu", 1, huf(5000), 27)]),
                       customer_token=key, payment_type="CREDIT")
    except ProviderRejected as refused:
        say.write(f"    preview refused: {refused.code}: {refused.provider_message}")
    tx = say.step("preview", engine.preview("cheers", Basket([LineItem(None, "Tasting menu", 1, huf(5000), 27)]),
                                            customer_token=key, payment_type="EXTERNAL_PAYMENT"))
    say.step("cancel", engine.cancel(tx.id))


def rekonect_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    from txengine.providers.rekonect.sandbox import DOCS_PAYER_PHONE

    sandbox.seed_demo()
    eur = lambda minor: Money(minor, "EUR")  # noqa: E731
    breakfast = Basket([LineItem("COFFEE", "Flat white", 1, eur(350), 10),
                        LineItem("PASTRY", "Croissant", 2, eur(250), 10)])
    say.title("Session 6 (Rekonect): a member pays part with points; the purchase is submitted")
    tx = say.step("preview", engine.preview("rekonect", breakfast, customer_token=DOCS_PAYER_PHONE),
                  show_lines=True)
    tx = say.step("finalize", engine.finalize(tx.id))
    say.write(f"    guaranteed deliveries queued: {[d.kind for d in engine.deliveries(tx.id)]}")
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
    say.title("Session 8 (Forloy): a discount card, recorded at finalize; refunds are not offered")
    tx = say.step("preview", engine.preview("forloy", lunch, customer_token=card.qr_code_data), show_lines=True)
    tx = say.step("finalize", engine.finalize(tx.id))
    try:
        engine.refund(tx.id)
    except UnsupportedOperation as refused:
        say.write(f"    refund: {refused.detail}")


def secuconnect_sessions(engine: Engine, sandbox, clock: FakeClock, say: Narrator) -> None:
    from txengine.providers.secuconnect import sandbox as secu

    eur = lambda minor: Money(minor, "EUR")  # noqa: E731
    bakery = Basket([LineItem("30037", "Sandwich Romano", 1, eur(349), 7),
                     LineItem("30200", "Fruit salad, small bowl", 1, eur(249), 7),
                     LineItem("51", "Water, mildly sprinkling, 0.25 ltr.", 2, eur(99), 19)])
    say.title("Session 9 (secuconnect): the customer card covers the seed's basket; a receipt to print")
    tx = say.step("preview", engine.preview("secuconnect", bakery, customer_token=secu.DEMO_CARD_NUMBER),
                  show_lines=True)
    tx = say.step("finalize", engine.finalize(tx.id))
    say.receipt(tx)
    tx = say.step("refund", engine.refund(tx.id))
    say.receipt(tx)


def demo_pairs(clock: Clock, *, forloy_offline: bool = False) -> dict[str, tuple]:
    """Every provider's sandbox, in-process, and its driver wired to it."""
    from txengine.providers.cheers import CheersDriver, CheersSandbox
    from txengine.providers.cheers.sandbox import DEFAULT_API_KEY
    from txengine.providers.forloy.sandbox import forloy_pair
    from txengine.providers.reference import ReferenceDriver, ReferenceSandbox
    from txengine.providers.rekonect.sandbox import rekonect_pair
    from txengine.providers.secuconnect import SecuconnectDriver, SecuconnectSandbox
    from txengine.providers.secuconnect.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

    reference = ReferenceSandbox(clock)
    cheers = CheersSandbox(clock)
    secuconnect = SecuconnectSandbox(clock)
    return {
        "reference": (reference, ReferenceDriver(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=reference.transport())),
        "cheers": (cheers, CheersDriver(environment="sandbox", api_key=DEFAULT_API_KEY, transport=cheers.transport())),
        "rekonect": rekonect_pair(clock),
        "forloy": forloy_pair(clock, offline=forloy_offline),
        "secuconnect": (secuconnect, SecuconnectDriver(environment="sandbox", client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET,
                                                       clock=clock, transport=secuconnect.transport())),
    }


SESSIONS = {
    "reference": reference_sessions,
    "cheers": cheers_sessions,
    "rekonect": rekonect_sessions,
    "forloy": forloy_sessions,
    "secuconnect": secuconnect_sessions,
}


def run_sessions(engine: Engine, pairs: dict[str, tuple], clock: FakeClock, write: Callable[[str], None]) -> bool:
    """Every provider's sessions on ``engine``; True when replay rebuilds every snapshot."""
    say = Narrator(engine, write)
    for name, session in SESSIONS.items():
        session(engine, pairs[name][0], clock, say)
    ids = engine.store.transaction_ids()
    exact = all(replay(engine.store.journal(i)) == engine.store.load(i) for i in ids)
    write("")
    write(f"{len(ids)} transactions stored; journal replay rebuilds every snapshot: {'yes' if exact else 'NO'}")
    return exact


def run(db_path: str | None = None, write: Callable[[str], None] = print) -> int:
    if db_path is None:
        db_path = os.path.join(tempfile.mkdtemp(prefix="txengine-demo-"), "txengine.db")
    clock = FakeClock()
    pairs = demo_pairs(clock)
    write(f"txengine demo: a POS session on SQLite ({db_path}), time on a fake clock")
    with Engine.open(f"sqlite:///{db_path}", providers={name: pair[1] for name, pair in pairs.items()},
                     clock=clock) as engine:
        exact = run_sessions(engine, pairs, clock, write)
        write(f"inspect one: txengine show {engine.store.transaction_ids()[0]} --db {db_path}")
    return 0 if exact else 1
