"""The demo a new user runs first, and the CLI commands around it."""

import re
import signal
import subprocess
import sys

import httpx
import pytest

from txengine import cli, demo


def test_the_demo_runs_every_providers_session_and_replays_exactly(tmp_path, capsys):
    assert demo.run(str(tmp_path / "demo.db")) == 0
    out = capsys.readouterr().out
    for provider in ("reference", "Cheers Loyalty", "Rekonect", "Forloy", "secuconnect"):
        assert f"({provider})" in out
    assert "journal replay rebuilds every snapshot: yes" in out
    # the Cheers worked example, as its guide prints it
    assert "discount 600.00 HUF  credits 800.00 HUF  to pay 100.00 HUF" in out
    assert "to pay 209.00 HUF" in out
    assert "INSUFFICIENT_CREDIT" in out and "forloy does not support refund" in out
    assert re.search(r"Kartennummer: +\*{12}2845", out)


def test_show_prints_a_transaction_with_its_journal(tmp_path, capsys):
    db = str(tmp_path / "demo.db")
    demo.run(db)
    tx_id = re.search(r"txengine show (\S+)", capsys.readouterr().out).group(1)
    assert cli.main(["show", tx_id, "--db", db]) == 0
    shown = capsys.readouterr().out
    assert tx_id in shown and "journal:" in shown and "preview: new -> previewed" in shown
    assert cli.main(["show", "tx_missing", "--db", db]) == 1
    typo = tmp_path / "typo.db"
    with pytest.raises(SystemExit, match="no database"):
        cli.main(["show", tx_id, "--db", str(typo)])
    assert not typo.exists(), "a typo must not create an empty database"


def test_sandbox_serve_answers_on_loopback_seeded(tmp_path):
    server = subprocess.Popen(
        [sys.executable, "-m", "txengine.cli", "sandbox", "serve", "cheers", "--port", "0"],
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
