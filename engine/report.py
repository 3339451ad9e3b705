"""Plain-text views of transactions and journals, for the demo, the CLI and support."""

from __future__ import annotations

from collections.abc import Iterable

from .models import Event, Transaction


def _clock(value) -> str:
    return value.strftime("%H:%M:%S") if value else "-"


def totals(tx: Transaction) -> str:
    return (f"gross {tx.gross}  discount {tx.total_discount}  credits {tx.total_credits}"
            f"  to pay {tx.outstanding}")


def step_line(event: str, tx: Transaction) -> str:
    deadline = ""
    if tx.state in ("previewed", "updated", "payment_pending"):
        deadline = f"  expires {_clock(tx.expires_at)}"
    elif tx.state == "finalized":
        deadline = f"  refundable until {tx.refund_deadline:%Y-%m-%d %H:%M}"
    return f"  {_clock(tx.updated_at)}  {event:<13} -> {tx.state:<15} {totals(tx)}{deadline}"


def lines_table(tx: Transaction) -> list[str]:
    rows = [f"    {'item':<24}{'qty':>4}{'gross':>14}{'discount':>14}{'credits':>14}{'to pay':>14}"]
    for line in tx.items:
        rows.append(f"    {line.name[:23]:<24}{line.quantity:>4}{str(line.gross):>14}"
                    f"{str(line.discount):>14}{str(line.credits):>14}{str(line.outstanding):>14}")
    return rows


def receipt_lines(tx: Transaction, width: int = 40) -> list[str]:
    return [f"    | {line.render(width):<{width}} |" for line in tx.receipt]


def describe(tx: Transaction, history: Iterable[Event] = ()) -> str:
    """What support needs to answer "what happened to this payment?"."""
    out = [
        f"transaction {tx.id}  ({tx.provider}, provider ref {tx.provider_ref or '-'})",
        f"  state {tx.state}  version {tx.version}" + (f"  IN DOUBT: {tx.pending}" if tx.pending else ""),
        f"  {totals(tx)}",
        f"  expires_at {tx.expires_at}  refund_deadline {tx.refund_deadline}",
        *lines_table(tx),
        *receipt_lines(tx),
    ]
    events = list(history)
    if events:
        out.append("  journal:")
        for event in events:
            data = dict(event.data)
            if event.kind == "transition":
                what = f"{data['event']}: {data['source']} -> {data['target']}"
            else:
                extra = data.get("code") or data.get("error") or f"attempt {data.get('attempt', '')}"
                what = f"{event.kind} {data.get('event')} ({extra})"
            out.append(f"    #{event.seq:<3} {event.at.isoformat()}  {what}")
    return "\n".join(out)
