"""Cheers: a success must prove itself (#10 item 1), and a wedged update is reconciled (#10 item 4).

The garbage matrix runs through the Engine against the sandbox: for every remote event,
each garbage answer is substituted for Cheers' real answer, either after the sandbox
really committed or without the request reaching it.  The engine must never commit on
it, and ``recover()`` must then settle the transaction where Cheers is, moving credits
once.
"""

from __future__ import annotations

import json

import httpx
import pytest

from txengine import Basket, Engine, LineItem, Money
from txengine.drivers import PreviewRequest
from txengine.errors import OutcomeUnknown, ProviderRejected
from txengine.models import Transaction
from txengine.secret import Secret
from txengine.providers.cheers import CheersDriver, CheersSandbox
from txengine.providers.cheers import driver as cheers
from txengine.providers.cheers.driver import ProviderLine, Reconciled, UpdateNotReconciled, reconcile_update
from txengine.providers.cheers.sandbox import (
    WORKED_EXAMPLE_TRANSACTION_KEY,
    WORKED_EXAMPLE_WALLET,
)

BEER_ID = "f04ce0c0-1034-40bf-a066-3e313f68c781"
WALLET = WORKED_EXAMPLE_WALLET
TIP = LineItem(None, "Tip", 1, Money(10000, "HUF"), 0)


def beers() -> Basket:
    return Basket([LineItem(BEER_ID, "Draft Beer 0.5L", 3, Money(50000, "HUF"), 27)])


class Substitute(httpx.BaseTransport):
    """Answers one call with garbage, after letting the sandbox commit it or not."""

    def __init__(self, sandbox: CheersSandbox) -> None:
        self.inner = sandbox.transport()
        self.armed: tuple[str, bool, object] | None = None
        self.committed: list[int] = []  # the sandbox's real statuses behind the garbage

    def arm(self, path_end: str, after_commit: bool, garbage) -> None:
        self.armed = (path_end, after_commit, garbage)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.armed is None or not request.url.path.endswith(self.armed[0]):
            return self.inner.handle_request(request)
        _, after_commit, garbage = self.armed
        self.armed = None
        real = None
        if after_commit:
            response = self.inner.handle_request(request)
            response.read()
            self.committed.append(response.status_code)
            real = response.json()
        status, body = garbage(real)
        return httpx.Response(status, content=body, request=request)


def fixed(body: bytes, status: int = 200):
    return lambda real: (status, body)


def mutated(change):
    def garbage(real):
        answer = json.loads(json.dumps(real))
        change(answer)
        return 200, json.dumps(answer).encode()
    return garbage


def _set(**fields):
    return lambda answer: answer.update(fields)


def _first_line(**fields):
    return lambda answer: answer["items"][0].update(fields)


def _extra_line(answer):
    answer["items"].append(dict(answer["items"][0]))
    for total, part in (("totalCredits", "credits"), ("totalDiscount", "discount"),
                        ("outstandingBalance", "outstandingBalance")):
        answer[total] = sum(line[part] for line in answer["items"])


#: Garbage whatever Cheers did: no real answer needed.
ANY_TIME = {
    "empty body": fixed(b""),
    "empty object": fixed(b"{}"),
    "error-shaped 200": fixed(b'{"status": "error", "code": "MAINTENANCE"}'),
    "truncated JSON": fixed(b'{"transactionId": "b04ce0c0-1034-40bf-a066-3e313f68c782", "totalCre'),
    "HTML": fixed(b"<html><body>Service temporarily unavailable</body></html>"),
    "huge body": fixed(b"[" + b"0," * 2_000_000 + b"0]"),
    "204 no content": fixed(b"", status=204),
}
#: Cheers' real answer, altered: only meaningful once Cheers committed.
ALTERED = {
    "number as string": mutated(lambda a: a.update(totalCredits=str(a["totalCredits"]))),
    "bool for a number": mutated(_first_line(quantity=True)),
    "another transaction's id": mutated(_set(transactionId="00000000-0000-4000-8000-000000000000")),
    "wrong total": mutated(lambda a: a.update(outstandingBalance=a["outstandingBalance"] + 1)),
    "wrong currency": mutated(_set(currencyCode="EUR")),
    "wrong line amount": mutated(_first_line(unitPrice=499)),
    "wrong line count": mutated(_extra_line),
    "line without its fields": mutated(lambda a: a["items"][0].pop("credits")),
}
CASES = [(name, False) for name in ANY_TIME] + [(name, True) for name in ANY_TIME | ALTERED]
#: A preview's answer is what names the transaction: another id cannot be told from ours.
PREVIEW_CASES = [case for case in CASES if case[0] != "another transaction's id"]


@pytest.fixture
def sandbox(clock) -> CheersSandbox:
    sandbox = CheersSandbox(clock=clock)
    sandbox.seed_worked_example()
    return sandbox


@pytest.fixture
def substitute(sandbox) -> Substitute:
    return Substitute(sandbox)


@pytest.fixture
def engine(db_url, sandbox, substitute, clock):
    driver = CheersDriver(environment="sandbox", **sandbox.credentials(), transport=substitute)
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        yield engine


def preview(engine, key: str = "sale-1"):
    return engine.preview("cheers", beers(), customer_token=WORKED_EXAMPLE_TRANSACTION_KEY, idempotency_key=key)


def ledger(sandbox) -> list[str]:
    return [entry.kind for entry in sandbox.ledger]


def _garbage(name):
    return (ANY_TIME | ALTERED)[name]


@pytest.mark.parametrize(("name", "after_commit"), PREVIEW_CASES)
def test_garbage_to_a_preview_is_never_a_quote_and_recovery_settles_once(
        engine, sandbox, substitute, name, after_commit):
    substitute.arm("/preview", after_commit, _garbage(name))
    with pytest.raises(OutcomeUnknown) as unknown:
        preview(engine)
    assert len(sandbox.transactions()) == (1 if after_commit else 0)

    tx = preview(engine)  # the POS retries under the same key (as recover() would)

    assert (tx.state, len(sandbox.transactions())) == ("previewed", 1)
    assert tx.id == unknown.value.tx_id or unknown.value.tx_id is None
    assert tx.total_credits == Money(80000, "HUF") and ledger(sandbox) == []


@pytest.mark.parametrize(("name", "after_commit"), CASES)
def test_garbage_to_an_update_is_never_stored_and_recovery_settles_it(
        engine, sandbox, substitute, name, after_commit):
    tx = preview(engine)
    substitute.arm("/update", after_commit, _garbage(name))
    with pytest.raises((OutcomeUnknown, ProviderRejected)) as failed:
        engine.update(tx.id, [TIP])
    if not isinstance(failed.value, OutcomeUnknown):  # an extra line: Cheers' basket is not ours
        assert failed.value.code == "UPDATE_BASKET_DIVERGED"
    assert len(engine.get(tx.id).items) == 1, "never the garbage's basket"
    cheers_lines = len(sandbox.transaction(tx.provider_ref).lines)
    assert cheers_lines == (2 if after_commit else 1)

    if isinstance(failed.value, OutcomeUnknown):
        assert engine.recover() == 1
    settled = engine.get(tx.id)
    assert settled.pending is None
    if after_commit:  # the re-send landed again: parked as a refusal carrying Cheers' basket
        assert (settled.state, len(settled.items)) == ("previewed", 1)
        assert engine.cancel(tx.id).state == "cancelled"
        assert sandbox.status(tx.provider_ref) == "CANCELLED"
    else:
        assert (settled.state, len(settled.items)) == ("updated", 2)
        assert engine.finalize(tx.id).state == "finalized"
    assert ledger(sandbox) == ([] if after_commit else ["finalize"])


COMMANDS = {
    # event: (reach the state it starts from, the command, final state, ledger, Cheers status)
    "finalize": (lambda e, tx: tx, lambda e, tx: e.finalize(tx.id), "finalized", ["finalize"], "FINALIZED"),
    "cancel": (lambda e, tx: tx, lambda e, tx: e.cancel(tx.id), "cancelled", [], "CANCELLED"),
    "refund": (lambda e, tx: e.finalize(tx.id), lambda e, tx: e.refund(tx.id, comment="returned"),
               "refunded", ["finalize", "refund"], "REFUNDED"),
}


@pytest.mark.parametrize(("name", "after_commit"), CASES)
@pytest.mark.parametrize("event", sorted(COMMANDS))
def test_garbage_to_a_command_is_never_a_commit_and_recovery_settles_once(
        engine, sandbox, substitute, event, name, after_commit):
    reach, command, state, expected_ledger, status = COMMANDS[event]
    tx = reach(engine, preview(engine))
    substitute.arm(f"/{event}", after_commit, _garbage(name))
    with pytest.raises(OutcomeUnknown):
        command(engine, tx)
    assert engine.get(tx.id).pending == event, "in doubt, not committed"

    assert engine.recover() == 1

    recovered = engine.get(tx.id)
    assert (recovered.state, recovered.pending) == (state, None)
    assert ledger(sandbox) == expected_ledger, "each credit movement exactly once"
    assert sandbox.status(tx.provider_ref) == status
    assert engine.recover() == 0


# --- reconciling an update Cheers may have applied more than once ---------------------------


def line(item: LineItem, credits: int = 0, discount: int = 0) -> ProviderLine:
    gross = int(item.gross.to_decimal())
    return ProviderLine(item.product_id, item.name, int(item.unit_price.to_decimal()), item.quantity,
                        credits, discount, gross - credits - discount, int(item.vat_percent))


BEER = beers().items[0]
FEE = LineItem(None, "Service fee", 1, Money(900, "HUF"), 27)
PRICED_BEER = line(BEER, credits=800, discount=600)


@pytest.mark.parametrize("times", [0, 1, 2, 3, 5])
def test_reconcile_counts_how_often_the_added_lines_were_applied(times):
    answered = (PRICED_BEER,) + (line(FEE), line(TIP)) * times
    reconciled = reconcile_update(answered, (BEER,), (FEE, TIP))
    assert reconciled == Reconciled(times, answered)
    assert reconciled.clean is (times == 1)


@pytest.mark.parametrize(
    "answered",
    [
        (PRICED_BEER, line(FEE)),  # half of the added lines
        (PRICED_BEER, line(TIP), line(FEE)),  # in another order
        (PRICED_BEER, line(FEE), line(TIP), line(FEE)),  # one and a half times
        (line(FEE), line(TIP)),  # our line is gone
        (PRICED_BEER, line(FEE, credits=9), line(TIP)),  # an added line carrying credits
        (PRICED_BEER, line(FEE, discount=9), line(TIP)),  # ...or a discount
    ],
)
def test_reconcile_reports_any_other_basket_as_diverged(answered):
    reconciled = reconcile_update(answered, (BEER,), (FEE, TIP))
    assert reconciled.times_applied is None and reconciled.provider_basket == answered


@pytest.mark.parametrize(("times", "code"), [(2, "UPDATE_APPLIED_TWICE"), (3, "UPDATE_APPLIED_REPEATEDLY"),
                                             (0, "UPDATE_BASKET_DIVERGED"), (None, "UPDATE_BASKET_DIVERGED")])
def test_an_unreconciled_update_is_a_typed_refusal_carrying_cheers_basket(times, code):
    basket = (PRICED_BEER, line(TIP), line(TIP))
    refused = UpdateNotReconciled(Reconciled(times, basket), provider="cheers")
    assert isinstance(refused, ProviderRejected) and refused.code == code
    assert refused.reconciled.provider_basket == basket
    assert "Cancel this payment" in str(refused)


def test_an_update_re_sent_twice_after_lost_answers_reports_three_applications(db_url, sandbox, clock):
    """Each blind re-send adds the lines again; the driver says how often, from Cheers' basket."""
    driver = CheersDriver(environment="sandbox", **sandbox.credentials(), transport=sandbox.transport())
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        tx = preview(engine)
        for _ in range(2):  # two sends whose answers were lost
            response = httpx.Client(transport=sandbox.transport()).post(
                f"{cheers.SANDBOX_BASE_URL}/v1/integrations/credit-transactions/{tx.provider_ref}/update",
                json={"currencyCode": "HUF", "newItems": [cheers.wire_item(TIP)]},
                headers={cheers.API_KEY_HEADER: sandbox.credentials()["api_key"]})
            assert response.status_code == 200
        with pytest.raises(UpdateNotReconciled) as refused:  # the driver's own condition...
            driver.run(driver.update(engine.get(tx.id), (TIP,), "resend"))
        assert refused.value.code == "UPDATE_APPLIED_REPEATEDLY"
        assert refused.value.reconciled.times_applied == 3
        assert len(refused.value.reconciled.provider_basket) == 4  # the beer and three tips
        with pytest.raises(ProviderRejected, match="UPDATE_APPLIED_REPEATEDLY"):  # ...through the engine
            engine.update(tx.id, [TIP])
        assert len(engine.get(tx.id).items) == 1
        assert engine.cancel(tx.id).state == "cancelled"  # the cancel answer shows Cheers' 5 lines
        assert sandbox.status(tx.provider_ref) == "CANCELLED"
        assert sandbox.wallet_balance(WALLET) == 800 and ledger(sandbox) == []


def test_a_finalize_of_a_basket_with_extra_uncredited_lines_still_commits(db_url, sandbox, clock):
    """Should the cashier finalize anyway, the committed finalize must not stay in doubt."""
    driver = CheersDriver(environment="sandbox", **sandbox.credentials(), transport=sandbox.transport())
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        tx = preview(engine)
        sandbox.transaction(tx.provider_ref).lines.append(
            {"productId": None, "name": "Tip", "unitPrice": 100, "quantity": 1, "credits": 0,
             "discount": 0, "outstandingBalance": 100, "vat": 0})
        assert engine.finalize(tx.id).state == "finalized"
        assert ledger(sandbox) == ["finalize"]


@pytest.mark.parametrize("landed", [1, 2], ids=["landed once", "landed twice"])
def test_cancel_of_a_transaction_whose_only_doubt_is_an_update_releases_it_at_cheers(
        sandbox, clock, landed):
    """The engine cancels with the snapshot before the update; Cheers answers its own basket."""
    driver = CheersDriver(environment="sandbox", **sandbox.credentials(), transport=sandbox.transport())
    request = PreviewRequest(tx_id="tx-1", basket=beers(), customer_token=Secret(WORKED_EXAMPLE_TRANSACTION_KEY),
                             payment_type="SPLIT_PAYMENT", idempotency_key="sale-1", now=clock.now())
    quote = driver.run(driver.preview(request))
    before = Transaction(id="tx-1", provider="cheers", state="previewed", items=quote.lines, currency="HUF",
                         provider_ref=quote.provider_ref, created_at=clock.now(), updated_at=clock.now())
    for _ in range(landed):  # the update's answers were lost
        try:
            driver.run(driver.update(before, (TIP,), "u"))
        except UpdateNotReconciled:
            pass
    assert len(sandbox.transaction(quote.provider_ref).lines) == 1 + landed

    outcome = driver.run(driver.cancel(before, "c"))

    assert outcome.provider_ref == quote.provider_ref
    assert sandbox.status(quote.provider_ref) == "CANCELLED"
    assert sandbox.wallet_available(WALLET) == 800 and ledger(sandbox) == []


#: A release carries the id and currency only (its payload is queued without the lines).
RELEASE_CASES = [case for case in CASES if case[0] not in ("wrong line amount", "wrong line count")]


@pytest.mark.parametrize(("name", "after_commit"), RELEASE_CASES)
def test_garbage_to_a_release_keeps_it_pending_and_redelivery_releases_once(
        db_url, clock, name, after_commit):
    """The release (a cancel of an expired preview) is a delivery: it is done only on proof."""
    # Cheers keeps the preview a little longer than the engine's deadline: the release
    # really cancels it (with equal lifetimes Cheers would answer "expired").
    sandbox = CheersSandbox(clock=clock, preview_lifetime=cheers.ASSUMED_PREVIEW_LIFETIME * 2)
    sandbox.seed_worked_example()
    substitute = Substitute(sandbox)
    driver = CheersDriver(environment="sandbox", **sandbox.credentials(), transport=substitute)
    with Engine.open(db_url, providers={"cheers": driver}, clock=clock) as engine:
        tx = preview(engine)
        clock.advance(cheers.TIMERS.preview_ttl)
        assert engine.expire_due() == 1
        substitute.arm("/cancel", after_commit, _garbage(name))
        assert engine.deliver_pending() == 0
        [release] = engine.get(tx.id).deliveries
        assert (release.kind, release.status) == ("release", "pending")
        assert sandbox.status(tx.provider_ref) == ("CANCELLED" if after_commit else "PREVIEWED")
        assert substitute.committed == ([200] if after_commit else [])

        clock.set(release.next_attempt_at)
        assert engine.deliver_pending() == 1
        assert engine.get(tx.id).deliveries[0].status != "pending"
        assert sandbox.status(tx.provider_ref) == "CANCELLED"
        assert sandbox.wallet_available(WALLET) == 800 and ledger(sandbox) == []
