"""A keyless command that loses a race is told it lost a race (issue #10, item 12).

The automatic key ``auto:{tx}:{event}:{version+1}`` is the same for both racers; the
store runs the version compare-and-swap before it records that key, so the loser gets
ConcurrentModification (or TransactionInDoubt), never IdempotencyConflict.
"""

import threading

import pytest

from txengine.errors import ConcurrentModification, IdempotencyConflict, TransactionInDoubt

from .conftest import CUSTOMER, tip
from .test_concurrency import hold_after_load

RACE_LOST = (ConcurrentModification, TransactionInDoubt)


@pytest.mark.parametrize("round_", range(5))
def test_two_keyless_updates_with_other_lines_racing_one_transaction(engine, basket, sandbox, round_):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    hold_after_load(engine.store, threading.Barrier(2))
    outcomes: dict[int, object] = {}

    def update(amount_minor: int) -> None:
        try:
            outcomes[amount_minor] = engine.update(tx.id, [tip(amount_minor)])
        except (*RACE_LOST, IdempotencyConflict) as lost:
            outcomes[amount_minor] = lost

    threads = [threading.Thread(target=update, args=(amount,)) for amount in (100, 200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    errors = [o for o in outcomes.values() if isinstance(o, Exception)]
    winners = [o for o in outcomes.values() if not isinstance(o, Exception)]
    assert len(winners) == 1 and len(errors) == 1, outcomes
    assert isinstance(errors[0], RACE_LOST), f"a keyless loser was told {errors[0]!r}"
    stored = engine.get(tx.id)
    assert stored.version == winners[0].version and len(stored.items) == len(tx.items) + 1
