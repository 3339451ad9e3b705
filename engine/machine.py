"""The payment lifecycle: every state, event, guard and timer rule, in this one file.

Theory of operation
===================

A loyalty payment at the till is a small state machine::

    new --preview--> previewed --update--> updated --begin_payment--> payment_pending
                         |  \\________________|______________________/      |
                         |             finalize / cancel / expire          |
                         v                                                 v
                     finalized --refund--> refunded         cancelled    expired

``PaymentLifecycle`` below declares it once, with python-statemachine.  That class is
the single source of truth: the engine's decisions, ``allowed_events()``, the diagrams
in ``diagrams/`` and the property suites are all derived from it.

Each transition names its **guard** (``cond=``, a pure predicate of the transaction
snapshot and the time) and its **timer effect** (``on=``, a pure function returning
the deadlines it sets).  Both are plain functions in this file, next to the table.
Each guard also names the error a caller gets when it fails, so a refused refund says
``RefundWindowClosed`` rather than a generic "not allowed".  The **side effect** of an
event is not the machine's business: the transaction's provider driver has a method of
the same name (``driver.finalize``), and declares which events it supports.

Deadlines are exclusive: at exactly ``expires_at`` the preview is over, at exactly
``refund_deadline`` refunds are closed.  Expiry is both lazy and active: before any
command, the engine asks the table whether ``expire`` is enabled (its guard is "the
deadline has passed"), and if so persists that transition first and raises
``PreviewExpired``; ``engine.expire_due()`` does the same for every overdue row.

States and events as values
---------------------------
``TxState`` and ``TxEvent`` name the class's states and events as ``StrEnum`` members,
so a POS gets ``tx.state`` as a type its checker knows and still compares it with
``"finalized"``.  They are spelled out (a type checker cannot read members made at run
time) and checked against the class at import: a state or event added to
``PaymentLifecycle`` but not to its enum, or the other way round, fails the import.

Why a compiled table
--------------------
Running a python-statemachine instance costs about 140 microseconds per ``send`` and
250 to build, here.  A durable SQLite commit costs about 200.  Paying the machine's
interpreter on every command would double the cost of a transition for no added
safety, so at import time we compile the class into ``TABLE``: a dict from
``(state, event)`` to a ``Rule`` holding the very guard and effect functions the class
names.  The class stays the declaration; ``tests/test_machine.py`` checks that the
compiled table and the live strict machine (illegal events raise, action errors
propagate, atomic configuration updates) agree on every state, event and guard
outcome.  Decisions are then a dict lookup and a few comparisons: pure code, shared by
the sync and async engines, with no I/O.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import attrs
from statemachine import State, StateChart

from .errors import IllegalTransition, PreviewExpired, RefundWindowClosed, ValidationError

if TYPE_CHECKING:  # models reads TxState at run time: importing it back would be a cycle
    from .models import Transaction, TransactionHead

    #: what the machine judges: a whole snapshot, or a head (the columns: state, version,
    #: deadlines), on which the engine decides an expiry without reading the body
    Judged: TypeAlias = Transaction | TransactionHead


def _positive(instance: Any, attribute: attrs.Attribute[timedelta], value: timedelta) -> None:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ValidationError(f"{attribute.name} must be a positive timedelta")


@attrs.frozen
class TimerPolicy:
    """A provider's deadlines: declared by its driver, overridable by the POS."""

    preview_ttl: timedelta = attrs.field(default=timedelta(minutes=10), validator=_positive)
    update_extension: timedelta = attrs.field(
        default=timedelta(minutes=10), validator=_positive
    )
    refund_window: timedelta = attrs.field(default=timedelta(hours=24), validator=_positive)


# --- Guards -------------------------------------------------------------------------
# Each guard is a pure predicate; ``refusal`` builds the error its failure means.


#: a guard's refusal: called with what the guard judged (a guard on the balance only
#: ever judges a whole snapshot)
Refusal = Callable[[Any, str, datetime], Exception]
Predicate = TypeVar("Predicate", bound=Callable[..., bool])


def guard(refusal: Refusal) -> Callable[[Predicate], Predicate]:
    """Mark a guard with the error its failure means (``_Call`` reads it back)."""

    def mark(predicate: Predicate) -> Predicate:
        setattr(predicate, "refusal", refusal)
        return predicate

    return mark


def _context(tx: Judged, event: str) -> dict[str, str]:
    return {"tx_id": tx.id, "state": tx.state, "event": event}


def _iso(deadline: datetime | None) -> str:
    return deadline.isoformat() if deadline is not None else "(none)"


def _preview_over(tx: Judged, event: str, now: datetime) -> Exception:
    return PreviewExpired(
        f"the preview expired at {_iso(tx.expires_at)} (now {now.isoformat()})",
        expires_at=tx.expires_at,
        **_context(tx, event),
    )


def _nothing_outstanding(tx: Transaction, event: str, now: datetime) -> Exception:
    return IllegalTransition(
        f"nothing is outstanding ({tx.outstanding}); finalize directly",
        **_context(tx, event),
    )


def _refund_window_closed(tx: Judged, event: str, now: datetime) -> Exception:
    return RefundWindowClosed(
        f"refunds closed at {_iso(tx.refund_deadline)} (now {now.isoformat()})",
        refund_deadline=tx.refund_deadline,
        **_context(tx, event),
    )


def _not_yet_due(tx: Judged, event: str, now: datetime) -> Exception:
    return IllegalTransition(
        f"the preview runs until {_iso(tx.expires_at)}; it is not due",
        **_context(tx, event),
    )


# --- The machine ----------------------------------------------------------------------


class PaymentLifecycle(StateChart[Any]):
    """The canonical lifecycle every provider maps onto."""

    allow_event_without_transition = False  # an illegal event raises
    catch_errors_as_events = False  # a failing guard or action propagates
    atomic_configuration_update = True  # an action error never leaves us in the target

    # ``new`` is the origin of ``preview`` only: no stored transaction is ever in it.
    new = State("new", initial=True)
    previewed = State("previewed")
    updated = State("updated")
    payment_pending = State("payment_pending")
    finalized = State("finalized")
    cancelled = State("cancelled", final=True)
    refunded = State("refunded", final=True)
    expired = State("expired", final=True)

    # event          from                  to                 guard (cond)           timer (on)
    preview = (
        new.to(previewed,                                                          on="start_preview_clock")
    )
    update = (
        previewed.to(updated,              cond="before_preview_deadline",         on="extend_preview")
        | updated.to(updated,              cond="before_preview_deadline",         on="extend_preview")
    )
    begin_payment = (
        previewed.to(payment_pending,      cond=["before_preview_deadline", "has_outstanding"])
        | updated.to(payment_pending,      cond=["before_preview_deadline", "has_outstanding"])
    )
    finalize = (
        previewed.to(finalized,            cond="before_preview_deadline",         on="open_refund_window")
        | updated.to(finalized,            cond="before_preview_deadline",         on="open_refund_window")
        | payment_pending.to(finalized,    cond="before_preview_deadline",         on="open_refund_window")
    )
    cancel = (
        previewed.to(cancelled)
        | updated.to(cancelled)
        | payment_pending.to(cancelled)
    )
    refund = (
        finalized.to(refunded,             cond="before_refund_deadline")
    )
    expire = (
        previewed.to(expired,              cond="preview_deadline_passed")
        | updated.to(expired,              cond="preview_deadline_passed")
        | payment_pending.to(expired,      cond="preview_deadline_passed")
    )

    # --- guards: pure predicates of (tx, now) ---

    # A missing deadline counts as passed for the money-moving events and as never due for
    # ``expire``; no stored transaction in these states lacks one.

    @staticmethod
    @guard(refusal=_preview_over)
    def before_preview_deadline(tx: Transaction, now: datetime) -> bool:
        return tx.expires_at is not None and now < tx.expires_at

    @staticmethod
    @guard(refusal=_nothing_outstanding)
    def has_outstanding(tx: Transaction) -> bool:
        return tx.outstanding.amount_minor > 0

    @staticmethod
    @guard(refusal=_refund_window_closed)
    def before_refund_deadline(tx: Transaction, now: datetime) -> bool:
        return tx.refund_deadline is not None and now < tx.refund_deadline

    @staticmethod
    @guard(refusal=_not_yet_due)
    def preview_deadline_passed(tx: Transaction, now: datetime) -> bool:
        return tx.expires_at is not None and now >= tx.expires_at

    # --- timer effects: pure functions returning the deadlines they set ---

    @staticmethod
    def start_preview_clock(now: datetime, policy: TimerPolicy) -> dict[str, Any]:
        return {"expires_at": now + policy.preview_ttl}

    @staticmethod
    def extend_preview(tx: Transaction, policy: TimerPolicy) -> dict[str, Any]:
        if tx.expires_at is None:  # unreachable from a stored previewed/updated snapshot
            raise ValueError(f"transaction {tx.id} has no preview deadline to extend")
        return {"expires_at": tx.expires_at + policy.update_extension}

    @staticmethod
    def open_refund_window(now: datetime, policy: TimerPolicy) -> dict[str, Any]:
        return {"finalized_at": now, "refund_deadline": now + policy.refund_window}


# --- States and events as values -------------------------------------------------------


class _Name(StrEnum):
    """A lifecycle name: equal to, hashed, formatted and repr'd as its plain string, so
    messages, logs and snapshot reprs read exactly as they did with strings."""

    def __repr__(self) -> str:
        return repr(self.value)


class TxState(_Name):
    """A transaction's state (``tx.state``); each member equals its name as a string."""

    new = "new"
    previewed = "previewed"
    updated = "updated"
    payment_pending = "payment_pending"
    finalized = "finalized"
    cancelled = "cancelled"
    refunded = "refunded"
    expired = "expired"


class TxEvent(_Name):
    """A lifecycle event (a POS command, or the engine's ``expire``); equal to its name."""

    preview = "preview"
    update = "update"
    begin_payment = "begin_payment"
    finalize = "finalize"
    cancel = "cancel"
    refund = "refund"
    expire = "expire"


def check_spelled_out(enum: type[StrEnum], declared: Iterable[str]) -> None:
    """Refuse an enum that does not list exactly the declared names, in their order."""
    expected, spelled = tuple(declared), tuple(member.value for member in enum)
    if spelled != expected:
        raise TypeError(
            f"{enum.__name__} must spell out PaymentLifecycle's {', '.join(expected)};"
            f" it has {', '.join(spelled)}"
        )


check_spelled_out(TxState, (state.id for state in PaymentLifecycle.states))
check_spelled_out(TxEvent, (event.id for event in PaymentLifecycle._events))

# --- The compiled table -----------------------------------------------------------------

STATES: tuple[TxState, ...] = tuple(TxState)
EVENTS: tuple[TxEvent, ...] = tuple(TxEvent)
INITIAL = TxState(PaymentLifecycle.initial_state.id)
TERMINAL: frozenset[TxState] = frozenset(TxState(state.id) for state in PaymentLifecycle.final_states)


class _Call:
    """One guard or effect, called with exactly the keyword arguments it declares."""

    __slots__ = ("name", "function", "params", "refusal")

    def __init__(self, name: str) -> None:
        self.name = name
        self.function: Callable[..., Any] = getattr(PaymentLifecycle, name)
        self.params = tuple(inspect.signature(self.function).parameters)
        self.refusal: Refusal | None = getattr(self.function, "refusal", None)

    def __call__(self, scope: Mapping[str, Any]) -> Any:
        return self.function(**{param: scope[param] for param in self.params})

    def refuse(self, tx: Judged | None, event: str, now: datetime) -> Exception:
        """The error this guard's failure means (every guard is declared with one)."""
        if self.refusal is None or tx is None:
            return _refuse(tx, event, f"{self.name} does not hold")
        return self.refusal(tx, event, now)

    def __repr__(self) -> str:
        return self.name


@attrs.frozen
class Rule:
    """One row of the table: ``event`` from ``source`` to ``target``."""

    event: TxEvent
    source: TxState
    target: TxState
    guards: tuple[_Call, ...]
    effects: tuple[_Call, ...]


def _declared_names(specs: Iterable[object]) -> list[str]:
    # python-statemachine also lists naming-convention callbacks (``on_<event>``);
    # only names the class really defines are part of the declaration.
    return [str(spec) for spec in specs if hasattr(PaymentLifecycle, str(spec))]


def _compile() -> dict[tuple[str, str], Rule]:
    table: dict[tuple[str, str], Rule] = {}
    for state in PaymentLifecycle.states:
        for transition in state.transitions:
            for event in (TxEvent(event.id) for event in transition.events):
                source = TxState(transition.source.id)
                if (source, event) in table:
                    raise TypeError(f"two transitions for {(source, event)}: the table must be a function")
                table[source, event] = Rule(
                    event=event,
                    source=source,
                    target=TxState(transition.target.id),
                    guards=tuple(_Call(name) for name in _declared_names(transition.cond)),
                    effects=tuple(_Call(name) for name in _declared_names(transition.on)),
                )
    return table


#: keyed by ``(state, event)`` members; plain strings find the same rows (a member
#: hashes and compares as its value), so the key type says ``str``
TABLE: dict[tuple[str, str], Rule] = _compile()
#: the states a stored transaction can be in while its preview clock runs
ACTIVE: frozenset[TxState] = frozenset(rule.source for rule in TABLE.values() if rule.event is TxEvent.expire)


@attrs.frozen
class Step:
    """A decided transition: what the engine persists if the side effect succeeds."""

    event: TxEvent
    source: TxState
    target: TxState
    changes: Mapping[str, Any]


def _scope(tx: Judged | None, now: datetime, policy: TimerPolicy) -> dict[str, Any]:
    return {"tx": tx, "now": now, "policy": policy}


def _refuse(tx: Judged | None, event: str, why: str) -> IllegalTransition:
    if tx is None:
        return IllegalTransition(why, event=event)
    return IllegalTransition(why, **_context(tx, event))


def decide(
    tx: Judged | None, event: str, now: datetime, policy: TimerPolicy
) -> Step:
    """Decide one transition, or raise the error that names why it is refused.

    ``tx`` is None for ``preview`` (the transaction does not exist yet).  Pure: reads
    nothing but its arguments, so the sync and async engines share it.
    """
    state = tx.state if tx is not None else INITIAL
    rule = TABLE.get((state, event))
    if rule is None:
        if event not in EVENTS:
            raise _refuse(tx, event, f"unknown event (known: {', '.join(EVENTS)})")
        why = "the transaction is final" if state in TERMINAL else "not allowed from here"
        raise _refuse(tx, event, f"{why}; allowed: {', '.join(allowed_events(tx, now)) or 'none'}")
    scope = _scope(tx, now, policy)
    for check in rule.guards:
        if not check(scope):
            raise check.refuse(tx, event, now)
    changes: dict[str, Any] = {}
    for effect in rule.effects:
        changes.update(effect(scope))
    return Step(event=rule.event, source=rule.source, target=rule.target, changes=changes)


_GUARDS_READ_NO_POLICY = TimerPolicy()  # guards judge deadlines already set; only effects read a policy


def is_enabled(tx: Judged | None, event: str, now: datetime) -> bool:
    state = tx.state if tx is not None else INITIAL
    rule = TABLE.get((state, event))
    if rule is None:
        return False
    scope = _scope(tx, now, _GUARDS_READ_NO_POLICY)
    return all(check(scope) for check in rule.guards)


def allowed_events(tx: Judged | None, now: datetime) -> list[TxEvent]:
    """Events whose transition exists from ``tx.state`` and whose guards pass now."""
    return [event for event in EVENTS if is_enabled(tx, event, now)]


#: the error a command gets when it arrives after the preview deadline
preview_expired = _preview_over


def is_overdue(tx: Judged, now: datetime) -> bool:
    """True when the machine would take ``expire`` now: lazy expiry asks this first."""
    return tx.pending is None and is_enabled(tx, TxEvent.expire, now)
