"""The ``txengine`` command line."""

from __future__ import annotations

import argparse
import sys


def cmd_demo(args) -> int:
    from . import demo

    return demo.run(args.db)


def cmd_show(args) -> int:
    from .report import describe
    from .store import open_existing

    store = open_existing(args.db)
    tx = store.load(args.tx_id)
    if tx is None:
        print(f"no transaction {args.tx_id} in {args.db}", file=sys.stderr)
        return 1
    print(describe(tx, store.journal(args.tx_id)))
    intent = store.load_intent(args.tx_id) if tx.pending else None
    if intent is not None:
        print(f"  in doubt: {intent.event} under key {intent.idempotency_key!r}, {intent.attempts} attempt(s)"
              + (f", last error: {intent.last_error}" if intent.last_error else "")
              + (f"; leased until {intent.lease_until:%H:%M:%S}" if intent.lease_until else
                 f"; recover() re-sends it from {intent.retry_at:%H:%M:%S}" if intent.retry_at else ""))
    for row in store.deliveries(args.tx_id):
        print(f"  delivery #{row.id} {row.kind}: {row.status}, {row.attempts} attempt(s)"
              + (f", next attempt {row.next_attempt_at:%Y-%m-%d %H:%M:%S}" if row.status == "pending" else "")
              + (f", last error: {row.last_error}" if row.last_error else ""))
    return 0


def cmd_sandbox_serve(args) -> int:
    import threading

    from txengine.providers import load_sandbox_class
    from txengine.testing.sandbox import serve

    sandbox = load_sandbox_class(args.name)()
    # An empty sandbox can only refuse: seed the accounts its docs' examples use.
    for seed in ("seed_demo", "seed_worked_example"):
        if hasattr(sandbox, seed):
            getattr(sandbox, seed)()
            break
    with serve(sandbox, host=args.host, port=args.port) as served:
        print(f"{args.name} sandbox listening on {served.base_url} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txengine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a POS session against the embedded sandboxes")
    demo.add_argument("--db", help="SQLite file to use (default: a new temporary one)")
    demo.set_defaults(run=cmd_demo)

    show = commands.add_parser("show", help="a transaction, its journal and deliveries")
    show.add_argument("tx_id")
    show.add_argument("--db", default="txengine.db")
    show.set_defaults(run=cmd_show)

    sandbox = commands.add_parser("sandbox", help="provider sandboxes")
    sandbox_commands = sandbox.add_subparsers(dest="sandbox_command", required=True)
    serve = sandbox_commands.add_parser("serve", help="serve a sandbox on loopback")
    serve.add_argument("name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.set_defaults(run=cmd_sandbox_serve)

    from .diagrams import add_arguments as diagram_arguments

    diagram_arguments(commands.add_parser(
        "diagram", help="state diagrams: the lifecycle, a provider's, a transaction's path"))

    from .worker import register_commands  # worker, workers, outbox

    register_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FileNotFoundError as missing:  # an operator command pointed at no database
        raise SystemExit(str(missing)) from None


if __name__ == "__main__":
    sys.exit(main())
