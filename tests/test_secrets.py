"""After a full POS session with every provider, no secret is anywhere we keep or show things:
the database files, the logs, the printed output, exception messages and reprs."""

import json
import logging
import pathlib

from txengine import Basket, Engine, FakeClock, LineItem, Money
from txengine.demo import demo_pairs, run_sessions
from txengine.errors import EngineError
from txengine.providers.forloy.sandbox import ForloySandbox
from txengine.testing.sandbox import Fault

SECRET_HEADERS = ("authorization", "authenticate", "x-api-key", "x-transaction-key")
SECRET_BODY_FIELDS = ("password", "client_secret", "refresh_token", "qr_code_data", "barcode_value", "customer")


def secrets_seen_by_providers(pairs) -> set[str]:
    """Every credential, token and customer key that actually crossed the wire."""
    found: set[str] = set()
    for sandbox, _ in pairs.values():
        for request in sandbox.requests:
            for name in SECRET_HEADERS:
                if request.header(name):
                    found.add(request.header(name).split(" ", 1)[-1])
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                continue
            if isinstance(body, dict):
                found.update(str(body[field]) for field in SECRET_BODY_FIELDS if body.get(field))
                found.update(str(ident.get("value")) for ident in body.get("idents") or [])
                member = body.get("member") or {}
                found.update(str(v) for k, v in member.items() if k == "phoneNumber")
    return {secret for secret in found if len(secret) >= 8}


def test_no_secret_reaches_the_database_logs_output_errors_or_reprs(tmp_path, caplog):
    clock = FakeClock()
    pairs = demo_pairs(clock)
    printed: list[str] = []
    errors: list[EngineError] = []
    caplog.set_level(logging.DEBUG)
    with Engine.open(f"sqlite:///{tmp_path / 'txengine.db'}", providers={n: p[1] for n, p in pairs.items()},
                     clock=clock) as engine:
        assert run_sessions(engine, pairs, clock, printed.append)

        # the failure paths too: their messages are shown and their notes journaled
        for sandbox, _ in pairs.values():
            sandbox.faults.inject("*", Fault.TIMEOUT_AFTER_COMMIT, times=50)
        lunch = Basket([LineItem("30037", "Sandwich", 1, Money(349, "EUR"), 7)])
        forints = Basket([LineItem(None, "Beer", 1, Money(50000, "HUF"), 27)])
        for provider, basket, customer in (
            ("cheers", forints, "0" * 31 + "g"),  # malformed QR: refused before any call
            ("cheers", forints, "0" * 32),
            ("secuconnect", lunch, "9276004429942845"),
            ("forloy", lunch, ForloySandbox(clock).add_discount_card().qr_code_data),
            ("rekonect", lunch, "5511122233"),
        ):
            try:
                engine.preview(provider, basket, customer_token=customer)
            except EngineError as error:
                errors.append(error)
        reprs = [repr(engine)] + [repr(driver) for _, driver in pairs.values()]
        reprs += [repr(engine.get(i)) + repr(engine.history(i)) for i in engine.store.transaction_ids()]
    assert len(errors) == 5, "every failure path ran"

    secrets = secrets_seen_by_providers(pairs) | {ForloySandbox.STAFF_PASSWORD, "9276004429942845", "5511122233"}
    kinds = {"cheers-sandbox-terminal-key", "5ccd7850844b415091071c027930101f", "sandbox-client-secret"}
    assert kinds <= secrets, "the scan knows the session's credentials and customer keys"
    assert len(secrets) >= 12, sorted(s[:4] for s in secrets)

    stored = b"".join(path.read_bytes() for path in pathlib.Path(tmp_path).glob("txengine.db*"))
    shown = "\n".join(printed + [record.getMessage() for record in caplog.records]
                      + [str(error) for error in errors] + reprs)
    for secret in secrets:
        assert secret.encode() not in stored, f"a secret ({secret[:3]}...) is in the database"
        assert secret not in shown, f"a secret ({secret[:3]}...) is in the logs, output, errors or reprs"
