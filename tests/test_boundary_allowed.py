"""Item 8: ``allowed_events`` is exactly the POS commands that would succeed now.

Every command is tried in every state, just before, at and just after the deadline that
state runs against (the preview's, then the refund window's), each on a fresh
transaction, and its real outcome is compared with what ``allowed_events`` promised.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from txengine.errors import EngineError

from .conftest import CUSTOMER, tip

POS_COMMANDS = ("update", "begin_payment", "finalize", "cancel", "refund")

#: how to reach each state from a fresh preview
PATHS = {
    "previewed": (),
    "updated": ("update",),
    "payment_pending": ("begin_payment",),
    "finalized": ("begin_payment", "finalize"),
    "cancelled": ("cancel",),
    "refunded": ("begin_payment", "finalize", "refund"),
}
MOMENTS = (None, timedelta(seconds=-1), timedelta(0), timedelta(microseconds=1), timedelta(seconds=1))


def _run(engine, tx_id: str, command: str):
    if command == "update":
        return engine.update(tx_id, [tip()])
    return getattr(engine, command)(tx_id)


@pytest.mark.parametrize("state", sorted(PATHS))
@pytest.mark.parametrize("moment", MOMENTS, ids=lambda m: "now" if m is None else f"deadline{m.total_seconds():+g}s")
def test_allowed_events_is_what_succeeds(engine, clock, basket, state, moment):
    for command in POS_COMMANDS:
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        for step in PATHS[state]:
            tx = _run(engine, tx.id, step)
        assert tx.state == state
        if moment is not None:
            deadline = tx.refund_deadline if state == "finalized" else tx.expires_at
            if deadline is None or deadline + moment < clock.now():
                continue  # no deadline runs in this state
            clock.advance(deadline + moment - clock.now())
        allowed = engine.allowed_events(tx.id)
        assert "expire" not in allowed
        try:
            _run(engine, tx.id, command)
            succeeded = True
        except EngineError:
            succeeded = False
        assert succeeded == (command in allowed), (state, moment, command, allowed)
