"""``txengine list`` filters and pages in the database (``Store.find_transactions``):
the same transactions, in the same order, as reading every one and filtering by hand,
on both stores, without reading the rows off the page."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from txengine.app.cli import cli
from txengine.errors import OutcomeUnknown
from txengine.store.base import Listing
from txengine.testing.sandbox import Fault

from .conftest import tip

ACTIVE = ("previewed", "updated", "payment_pending")


@pytest.fixture
def mixed(engine, sandbox, basket, clock):
    """A transaction in every state, one in doubt, created a minute apart; the clock then
    stands where some previews are due and others are not."""
    made = []

    def preview():
        clock.advance(timedelta(minutes=1))
        made.append(engine.preview("reference", basket))
        return made[-1].id

    preview()
    engine.update(preview(), basket.items + (tip(),))
    engine.begin_payment(preview())
    engine.finalize(preview())
    engine.cancel(preview())
    engine.refund(engine.finalize(preview()).id)
    expired = preview()
    doubtful = preview()
    sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(doubtful)
    clock.advance(timedelta(minutes=10))
    engine.expire_due()
    preview()
    preview()  # two fresh previews, not yet due
    assert engine.get(expired).state == "expired" and engine.get(doubtful).pending == "finalize"
    return [tx.id for tx in made]


def by_hand(engine, listing: Listing) -> tuple[int, list[str]]:
    """The oracle: every transaction read, filtered and sorted in Python."""
    found = []
    for tx_id in engine.store.transaction_ids():
        tx = engine.store.load(tx_id)
        if listing.states and tx.state not in listing.states:
            continue
        if listing.provider is not None and tx.provider != listing.provider:
            continue
        if listing.in_doubt and tx.pending is None:
            continue
        if listing.expiring_before is not None and not (
                tx.state in ACTIVE and tx.pending is None and tx.expires_at < listing.expiring_before):
            continue
        found.append(tx)
    found.sort(key=lambda tx: (tx.updated_at, tx.id), reverse=True)
    return len(found), [tx.id for tx in found[listing.offset:listing.offset + listing.limit]]


@pytest.mark.parametrize("ask", [
    {}, {"limit": 3}, {"limit": 3, "offset": 3}, {"limit": 4, "offset": 8}, {"offset": 50},
    {"states": ("previewed",)}, {"states": ("finalized", "refunded")}, {"provider": "reference"},
    {"provider": "cheers"}, {"in_doubt": True}, {"expiring_before": "now"}, {"expiring_before": "later"},
    {"states": ("previewed", "expired"), "limit": 2, "offset": 1},
], ids=repr)
def test_the_database_finds_what_reading_every_row_finds(engine, mixed, clock, ask):
    times = {"now": clock.now(), "later": clock.now() + timedelta(hours=1)}
    if "expiring_before" in ask:
        ask = {**ask, "expiring_before": times[ask["expiring_before"]]}
    listing = Listing(**ask)
    assert engine.store.find_transactions(listing) == by_hand(engine, listing)


def test_txengine_list_pages_through_every_transaction_once_newest_first(engine, mixed, db_url):
    pages = [json.loads(CliRunner().invoke(cli, ["list", "--db", db_url, "--json", "--limit", "4",
                                                 "--page", str(page)]).output) for page in (1, 2, 3, 4)]
    assert [page["total"] for page in pages] == [len(mixed)] * 4
    listed = [tx["id"] for page in pages for tx in page["transactions"]]
    assert sorted(listed) == sorted(mixed) and len(listed) == len(mixed)
    assert listed == by_hand(engine, Listing(limit=100))[1]  # newest first, each once


def test_a_listing_page_must_be_a_page(engine):
    with pytest.raises(ValueError):
        Listing(limit=0)
    with pytest.raises(ValueError):
        Listing(offset=-1)
