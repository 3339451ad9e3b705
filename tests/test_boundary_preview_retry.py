"""Item 6: a preview retried after a lost answer keeps the first attempt's time for its
deadlines: the provider's clock started then, not at the retry."""

from __future__ import annotations

from datetime import timedelta

import pytest

from txengine.errors import OutcomeUnknown
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER


def test_a_retried_preview_keeps_the_first_attempts_deadline(engine, sandbox, clock, basket):
    first_attempt = clock.now()
    sandbox.faults.inject("preview", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="till-7:sale-1")

    clock.advance(minutes=3)
    tx = engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key="till-7:sale-1")

    ttl = engine.core.capabilities["reference"].timers.preview_ttl
    assert tx.expires_at == first_attempt + ttl
    clock.advance(tx.expires_at - clock.now())
    assert engine.allowed_events(tx.id) == []  # the provider's preview is over too
