"""Item 7 (part): a preview whose answer was lost names something the POS can query, and a
keyless preview exposes the key the engine generated, so it can be resumed."""

from __future__ import annotations

import pytest

from txengine.errors import OutcomeUnknown, TransactionInDoubt
from txengine.providers.sandbox import Fault

from .conftest import CUSTOMER


def test_a_lost_keyless_preview_names_a_queryable_id_and_its_generated_key(engine, sandbox, basket):
    sandbox.faults.inject("preview", Fault.TIMEOUT_AFTER_COMMIT)
    with pytest.raises(OutcomeUnknown) as lost:
        engine.preview("reference", basket, customer_token=CUSTOMER)
    key = lost.value.idempotency_key
    assert key and key.startswith("auto:")

    with pytest.raises(TransactionInDoubt, match="retry the preview with idempotency key"):
        engine.get(lost.value.tx_id)

    tx = engine.preview("reference", basket, customer_token=CUSTOMER, idempotency_key=key)
    assert tx.id == lost.value.tx_id and engine.get(tx.id).state == "previewed"
    assert len(sandbox.previews) == 1  # resumed, not previewed twice


def test_a_lost_command_names_the_key_to_retry_with(engine, sandbox, basket):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    engine.begin_payment(tx.id)
    sandbox.faults.inject("finalize", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown) as lost:
        engine.finalize(tx.id)
    assert lost.value.idempotency_key == f"auto:{tx.id}:finalize:{tx.version + 2}"
