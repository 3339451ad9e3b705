"""The operator's ``txengine`` command line.

Exit codes (the same for every command):

====  ==============================================================================
0     done
1     not found, or nothing to do (no such transaction, nothing was due, a delivery
      that is not dead)
2     usage or configuration: a bad option, a database that does not exist or is not
      migrated, a providers factory that fails, a port in use
3     the store is unavailable: locked past its timeout, not a database, unreachable
====  ==============================================================================

Read commands (``show``, ``list``, ``workers``, ``outbox list``, ``diagram --tx``) open
the database read-only: they never take the write lock nor create anything.  No command
but ``migrate`` creates a database or a schema.  ``--json`` prints the keys documented in
README.md ("The operator's txengine"); they only ever gain keys.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import machine
from ..errors import EngineError, StoreUnavailable, ValidationError
from ..models import Transaction
from ..report import describe, shorten, when
from ..settings import DEFAULT_DB, Settings, redacted_db
from ..store import open_existing, sqlite_path
from ..store.base import Listing, Store

OK, NOTHING, USAGE, UNAVAILABLE = 0, 1, 2, 3


class Failure(click.ClickException):
    """A one-line error for the operator, with the exit code it means."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it per class


def handles_errors(command: Callable[..., int | None]) -> Callable[..., None]:
    """Turn what can go wrong at the edge into one line and its exit code; a command's
    return value is its exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            code = command(*args, **kwargs)
        except FileNotFoundError as missing:
            raise Failure(f"{missing.args[0] if missing.args else missing}", USAGE) from None
        except StoreUnavailable as down:
            raise Failure(f"store unavailable: {down}", UNAVAILABLE) from None
        except ValidationError as bad:
            raise Failure(str(bad), USAGE) from None
        except sqlite3.Error as down:
            raise Failure(f"store unavailable: {down}", UNAVAILABLE) from None
        except EngineError as error:
            raise Failure(str(error), NOTHING) from None
        raise SystemExit(code or OK)

    return run


def console() -> Console:
    """Rich output on the current stdout: colour on a terminal, plain text when piped."""
    return Console(highlight=False, soft_wrap=False)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None


@contextmanager
def opened(db: str, *, read_only: bool) -> Iterator[Store]:
    """The existing store at ``db``; never one created on the way."""
    store = open_existing(db, read_only=read_only)
    try:
        yield store
    finally:
        store.close()


db_option = click.option(
    "--db", envvar="TXENGINE_DB", default=DEFAULT_DB, show_default=True, show_envvar=True, metavar="DB",
    help="database: a SQLite path, sqlite:///path or postgresql://… URL")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON (documented, stable keys)")
providers_option = click.option(
    "--providers", metavar="MODULE:FUNCTION",
    help="a function returning {name: driver}, configured with credentials (searched from the current directory)")
demo_option = click.option("--demo-sandboxes", is_flag=True,
                           help="drive in-process sandboxes of every provider (local runs only)")

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(version("txengine"), "--version", prog_name="txengine")
def cli() -> None:
    """txengine: the operator's view of a POS's loyalty payments.

    Exit codes: 0 done, 1 not found or nothing to do, 2 usage or configuration,
    3 store unavailable.  Shell completion: eval "$(_TXENGINE_COMPLETE=bash_source txengine)".
    """


# --- demo, migrate ---------------------------------------------------------------------------


@cli.command()
@click.option("--db", type=click.Path(dir_okay=False), default=None,
              help="keep the demo's SQLite file here (default: a temporary one, removed afterwards)")
@handles_errors
def demo(db: str | None) -> int:
    """Run POS sessions against every provider's in-process sandbox."""
    from .demo import run

    if db is not None and not Path(db).resolve().parent.is_dir():
        raise Failure(f"no directory {Path(db).resolve().parent} for --db {db}", USAGE)
    return run(db, click.echo, colour=sys.stdout.isatty())


@cli.command()
@db_option
@handles_errors
def migrate(db: str) -> int:
    """Create the database (or bring its schema up to date).  The only command that does."""
    from ..store import open_store

    path = sqlite_path(db)
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise Failure(f"no directory {Path(path).resolve().parent} for {path}", USAGE)
    store = open_store(db if "://" in db else f"sqlite:///{db}")
    try:
        click.echo(f"{path or redacted_db(db)}: schema version {getattr(store, 'schema_version', '?')}")
    finally:
        store.close()
    return OK


# --- show, list ---------------------------------------------------------------------------


def money_json(amount: Any) -> str:
    return str(amount.to_decimal())


def transaction_json(tx: Transaction, attention: str | None = None) -> dict[str, Any]:
    """``attention``: why its call in doubt waits for an operator (None: it does not)."""
    return {
        "id": tx.id, "provider": tx.provider, "provider_ref": tx.provider_ref, "state": str(tx.state),
        "version": tx.version, "in_doubt": tx.pending, "attention": attention,
        "currency": tx.outstanding.currency,
        "gross": money_json(tx.gross), "discount": money_json(tx.total_discount),
        "credits": money_json(tx.total_credits), "to_pay": money_json(tx.outstanding),
        "created_at": iso(tx.created_at), "updated_at": iso(tx.updated_at),
        "expires_at": iso(tx.expires_at) if str(tx.state) in ("previewed", "updated", "payment_pending") else None,
        "refund_deadline": iso(tx.refund_deadline),
    }


def next_events(tx: Transaction, now: datetime, attention: str | None = None) -> list[str]:
    """What may happen to it now: the lifecycle's events its provider supports (a call in
    doubt: only its retry)."""
    if tx.pending:  # only its retry; once parked for an operator, only cancel (or resolve)
        return ["cancel"] if attention else [str(tx.pending)]
    allowed = [str(e) for e in machine.allowed_events(tx, now)]
    try:
        from ..diagrams import load_driver_class

        supported = getattr(load_driver_class(tx.provider), "capabilities").supported
    except (LookupError, ImportError, AttributeError):  # a provider this install does not know
        return allowed
    return [event for event in allowed if event in supported]


@cli.command()
@click.argument("tx_id")
@db_option
@json_option
@handles_errors
def show(tx_id: str, db: str, as_json: bool) -> int:
    """What happened to a payment: its snapshot and journal as one timeline, its
    deliveries, a call in doubt, and what can be done next."""
    with opened(db, read_only=True) as store:
        tx = store.load(tx_id)
        if tx is None:
            raise Failure(f"no transaction {tx_id} in {sqlite_path(db) or redacted_db(db)}", NOTHING)
        history = store.journal(tx_id)
        deliveries = store.deliveries(tx_id)
        intent = store.load_intent(tx_id) if tx.pending else None
    attention = getattr(intent, "attention", None)
    allowed = next_events(tx, datetime.now(timezone.utc), attention)
    if as_json:
        emit_json({
            "transaction": {**transaction_json(tx, attention), "items": [
                {"name": line.name, "quantity": line.quantity, "gross": money_json(line.gross),
                 "discount": money_json(line.discount), "credits": money_json(line.credits),
                 "to_pay": money_json(line.outstanding)} for line in tx.items]},
            "timeline": [{"seq": e.seq, "at": iso(e.at), "kind": e.kind, "event": e.data.get("event"),
                          "source": e.data.get("source"), "target": e.data.get("target"),
                          "code": e.data.get("code")} for e in history],
            "deliveries": [delivery_json(row) for row in deliveries],
            "in_doubt": None if intent is None else {
                "event": intent.event, "idempotency_key": intent.idempotency_key, "attempts": intent.attempts, "last_error": intent.last_error,
                "leased_until": iso(intent.lease_until), "retry_at": iso(intent.retry_at)},
            "next": allowed,
        })
    else:
        click.echo(describe(tx, history, deliveries=deliveries, intent=intent, allowed=allowed))
    return OK


def parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO time (2026-11-29T14:00 or with +01:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@cli.command("list")
@db_option
@click.option("--state", "states", multiple=True, type=click.Choice(sorted(str(s) for s in machine.STATES)),
              help="only these states (repeatable)")
@click.option("--provider", help="only this provider's transactions")
@click.option("--in-doubt", is_flag=True, help="only transactions whose last provider call is in doubt")
@click.option("--attention", is_flag=True,
              help="only those needing an operator: in-doubt calls the engine no longer re-sends")
@click.option("--due-before", metavar="TIME",
              help="only live ones (not in doubt) expiring before TIME (ISO, UTC unless given)")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, help="rows per page")
@click.option("--page", type=click.IntRange(1), default=1, help="which page")
@json_option
@handles_errors
def list_(db: str, states: Sequence[str], provider: str | None, in_doubt: bool, attention: bool,
          due_before: str | None, limit: int, page: int, as_json: bool) -> int:
    """Transactions, newest first, filtered and paged."""
    deadline = parse_time(due_before) if due_before else None
    listing = Listing(states=tuple(states), provider=provider, in_doubt=in_doubt, attention=attention,
                      expiring_before=deadline, limit=limit, offset=(page - 1) * limit)
    with opened(db, read_only=True) as store:
        # needing attention: in-doubt calls the engine parked for an operator (it no longer re-sends them)
        parked = {intent.tx_id: intent.attention for intent in store.needing_attention(1_000_000, None)}
        total, page_ids = store.find_transactions(listing)  # filtered and paged in the database
        shown, damaged = [], []
        for tx_id in page_ids:
            try:
                tx = store.load(tx_id)
            except StoreUnavailable as unreadable:
                if unreadable.tx_id != tx_id:
                    raise  # the store itself failed, not this row
                damaged.append(tx_id)  # damaged outside the engine: the others are still listed
                continue
            except ValidationError:  # it decodes into a value no transaction can hold: damaged too
                damaged.append(tx_id)
                continue
            if tx is not None:
                shown.append(tx)
    if as_json:
        emit_json({"total": total, "page": page, "limit": limit,
                   "transactions": [transaction_json(tx, parked.get(tx.id)) for tx in shown]})
    elif not shown:
        click.echo("no transactions match" if not total else f"page {page} is past the last ({total} match)")
    else:
        _print_listing(shown, parked, total, limit, page)
    if damaged:  # after the listing, so an operator sees both; the exit code says it
        raise StoreUnavailable(f"{len(damaged)} transaction(s) could not be read and are not listed: their stored"
                               f" snapshots are damaged: {', '.join(damaged[:10])}"
                               f"{f' and {len(damaged) - 10} more' if len(damaged) > 10 else ''}"
                               " (txengine show TX_ID says how)")
    return OK


def _print_listing(shown: Sequence[Transaction], parked: dict[str, str | None], total: int, limit: int,
                   page: int) -> None:
    # id, provider, state and amount fit 80 columns unabridged; times are in --json and show
    notes = any(tx.pending for tx in shown)  # "in doubt", or "OPERATOR" when parked for one
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True)
    table.add_column("id", no_wrap=True, min_width=len(shown[0].id))
    table.add_column("provider", no_wrap=True, overflow="ellipsis")
    table.add_column("state", no_wrap=True, overflow="ellipsis")
    table.add_column("to pay", justify="right", no_wrap=True)
    if notes:
        table.add_column("note", no_wrap=True, min_width=8)
    for tx in shown:
        row = [tx.id, tx.provider, _state(str(tx.state)), str(tx.outstanding)]
        table.add_row(*row, *([_note(tx, parked)] if notes else []))
    out = console()
    out.print(table)
    pages = max(1, -(-total // limit))
    out.print(f"{total} match; page {page} of {pages}")


def _note(tx: Transaction, parked: dict[str, str | None]) -> str:
    if tx.id in parked:
        return "OPERATOR"  # parked: recover() no longer re-sends it
    return "in doubt" if tx.pending else ""


STATE_STYLES = {"finalized": "green", "refunded": "magenta", "cancelled": "red", "expired": "red",
                "payment_pending": "yellow", "previewed": "cyan", "updated": "cyan"}


def _state(state: str) -> str:
    style = STATE_STYLES.get(state)
    return f"[{style}]{state}[/]" if style else state


# --- sweep, recover, worker -----------------------------------------------------------------


def chosen_providers(providers: str | None, demo_sandboxes: bool) -> dict[str, Any]:
    from .wiring import demo_providers, load_providers

    if bool(providers) == demo_sandboxes:
        raise Failure("name the providers: --providers MODULE:FUNCTION or --demo-sandboxes (one of them)", USAGE)
    return demo_providers() if demo_sandboxes else load_providers(providers or "")


def engine_on(db: str, drivers: dict[str, Any], **options: Any) -> Any:
    """An engine on the existing store at ``db`` (checked: never created on the way)."""
    from ..engine import Engine

    settings = Settings()  # type: ignore[call-arg]  # pydantic-settings fills it from TXENGINE_*
    return Engine(open_existing(db), drivers, **settings.engine_options(drivers), **options)


@cli.command()
@db_option
@providers_option
@demo_option
@handles_errors
def sweep(db: str, providers: str | None, demo_sandboxes: bool) -> int:
    """Expire every transaction whose deadline passed (what the worker does each second)."""
    from rich.progress import Progress

    from ..engine import Engine

    drivers = chosen_providers(providers, demo_sandboxes)
    engine = engine_on(db, drivers)
    try:
        now = engine.clock.now()
        due = {name: len(engine.store.due_for_expiry(now, 1_000_000, [name])) for name in drivers}
        if not any(due.values()):
            click.echo("nothing is due to expire")
            return NOTHING
        expired = 0
        with Progress(console=console(), transient=not sys.stdout.isatty()) as progress:
            task = progress.add_task("expiring", total=sum(due.values()))
            for name, count in due.items():
                if count:  # one provider at a time, so the bar moves as each is done
                    expired += Engine(engine.store, {name: drivers[name]}, engine.clock).expire_due()
                    progress.update(task, completed=expired)
        click.echo(f"expired {expired} transaction(s)")
        return OK
    finally:
        engine.close()


@cli.command()
@db_option
@providers_option
@demo_option
@click.option("--limit", type=click.IntRange(1), default=100, help="in-doubt calls to re-drive at most")
@handles_errors
def recover(db: str, providers: str | None, demo_sandboxes: bool, limit: int) -> int:
    """Re-drive provider calls whose outcome is unknown, under their original keys."""
    engine = engine_on(db, chosen_providers(providers, demo_sandboxes))
    try:
        settled = engine.recover(limit=limit)
        backlog = engine.store.backlog(engine.clock.now())
    finally:
        engine.close()
    click.echo(f"settled {settled}; still in doubt {backlog['in_doubt']}")
    return OK if settled else NOTHING


@cli.command()
@click.argument("tx_id")
@click.option("--applied/--not-applied", required=True,
              help="what the provider shows for the parked call, after you checked with it")
@db_option
@providers_option
@demo_option
@handles_errors
def resolve(tx_id: str, applied: bool, db: str, providers: str | None, demo_sandboxes: bool) -> int:
    """Settle a transaction's in-doubt call by an operator's word (a parked update, say).

    Check with the provider first: --applied commits the transition the call would have
    made, --not-applied records that it did not happen.  Refused while a call is live.
    """
    engine = engine_on(db, chosen_providers(providers, demo_sandboxes))
    try:
        tx = engine.resolve(tx_id, applied=applied)
    finally:
        engine.close()
    click.echo(f"{tx.id}: {'applied' if applied else 'not applied'}; now {tx.state}")
    return OK


@cli.command()
@db_option
@providers_option
@demo_option
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, help="seconds to sleep when idle")
@click.option("--heartbeat", type=click.FloatRange(min=0.01), default=30.0, help="seconds between heartbeats")
@click.option("--concurrency", type=click.IntRange(1), default=8, help="deliveries in flight at once")
@click.option("--iterations", type=click.IntRange(1), default=None, help="stop after this many (default: run until stopped)")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus metrics and /healthz on this loopback port (needs txengine[worker])")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              help="the least important log lines written")
@handles_errors
def worker(db: str, providers: str | None, demo_sandboxes: bool, interval: float, heartbeat: float,
           concurrency: int, iterations: int | None, metrics_port: int | None, log_level: str) -> int:
    """Run the background loop: timers, recovery, guaranteed deliveries.  SIGTERM stops it
    gracefully.  Logs are JSON lines on stderr, each naming the database."""
    from .. import telemetry
    from ..worker import Worker, configure_logging
    from ..worker import log as worker_log

    configure_logging(log_level, context={"db": redacted_db(db)})
    server = None
    try:
        drivers = chosen_providers(providers, demo_sandboxes)
        engine = engine_on(db, drivers, delivery_concurrency=concurrency)
        if metrics_port is not None:
            from .metrics import serve_metrics

            server = serve_metrics(metrics_port)
    except (ValidationError, FileNotFoundError, Failure) as bad:  # the worker speaks JSON lines
        message = bad.message if isinstance(bad, Failure) else str(bad.args[0] if bad.args else bad)
        worker_log.error("bad_configuration", extra={"fields": {"event": "bad_configuration", "error": message}})
        if "engine" in locals():
            engine.close()
        return USAGE
    except (sqlite3.Error, StoreUnavailable) as down:
        worker_log.error("store_unavailable", extra={"fields": {"event": "store_unavailable", "error": str(down)}})
        return UNAVAILABLE
    telemetry.watch_backlog(engine.store, engine.clock)
    loop = Worker(engine, interval=interval, heartbeat_every=timedelta(seconds=heartbeat))
    if server is not None:
        server.health = lambda: not loop.stopping  # type: ignore[attr-defined]
    loop.install_signal_handlers()
    try:
        loop.run(iterations=iterations)
    finally:
        engine.close()
        if server is not None:
            server.shutdown()
    return OK


# --- workers, outbox ------------------------------------------------------------------------


def delivery_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "tx_id": row.tx_id, "provider": row.provider, "kind": row.kind, "status": row.status,
            "attempts": row.attempts, "next_attempt_at": iso(row.next_attempt_at) if row.status == "pending" else None,
            "last_error": row.last_error, "created_at": iso(row.created_at), "delivered_at": iso(row.delivered_at)}


@cli.command()
@db_option
@click.option("--stale-after", type=click.FloatRange(min=1), default=90.0,
              help="seconds without a heartbeat before a running worker is shown stale")
@json_option
@handles_errors
def workers(db: str, stale_after: float, as_json: bool) -> int:
    """The workers that ran on this database, by their heartbeats (a killed one shows stale)."""
    now = datetime.now(timezone.utc)
    with opened(db, read_only=True) as store:
        rows = store.workers()

    def status(record: Any) -> str:
        age = (now - record.heartbeat_at).total_seconds()
        return "stale" if record.status == "running" and age > stale_after else record.status

    if as_json:
        emit_json({"workers": [{"id": w.id, "host": w.host, "pid": w.pid, "status": status(w),
                                "heartbeat_at": iso(w.heartbeat_at),
                                "heartbeat_age_seconds": round((now - w.heartbeat_at).total_seconds(), 1),
                                "started_at": iso(w.started_at), "stopped_at": iso(w.stopped_at),
                                "iterations": w.iterations, "totals": dict(w.totals)} for w in rows]})
        return OK
    if not rows:
        click.echo("no worker has run on this database")
        return OK
    table = Table(box=box.SIMPLE, header_style="bold")
    for name, justify in (("worker", "left"), ("status", "left"), ("heartbeat", "right"),
                          ("iterations", "right"), ("totals", "left")):
        table.add_column(name, justify=justify, overflow="ellipsis", no_wrap=name != "totals")  # type: ignore[arg-type]
    styles = {"running": "green", "stale": "bold red", "stopped": "dim"}
    for w in rows:
        state = status(w)
        table.add_row(w.id, f"[{styles.get(state, '')}]{state}[/]" if state in styles else state,
                      f"{int((now - w.heartbeat_at).total_seconds())}s ago", str(w.iterations),
                      ", ".join(f"{k} {v}" for k, v in w.totals.items()))
    console().print(table)
    return OK


@cli.group(context_settings=CONTEXT)
def outbox() -> None:
    """Guaranteed deliveries: list them, re-queue dead ones."""


@outbox.command("list")
@db_option
@click.option("--status", type=click.Choice(["pending", "dead", "delivered"]),
              help="only this status (default: dead and pending)")
@click.option("--tx", "tx_id", metavar="TX_ID", help="only this transaction's deliveries")
@click.option("--limit", type=click.IntRange(1), default=200, help="rows per status at most")
@json_option
@handles_errors
def outbox_list(db: str, status: str | None, tx_id: str | None, limit: int, as_json: bool) -> int:
    """Deliveries not yet delivered, dead first, and the backlog."""
    with opened(db, read_only=True) as store:
        rows = [row for wanted in ([status] if status else ["dead", "pending"])
                for row in store.deliveries(tx_id, wanted, limit=limit)]
        backlog = dict(store.backlog(datetime.now(timezone.utc)))
    if as_json:
        emit_json({"deliveries": [delivery_json(row) for row in rows], "backlog": backlog})
        return OK
    out = console()
    if rows:
        # two lines a delivery, so the transaction id and the error read whole on 80 columns
        out.print(f"[bold]{'id':>6} {'status':<7} {'provider':<11} {'kind':<8} {'tries':>5}  tx[/]")
        for row in rows:
            status = f"[red]{'dead':<7}[/]" if row.status == "dead" else f"{row.status:<7}"
            out.print(f"{row.id:>6} {status} {row.provider:<11} {row.kind:<8} {row.attempts:>5}  {row.tx_id}")
            detail = "; ".join(part for part in (
                f"next attempt {when(row.next_attempt_at)}" if row.status == "pending" else "",
                row.last_error or "") if part)
            if detail:
                out.print(escape(shorten(f"{'':>7}{detail}", 79)), style="dim")
    else:
        out.print("no deliveries match")
    out.print(f"pending {backlog['pending']}, dead {backlog['dead']}, transactions in doubt {backlog['in_doubt']}"
              f" ({backlog['stuck']} waiting for recover)")
    return OK


@outbox.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="re-queue every dead delivery")
@db_option
@handles_errors
def outbox_retry(ids: tuple[int, ...], all_dead: bool, db: str) -> int:
    """Re-queue dead deliveries (by ID) for the worker to send now."""
    if bool(ids) == all_dead:
        raise Failure("name delivery ids, or --all-dead (not both)", USAGE)
    now = datetime.now(timezone.utc)
    with opened(db, read_only=False) as store:
        if all_dead:
            count = store.retry_dead_deliveries(now)
            click.echo(f"re-queued {count} dead deliveries")
            return OK if count else NOTHING
        failed = 0
        for delivery_id in ids:
            if store.retry_delivery(delivery_id, now):
                click.echo(f"re-queued delivery #{delivery_id}")
            else:
                failed += 1
                click.echo(f"delivery #{delivery_id} is not dead (or does not exist): left as it is", err=True)
    return NOTHING if failed else OK


# --- diagram, sandbox ---------------------------------------------------------------------------


@cli.command()
@click.option("--format", "format_", type=click.Choice(["mermaid", "dot", "svg", "png"]), default="mermaid",
              help="mermaid and dot are text; svg and png need Graphviz")
@click.option("--provider", help="only the transitions this provider supports, with its calls and timers")
@click.option("--tx", "tx_id", metavar="TX_ID", help="the path this transaction took, from its journal in --db")
@db_option
@click.option("--output", "-o", metavar="FILE", help="write here (default: stdout, for text formats)")
@handles_errors
def diagram(format_: str, provider: str | None, tx_id: str | None, db: str, output: str | None) -> int:
    """State diagrams: the lifecycle, a provider's, a transaction's path."""
    import argparse

    from .. import diagrams

    if provider and provider not in diagrams.DRIVERS:
        raise Failure(f"no provider {provider!r}; known: {', '.join(sorted(diagrams.DRIVERS))}", USAGE)
    if tx_id:
        open_existing(db, read_only=True).close()  # a missing or unmigrated database: one line, exit 2
    return diagrams.command(argparse.Namespace(format=format_, provider=provider, tx_id=tx_id,
                                               db=db, output=output))


@cli.group(context_settings=CONTEXT)
def sandbox() -> None:
    """Provider sandboxes on loopback, for trying a driver or a POS without a provider."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@sandbox.command()
@click.argument("name")
@click.option("--host", default="127.0.0.1", help="loopback address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, help="port (0: any free one)")
@handles_errors
def serve(name: str, host: str, port: int) -> int:
    """Serve the NAME sandbox, seeded with demo accounts; prints its credentials and
    customer tokens, and how to get more."""
    from txengine.providers import load_sandbox_class
    from txengine.testing.sandbox import serve as serve_sandbox

    from ..drivers import is_loopback

    try:
        sandbox_class = load_sandbox_class(name)
    except LookupError as unknown:
        raise Failure(str(unknown.args[0]), USAGE) from None
    if not is_loopback(host):
        raise Failure(f"sandboxes are only served on loopback, not {host}", USAGE)
    if port and not _port_free(host, port):
        raise Failure(f"port {port} on {host} is in use: pick another with --port (0: any free one)", USAGE)
    instance = sandbox_class()
    customers = seed(instance)
    credentials: dict[str, str] = getattr(instance, "credentials", dict)()
    with serve_sandbox(instance, host=host, port=port) as served:
        click.echo(f"{name} sandbox listening on {served.base_url} (Ctrl-C to stop)")
        for key, value in credentials.items():
            click.echo(f"  driver {key}: {value}")
        for customer in customers:
            click.echo(f"  customer token {customer.get('customer_token')}  {customer.get('description', '')}")
        click.echo(f"  a new customer: txengine sandbox customer --url {served.base_url}"
                   f"  (or POST {served.base_url}/_sandbox/customers)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return OK


def seed(instance: Any) -> list[dict[str, str]]:
    """Seed the sandbox's demo accounts; an empty sandbox could only refuse."""
    for method in ("seed_demo", "seed_worked_example"):
        if hasattr(instance, method):
            seeded = getattr(instance, method)()
            return [dict(c) for c in seeded] if isinstance(seeded, list) else []
    return []


@sandbox.command()
@click.option("--url", required=True, help="the running sandbox's base URL (loopback)")
@json_option
@handles_errors
def customer(url: str, as_json: bool) -> int:
    """Ask a running sandbox for a new customer (its POST /_sandbox/customers)."""
    from urllib.parse import urlsplit

    import httpx

    from ..drivers import is_loopback

    if not is_loopback(urlsplit(url).hostname or ""):
        raise Failure(f"sandboxes run on loopback; {url} is not", USAGE)
    try:
        answer = httpx.post(url.rstrip("/") + "/_sandbox/customers", timeout=5.0)
    except httpx.HTTPError as failed:
        raise Failure(f"no sandbox answered at {url}: {type(failed).__name__}", UNAVAILABLE) from None
    if answer.status_code == 404:
        raise Failure(f"the sandbox at {url} issues no customers over HTTP", NOTHING)
    if answer.status_code >= 400:
        raise Failure(f"the sandbox at {url} answered {answer.status_code}", NOTHING)
    issued = answer.json()
    if as_json:
        emit_json(issued)
    else:
        click.echo(f"customer token {issued.get('customer_token')}  {issued.get('description', '')}".rstrip())
    return OK


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit code instead of exiting (for tests and ``-m``)."""
    # psycopg's pool reports each failed reconnection itself; the command says it once
    logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
    logging.getLogger("psycopg.pool").propagate = False
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="txengine", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as shown:
        click.echo(shown.ctx.get_help() if shown.ctx else "", err=True)
        return USAGE
    except click.ClickException as failed:
        failed.show()
        return failed.exit_code
    except click.exceptions.Abort:
        return 130
    except click.exceptions.Exit as done:
        return done.exit_code
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else OK
    return OK


if __name__ == "__main__":
    sys.exit(main())
