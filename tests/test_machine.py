"""The lifecycle machine: every (state, event) pair, every guard boundary, and proof that the
compiled decision table agrees with the live python-statemachine class it is compiled from."""

from datetime import datetime, timedelta, timezone
from itertools import product

import pytest
from statemachine.exceptions import TransitionNotAllowed

from txengine import LineItem, Money, PricedLine, TimerPolicy, Transaction
from txengine.errors import IllegalTransition, PreviewExpired, RefundWindowClosed
from txengine.machine import (
    ACTIVE,
    EVENTS,
    STATES,
    TABLE,
    TERMINAL,
    PaymentLifecycle,
    allowed_events,
    decide,
)

NOW = datetime(2026, 1, 15, 10, 0, tzinfo=timezone.utc)
US = timedelta(microseconds=1)
POLICY = TimerPolicy(timedelta(minutes=10), timedelta(minutes=10), timedelta(hours=24))

# The contract's table (LIFECYCLE.md), written out independently of the machine.
SPEC = {
    ("new", "preview"): "previewed",
    **{(s, "update"): "updated" for s in ("previewed", "updated")},
    **{(s, "begin_payment"): "payment_pending" for s in ("previewed", "updated")},
    **{(s, "finalize"): "finalized" for s in ("previewed", "updated", "payment_pending")},
    **{(s, "cancel"): "cancelled" for s in ("previewed", "updated", "payment_pending")},
    ("finalized", "refund"): "refunded",
    **{(s, "expire"): "expired" for s in ("previewed", "updated", "payment_pending")},
}


def make_tx(state, *, expires_in=timedelta(minutes=5), refund_in=timedelta(hours=1), outstanding=100):
    item = LineItem("p", "Beer", 1, Money(1000, "EUR"), 27)
    line = PricedLine(item, Money(900 - outstanding, "EUR"), Money(100, "EUR"), Money(outstanding, "EUR"))
    return Transaction(
        id="tx_test", provider="reference", state=state, items=(line,), currency="EUR",
        expires_at=NOW + expires_in, refund_deadline=NOW + refund_in if state in ("finalized", "refunded") else None,
        version=3, created_at=NOW, updated_at=NOW,
    )


def test_the_machine_declares_the_contracts_states_and_events():
    assert set(STATES) == {"new", "previewed", "updated", "payment_pending", "finalized",
                           "cancelled", "refunded", "expired"}
    assert set(EVENTS) == {"preview", "update", "begin_payment", "finalize", "cancel", "refund", "expire"}
    assert TERMINAL == {"cancelled", "refunded", "expired"}
    assert ACTIVE == {"previewed", "updated", "payment_pending"}


def test_the_compiled_table_is_exactly_the_contracts_table():
    assert {key: rule.target for key, rule in TABLE.items()} == SPEC


@pytest.mark.parametrize("state,event", list(product(STATES, EVENTS)))
def test_every_state_event_pair(state, event):
    """Legal pairs move to the contract's target when guards pass; every other pair raises."""
    tx = None if state == "new" else make_tx(state)
    # a time at which the pair's guards hold: before every deadline, except expire's
    now = NOW + timedelta(minutes=6) if event == "expire" else NOW
    if (state, event) in SPEC:
        assert decide(tx, event, now, POLICY).target == SPEC[(state, event)]
    else:
        with pytest.raises(IllegalTransition):
            decide(tx, event, now, POLICY)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_are_sinks(state):
    tx = make_tx(state)
    for event in EVENTS:
        with pytest.raises(IllegalTransition, match="final"):
            decide(tx, event, NOW, POLICY)
    assert allowed_events(tx, NOW) == []


class TestBoundaries:
    """Deadlines are exclusive: a microsecond before is in time, the deadline itself is not."""

    @pytest.mark.parametrize("event", ["update", "begin_payment", "finalize"])
    @pytest.mark.parametrize("state", ["previewed", "updated"])
    def test_preview_deadline(self, state, event):
        tx = make_tx(state)
        assert decide(tx, event, tx.expires_at - US, POLICY)
        with pytest.raises(PreviewExpired):
            decide(tx, event, tx.expires_at, POLICY)

    def test_expire_only_at_or_after_the_deadline(self):
        tx = make_tx("payment_pending")
        with pytest.raises(IllegalTransition, match="not due"):
            decide(tx, "expire", tx.expires_at - US, POLICY)
        assert decide(tx, "expire", tx.expires_at, POLICY).target == "expired"

    def test_cancel_has_no_deadline_guard(self):
        tx = make_tx("payment_pending")
        assert decide(tx, "cancel", tx.expires_at + timedelta(days=1), POLICY).target == "cancelled"

    def test_refund_deadline(self):
        tx = make_tx("finalized")
        assert decide(tx, "refund", tx.refund_deadline - US, POLICY).target == "refunded"
        with pytest.raises(RefundWindowClosed):
            decide(tx, "refund", tx.refund_deadline, POLICY)

    def test_begin_payment_needs_something_outstanding(self):
        with pytest.raises(IllegalTransition, match="nothing is outstanding"):
            decide(make_tx("previewed", outstanding=0), "begin_payment", NOW, POLICY)


class TestTimerEffects:
    def test_preview_starts_the_clock(self):
        assert decide(None, "preview", NOW, POLICY).changes == {"expires_at": NOW + timedelta(minutes=10)}

    def test_update_extends_the_deadline_it_had(self):
        tx = make_tx("updated", expires_in=timedelta(minutes=3))
        step = decide(tx, "update", NOW, POLICY)
        assert step.changes == {"expires_at": NOW + timedelta(minutes=13)}

    def test_finalize_opens_the_refund_window(self):
        step = decide(make_tx("payment_pending"), "finalize", NOW, POLICY)
        assert step.changes == {"finalized_at": NOW, "refund_deadline": NOW + timedelta(hours=24)}


class _Model:
    def __init__(self, state):
        self.state = state


def _live(state, event, tx, now):
    """Send ``event`` to a live, strict PaymentLifecycle sitting in ``state``."""
    model = _Model(state)
    machine = PaymentLifecycle(model)
    try:
        result = machine.send(event, tx=tx, now=now, policy=POLICY)
    except TransitionNotAllowed:
        return ("refused", state)
    return ("moved", model.state, result)


def _compiled(state, event, tx, now):
    try:
        step = decide(tx, event, now, POLICY)
    except IllegalTransition:
        return ("refused", state)
    return ("moved", step.target, step.changes or None)


SCENARIOS = [
    # (label, tx factory kwargs, now)
    ("in time", {}, NOW),
    ("at the preview deadline", {}, NOW + timedelta(minutes=5)),
    ("after every deadline", {}, NOW + timedelta(days=2)),
    ("nothing outstanding", {"outstanding": 0}, NOW),
    ("at the refund deadline", {}, NOW + timedelta(hours=1)),
]


@pytest.mark.parametrize("label,kwargs,now", SCENARIOS, ids=[s[0] for s in SCENARIOS])
@pytest.mark.parametrize("state,event", list(product(STATES, EVENTS)))
def test_compiled_table_agrees_with_the_live_strict_machine(state, event, label, kwargs, now):
    tx = None if state == "new" else make_tx(state, **kwargs)
    assert _compiled(state, event, tx, now) == _live(state, event, tx, now)


def test_the_live_machine_is_strict():
    assert PaymentLifecycle.allow_event_without_transition is False
    assert PaymentLifecycle.catch_errors_as_events is False
    assert PaymentLifecycle.atomic_configuration_update is True


def test_a_failing_timer_action_leaves_the_live_machine_in_its_source_state():
    model = _Model("previewed")
    machine = PaymentLifecycle(model)
    with pytest.raises(AttributeError):  # no policy: the timer effect cannot compute
        machine.send("finalize", tx=make_tx("previewed"), now=NOW, policy=None)
    assert model.state == "previewed"
