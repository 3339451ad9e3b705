"""The README's "Use it in your project" examples, run as a POS team would run them.

Each example POS API talks to a Cheers sandbox served on a real loopback socket and
sells the guide's worked example: 3 beers at 500 HUF, 600 off, 800 credits, 100 to pay.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from txengine.providers.cheers import DEFAULT_API_KEY, CheersDriver, CheersSandbox
from txengine.providers.cheers.sandbox import (
    WORKED_EXAMPLE_CREDITS,
    WORKED_EXAMPLE_PRODUCT_ID,
    WORKED_EXAMPLE_TRANSACTION_KEY,
    WORKED_EXAMPLE_WALLET,
)
from txengine.testing.sandbox import serve

ROOT = Path(__file__).resolve().parent.parent

SALE = {
    "customer_token": WORKED_EXAMPLE_TRANSACTION_KEY,
    "currency": "HUF",
    "items": [{"product_id": WORKED_EXAMPLE_PRODUCT_ID, "name": "Draft Beer 0.5L", "quantity": 3,
               "unit_price": "500", "vat_percent": "27"}],
    "idempotency_key": "till-1-sale-1",
}


@pytest.fixture(scope="module")
def cheers() -> Iterator[tuple[CheersSandbox, str]]:
    sandbox = CheersSandbox()
    sandbox.seed_worked_example()
    with serve(sandbox) as served:
        yield sandbox, served.base_url


def driver_for(base_url: str) -> CheersDriver:
    return CheersDriver(api_key=DEFAULT_API_KEY, base_url=base_url)


def test_the_fastapi_example_sells_refunds_and_answers_errors_with_http_statuses(cheers, tmp_path):
    from fastapi.testclient import TestClient

    from examples.fastapi_pos import create_app

    sandbox, base_url = cheers
    app = create_app(f"sqlite:///{tmp_path / 'pos.db'}", driver_for(base_url))
    with TestClient(app) as client:
        sale = client.post("/sales", json=SALE)
        assert sale.status_code == 201, sale.text
        tx = sale.json()
        assert (tx["state"], tx["total_discount"], tx["total_credits"], tx["outstanding"]) == \
            ("previewed", "600.00", "800.00", "100.00")
        assert client.post("/sales", json=SALE).json()["id"] == tx["id"]  # the till's retry
        assert "finalize" in client.get(f"/sales/{tx['id']}").json()["allowed"]

        assert client.post(f"/sales/{tx['id']}/payment").json()["state"] == "payment_pending"
        assert client.post(f"/sales/{tx['id']}/finalize").json()["state"] == "finalized"
        assert sandbox.wallet_balance(WORKED_EXAMPLE_WALLET) == WORKED_EXAMPLE_CREDITS - 800
        assert client.post(f"/sales/{tx['id']}/refund", json={"comment": "returned"}).json()["state"] == "refunded"
        assert sandbox.wallet_balance(WORKED_EXAMPLE_WALLET) == WORKED_EXAMPLE_CREDITS

        refused = client.post(f"/sales/{tx['id']}/finalize")
        assert (refused.status_code, refused.json()["error"]) == (409, "IllegalTransition")
        missing = client.get("/sales/tx_nope")
        assert (missing.status_code, missing.json()["error"]) == (404, "TransactionNotFound")
        bad = client.post("/sales", json={**SALE, "idempotency_key": None, "currency": "XXQ"})
        assert (bad.status_code, bad.json()["error"]) == (422, "ValidationError")


def test_the_django_example_sells_through_the_sync_engine(cheers, tmp_path):
    django = pytest.importorskip("django")
    from django.conf import settings

    sandbox, base_url = cheers
    wallet = sandbox.add_wallet("django-wallet", 1000) or "django-wallet"
    qr = sandbox.issue_transaction_key(wallet)
    if not settings.configured:
        settings.configure(ROOT_URLCONF="examples.django_pos", ALLOWED_HOSTS=["testserver"],
                           DEFAULT_CHARSET="utf-8", SECRET_KEY="tests-only")
    settings.TXENGINE_DB = f"sqlite:///{tmp_path / 'django.db'}"
    settings.TXENGINE_CHEERS = {"api_key": DEFAULT_API_KEY, "base_url": base_url}
    django.setup()
    from django.test import Client

    from examples import django_pos

    client = Client()
    try:
        sale = client.post("/sales", {**SALE, "customer_token": qr, "idempotency_key": "dj-1"},
                           content_type="application/json")
        assert sale.status_code == 201, sale.content
        tx_id = sale.json()["id"]
        more = client.post(f"/sales/{tx_id}/items", {"currency": "HUF", "items": [
            {"name": "Tip", "quantity": 1, "unit_price": "100"}]}, content_type="application/json")
        assert more.json()["state"] == "updated"
        done = client.post(f"/sales/{tx_id}/cancel", content_type="application/json")
        assert done.json()["state"] == "cancelled"
        assert sandbox.wallet_balance(wallet) == 1000
        again = client.post(f"/sales/{tx_id}/finalize", content_type="application/json")
        assert (again.status_code, again.json()["error"]) == (409, "IllegalTransition")
    finally:
        django_pos.close_engine()


#: The modules whose annotations are the public API (``core`` is internal, but the
#: facades return what it computes): ``mypy --strict`` must find nothing in them.
STRICT_MODULES = (
    "txengine", "txengine.engine", "txengine.aio", "txengine.models", "txengine.money",
    "txengine.errors", "txengine.clock", "txengine.machine", "txengine.drivers", "txengine.answers",
    "txengine.secret", "txengine.journal", "txengine.codec", "txengine.store.base", "txengine.store",
    "txengine.core",
)


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    """The installed layout (txengine/, txengine/providers/) as links to the source tree,
    so mypy reads the same package the wheel ships."""
    pytest.importorskip("mypy")
    site = tmp_path_factory.mktemp("site")
    package = site / "txengine"
    package.mkdir()
    for entry in (ROOT / "engine").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "providers").symlink_to(ROOT / "providers")
    (site / "examples").symlink_to(ROOT / "examples")
    return site


def mypy_strict(site: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``targets`` only: modules they import are read, not reported."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--cache-dir", str(site / ".mypy_cache"), *targets],
        cwd=site, env={"MYPYPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )


@pytest.mark.slow
def test_a_sample_pos_application_type_checks_strictly_against_the_library(installed_layout):
    """mypy --strict on the example POS applications sees txengine's own types, not Any."""
    result = mypy_strict(installed_layout, "-p", "examples", "--exclude", "django_pos")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_public_api_type_checks_strictly(installed_layout):
    """Every public signature is annotated and consistent: no error, no Any leaking out."""
    result = mypy_strict(installed_layout, *(arg for module in STRICT_MODULES for arg in ("-m", module)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found"), result.stdout


@pytest.mark.slow
def test_a_pos_misusing_the_api_is_told_by_the_type_checker(installed_layout):
    """The annotations are precise enough to catch what a POS gets wrong, before it runs."""
    (installed_layout / "misuse.py").write_text(
        "from txengine import Engine, TxState\n"
        "from txengine.providers.cheers import CheersDriver\n"
        "driver = CheersDriver(api_key='k', environment='sandbox')\n"
        "engine = Engine.open('sqlite:///t.db', {'cheers': driver}, intent_lease=30)\n"
        "tx = engine.get('tx_1')\n"
        "if tx.state is TxState.finalised:\n"
        "    engine.refund(tx.id, comment=42)\n"
    )
    result = mypy_strict(installed_layout, "misuse.py")
    errors = [line.split(": error: ")[1] for line in result.stdout.splitlines() if ": error: " in line]
    assert any('"intent_lease"' in error and '"int"' in error for error in errors), result.stdout
    assert any('TxState]" has no attribute "finalised"' in error for error in errors), result.stdout
    assert any('"comment"' in error and '"int"' in error for error in errors), result.stdout
    assert len(errors) == 3, result.stdout
