"""Plain-text views of transactions and journals, for the demo, the CLI and support.

Everything here is pure (a transaction in, lines out) and fits an 80-column terminal.
Times are shown in one format everywhere: UTC, ``YYYY-MM-DD HH:MM:SS`` (the demo's
session lines, all on one day, show only ``HH:MM:SS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from .models import DeliveryRecord, Event, Transaction
from .money import Money

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
LIVE_STATES = ("previewed", "updated", "payment_pending")


def when(value: datetime | None) -> str:
    """The one time format of the operator's views (UTC); ``-`` for none."""
    return value.astimezone(timezone.utc).strftime(TIME_FORMAT) if value else "-"


def clock_time(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%H:%M:%S") if value else "-"


def money_text(amount: Money, whole_units: bool = False) -> str:
    """``12.50 EUR``; with ``whole_units`` (a provider counting whole forints) ``500 HUF``."""
    if whole_units and amount.exponent and amount.amount_minor % 10 ** amount.exponent == 0:
        return f"{amount.amount_minor // 10 ** amount.exponent} {amount.currency}"
    return str(amount)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` with an ellipsis, so a cut name reads as cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def deadline(tx: Transaction) -> str:
    if tx.state in LIVE_STATES and tx.expires_at:
        return f"until {clock_time(tx.expires_at)}"
    if tx.state == "finalized" and tx.refund_deadline:
        return f"refund by {tx.refund_deadline:%m-%d}"
    return ""


def step_line(event: str, tx: Transaction, *, whole_units: bool = False) -> str:
    """One transition on one line (under 80 columns for amounts under a million)."""
    pay = f"to pay {money_text(tx.outstanding, whole_units)}"
    return f"  {clock_time(tx.updated_at)}  {event:<13} -> {tx.state:<15} {pay:<18} {deadline(tx)}".rstrip()


def lines_table(tx: Transaction, *, whole_units: bool = False) -> list[str]:
    def cell(amount: Money) -> str:
        return money_text(amount, whole_units)

    rows = [f"    {'item':<21}{'qty':>4}{'gross':>13}{'discount':>12}{'credits':>12}{'to pay':>13}"]
    for line in tx.items:
        rows.append(f"    {shorten(line.name, 20):<21}{line.quantity:>4}{cell(line.gross):>13}"
                    f"{cell(line.discount):>12}{cell(line.credits):>12}{cell(line.outstanding):>13}")
    return rows


def receipt_lines(tx: Transaction, width: int = 40) -> list[str]:
    """The provider's receipt lines, framed as the printer would cut them."""
    if not tx.receipt:
        return []
    rule = f"    +{'-' * (width + 2)}+"
    return [rule, *(f"    | {line.render(width):<{width}} |" for line in tx.receipt), rule]


def totals(tx: Transaction, whole_units: bool = False) -> str:
    return "  ".join(f"{name} {money_text(amount, whole_units)}" for name, amount in (
        ("gross", tx.gross), ("discount", tx.total_discount), ("credits", tx.total_credits),
        ("to pay", tx.outstanding)))


def journal_line(event: Event) -> str:
    data = dict(event.data)
    if event.kind == "transition":
        what = f"{data['event']}: {data['source'] or 'new'} -> {data['target']}"
    elif event.kind == "rejected":
        what = f"{data.get('event')} refused by the provider ({data.get('code') or 'no code'})"
    elif event.kind == "unknown":
        what = f"{data.get('event')}: outcome unknown ({data.get('error') or 'no answer'})"
    else:
        what = f"{data.get('event')}: provider call, attempt {data.get('attempt', '?')}"
    return f"  {when(event.at)}  #{event.seq:<3} {what}"


def next_steps(tx: Transaction, allowed: Sequence[str], intent: object | None) -> str:
    """What the cashier or the operator can do with it now."""
    if getattr(intent, "attention", None):
        return ("an operator checks with the provider and settles it (txengine resolve TX --applied|--not-applied), or the POS"
                " cancels it")
    if tx.pending:
        return (f"in doubt: the POS retries {tx.pending} with its idempotency key, or the worker's"
                f" recover() re-drives it (next from {when(getattr(intent, 'retry_at', None))})")
    return ("the POS may: " + ", ".join(allowed)) if allowed else "nothing: the transaction is final"


def describe(tx: Transaction, history: Iterable[Event] = (), *, deliveries: Sequence[DeliveryRecord] = (),
             intent: object | None = None, allowed: Sequence[str] = ()) -> str:
    """What support needs to answer "what happened to this payment?": the snapshot, its
    journal as one timeline, the deliveries, the call in doubt and what can happen next."""
    out = [
        f"transaction {tx.id}",
        f"  provider {tx.provider}, reference {tx.provider_ref or '-'}",
        f"  state {tx.state} (version {tx.version})" + (f", IN DOUBT: {tx.pending}" if tx.pending else ""),
        f"  {totals(tx)}",
    ]
    if tx.state in LIVE_STATES and tx.expires_at:
        out.append(f"  expires {when(tx.expires_at)}")
    if tx.refund_deadline:
        out.append(f"  refundable until {when(tx.refund_deadline)}")
    if getattr(intent, "attention", None):
        out.append(f"  NEEDS AN OPERATOR: {intent.attention}")  # type: ignore[union-attr]
    out += lines_table(tx) + receipt_lines(tx)
    events = list(history)
    if events:
        out.append("timeline:")
        out += [journal_line(event) for event in events]
    if intent is not None:
        out.append(f"in doubt: {intent.event} under key {intent.idempotency_key!r},"  # type: ignore[attr-defined]
                   f" {intent.attempts} attempt(s)"  # type: ignore[attr-defined]
                   + (f", last error: {intent.last_error}" if intent.last_error else ""))  # type: ignore[attr-defined]
    if deliveries:
        out.append("deliveries:")
        for row in deliveries:
            out.append(f"  #{row.id} {row.kind}: {row.status}, {row.attempts} attempt(s)"
                       + (f", next {when(row.next_attempt_at)}" if row.status == "pending" else "")
                       + (f", last error: {shorten(row.last_error, 60)}" if row.last_error else ""))
    out.append("next: " + next_steps(tx, allowed, intent))
    return "\n".join(out)
