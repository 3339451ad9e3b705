"""The demo a new user runs first, and the CLI commands around it."""

import re
import signal
import subprocess
import sys

import httpx
import pytest

from txengine.app import cli, demo


def test_the_demo_runs_every_providers_session_and_replays_exactly(tmp_path, capsys):
    assert demo.run(str(tmp_path / "demo.db")) == 0
    out = capsys.readouterr().out
    for provider in ("reference", "Cheers", "Rekonect", "Forloy", "secuconnect"):
        assert f"({provider})" in out
    assert "replaying each journal rebuilds its snapshot: yes" in out
    # the Cheers worked example, in whole forints as the provider counts them
    assert re.search(r"Draft Beer 0.5L +3 +1500 HUF +600 HUF +800 HUF +100 HUF", out)
    assert "to pay 209 HUF" in out
    assert "INSUFFICIENT_CREDIT" in out and "forloy does not support refund" in out
    assert re.search(r"\| Kartennummer: +\*{12}2845 \|", out), "receipts are framed"


def test_the_demo_reads_on_80_columns_and_leaves_no_temporary_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert demo.run() == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines if not line.startswith("database: ")) < 80  # a path is as long as it is
    assert list(tmp_path.iterdir()) == [], "the temporary database is removed"
    assert not any("\x1b[" in line for line in lines), "no colour unless on a terminal"


def test_the_demo_runs_twice_on_one_database(tmp_path, capsys):
    db = str(tmp_path / "demo.db")
    assert demo.run(db) == 0
    assert demo.run(db) == 0
    assert capsys.readouterr().out.count("rebuilds its snapshot: yes") == 2


def test_show_prints_a_transaction_with_its_journal(tmp_path, capsys):
    db = str(tmp_path / "demo.db")
    demo.run(db)
    tx_id = re.search(r"txengine show (\S+)", capsys.readouterr().out).group(1)
    assert cli.main(["show", tx_id, "--db", db]) == 0
    shown = capsys.readouterr().out
    assert tx_id in shown and "timeline:" in shown and "preview: new -> previewed" in shown
    assert "None" not in shown, "no raw Python values"
    assert cli.main(["show", "tx_missing", "--db", db]) == 1
    typo = tmp_path / "typo.db"
    assert cli.main(["show", tx_id, "--db", str(typo)]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not typo.exists(), "a typo must not create an empty database"


def test_sandbox_serve_answers_on_loopback_seeded(tmp_path):
    server = subprocess.Popen(
        [sys.executable, "-m", "txengine.app.cli", "sandbox", "serve", "cheers", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = server.stdout.readline()
        base_url = re.search(r"listening on (\S+)", line).group(1)
        response = httpx.post(
            f"{base_url}/v3/integrations/credit-transactions/preview",
            headers={"X-API-Key": "cheers-sandbox-terminal-key",
                     "X-Transaction-Key": "5ccd7850844b415091071c027930101f",
                     "X-Idempotency-Key": "cli-test"},
            json={"paymentType": "SPLIT_PAYMENT", "currencyCode": "HUF",
                  "items": [{"productId": "f04ce0c0-1034-40bf-a066-3e313f68c781", "quantity": 3,
                             "unitPrice": 500, "name": "Draft Beer 0.5L", "vat": 27}]},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.json()["outstandingBalance"] == 100
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(10)
