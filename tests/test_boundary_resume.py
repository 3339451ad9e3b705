"""Item 5: a command on a transaction in doubt resumes the pending call only if it is
exactly that call (same event, same parameters); anything else must wait."""

from __future__ import annotations

import pytest

from txengine.errors import OutcomeUnknown, TransactionInDoubt
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER, tip


def test_an_update_with_other_lines_does_not_resume_the_one_in_doubt(engine, sandbox, basket):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    sandbox.faults.inject("update", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.update(tx.id, [tip(100)])

    with pytest.raises(TransactionInDoubt):
        engine.update(tx.id, [tip(250)])  # other lines: not a retry of the pending one
    assert engine.get(tx.id).pending == "update"

    resumed = engine.update(tx.id, [tip(100)])  # the same lines: the retry
    assert [line.item.name for line in resumed.items][-1] == "Tip"
    assert resumed.gross.amount_minor == basket.gross.amount_minor + 100


def test_a_refund_with_another_comment_does_not_resume_the_one_in_doubt(engine, sandbox, basket):
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    engine.begin_payment(tx.id)
    engine.finalize(tx.id)
    sandbox.faults.inject("refund", Fault.TIMEOUT_BEFORE_COMMIT)
    with pytest.raises(OutcomeUnknown):
        engine.refund(tx.id, comment="broken glass")

    with pytest.raises(TransactionInDoubt):
        engine.refund(tx.id, comment="another reason")
    with pytest.raises(TransactionInDoubt):
        engine.refund(tx.id)
    assert engine.refund(tx.id, comment="broken glass").state == "refunded"
