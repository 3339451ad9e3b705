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
    assert "NEEDS AN OPERATOR" in text and "txengine resolve" in text


def test_an_operator_resolves_a_parked_call_from_the_command_line(engine, sandbox, clock, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    tx = _wedge(engine, sandbox, clock)
    db = engine.store.path
    (tmp_path / "till_providers.py").write_text(
        "from txengine.providers.cheers import CheersDriver\n"
        "def drivers():\n"
        "    return {'cheers': CheersDriver(api_key='k', environment='sandbox')}\n")
    monkeypatch.chdir(tmp_path)

    usage = CliRunner().invoke(cli, ["resolve", tx.id, "--db", db, "--providers", "till_providers:drivers"])
    assert usage.exit_code == 2 and "--applied" in usage.output  # the operator must say which

    done = run("resolve", tx.id, "--not-applied", "--db", db, "--providers", "till_providers:drivers")
    assert done.exit_code == 0, done.output
    assert f"{tx.id}: not applied; now previewed" in done.output
    assert json.loads(run("list", "--db", db, "--attention", "--json").output)["transactions"] == []
    again = run("resolve", tx.id, "--applied", "--db", db, "--providers", "till_providers:drivers")
    assert again.exit_code == 2 and "no call in doubt" in again.output
