"""``txengine list --attention`` and ``show`` on a call the engine parked for an operator
(a Cheers update whose answer was lost twice: recover() no longer re-sends it)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from txengine.app.cli import cli

from .test_boundary_wedged_update import _wedge
from .test_recovery_cheers import engine, sandbox  # noqa: F401 (fixtures)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_a_parked_call_is_listed_as_needing_an_operator(engine, sandbox, clock):  # noqa: F811
    tx = _wedge(engine, sandbox, clock)
    db = engine.store.path
    listed = json.loads(run("list", "--db", db, "--attention", "--json").output)
    assert [t["id"] for t in listed["transactions"]] == [tx.id]
    assert "OPERATOR" in run("list", "--db", db, "--attention").output
    shown = json.loads(run("show", tx.id, "--db", db, "--json").output)
    assert shown["transaction"]["attention"] and shown["next"] == ["cancel"]
    text = run("show", tx.id, "--db", db).output
    assert "NEEDS AN OPERATOR" in text and "Engine.resolve" in text
