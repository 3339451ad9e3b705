"""The diagrams are generated from the machine and the drivers, and diagrams/ is fresh."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import attrs
import pytest

from txengine import diagrams, machine
from txengine.cli import main as txengine
from txengine.drivers import Capabilities
from txengine.errors import OutcomeUnknown, ProviderRejected
from txengine.machine import TimerPolicy
from txengine.testing.sandbox import Fault

from .conftest import CUSTOMER, tip

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "diagrams"
REAL_PROVIDERS = ("cheers", "rekonect", "forloy", "secuconnect")


@pytest.fixture(scope="session")
def dot() -> str:
    """Graphviz's ``dot``, installed the way ``make diagrams`` does when missing."""
    try:
        return diagrams.ensure_dot(install=True)
    except diagrams.GraphvizMissing as missing:
        pytest.skip(f"Graphviz cannot be installed here (not root, or no apt-get): {missing}")


def svg_texts(svg: str) -> set[str]:
    return {html.unescape(text) for text in re.findall(r"<text[^>]*>([^<]*)</text>", svg)}


def edge(diagram: diagrams.Diagram, source: str, event: str) -> diagrams.Edge:
    (found,) = [e for e in diagram.edges if (e.source, e.event) == (source, event)]
    return found


# --- diagrams/ is what the machine gives today -------------------------------------------------


class TestCommitted:
    def test_mermaid_and_dot_files_are_fresh(self):
        stale = diagrams.stale(COMMITTED)
        assert not stale, f"diagrams/ is stale ({', '.join(stale)}): run `make diagrams`"

    def test_the_inline_lifecycle_blocks_are_fresh(self):
        stale = diagrams.stale_markdown()
        assert not stale, f"the lifecycle in {', '.join(stale)} is stale: run `make diagrams`"
        docs = (ROOT / "docs" / "diagrams.md").read_text(encoding="utf-8")
        assert f"```mermaid\n{diagrams.to_mermaid(diagrams.lifecycle())}```" in docs

    def test_embedding_rewrites_only_between_the_markers(self, tmp_path):
        page = f"# Title\n\n{diagrams.BEGIN}\nold\n{diagrams.END}\n\nafter\n"
        (tmp_path / "README.md").write_text(page, encoding="utf-8")
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "diagrams.md").write_text("no markers\n", encoding="utf-8")
        assert diagrams.stale_markdown(tmp_path) == ["README.md"]
        assert diagrams.refresh_markdown(tmp_path) == [tmp_path / "README.md"]
        refreshed = (tmp_path / "README.md").read_text(encoding="utf-8")
        assert refreshed.startswith("# Title\n\n") and refreshed.endswith(f"{diagrams.END}\n\nafter\n")
        assert "stateDiagram-v2" in refreshed and "old" not in refreshed
        assert diagrams.stale_markdown(tmp_path) == []

    def test_the_lifecycle_and_every_real_provider_are_there(self):
        for name in ("lifecycle", *REAL_PROVIDERS):
            for suffix in (".mmd", ".dot", ".svg"):
                assert (COMMITTED / f"{name}{suffix}").is_file(), f"{name}{suffix} missing"

    def test_every_svg_shows_the_labels_of_its_dot_file(self):
        # Byte equality would tie the check to one Graphviz version and its fonts; the
        # words are what goes stale.
        for diagram in diagrams.committed():
            texts = svg_texts((COMMITTED / f"{diagram.name}.svg").read_text(encoding="utf-8"))
            assert diagram.title in texts
            for drawn in diagrams.layout(diagram.edges):
                for _, line in diagrams.label_rows(drawn.edge):
                    assert line in texts, f"{diagram.name}.svg lacks {line!r}: run `make diagrams`"

    def test_check_mode_names_a_stale_file_and_fails(self, tmp_path, capsys):
        for name, text in diagrams.text_files().items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        assert diagrams.main(["--check", str(tmp_path)]) == 0
        (tmp_path / "cheers.dot").write_text("digraph {}\n", encoding="utf-8")
        (tmp_path / "forloy.mmd").unlink()
        assert diagrams.main(["--check", str(tmp_path)]) == 1
        assert "cheers.dot" in capsys.readouterr().err
        assert diagrams.stale(tmp_path) == ["cheers.dot", "forloy.mmd"]


# --- labels come from the machine's guard and effect names ------------------------------------


class TestLabels:
    def test_every_guard_and_effect_of_the_machine_has_a_label_and_no_label_is_stale(self):
        guards = {check.name for rule in machine.TABLE.values() for check in rule.guards}
        effects = {effect.name for rule in machine.TABLE.values() for effect in rule.effects}
        assert guards == set(diagrams.GUARD_LABELS)
        assert effects == set(diagrams.EFFECT_LABELS)

    def test_templates_only_name_timer_policy_fields(self):
        fields = {field.name for field in attrs.fields(TimerPolicy)}
        for template in (*diagrams.GUARD_LABELS.values(), *diagrams.EFFECT_LABELS.values()):
            assert set(re.findall(r"{(\w+)}", template)) <= fields, template

    def test_a_guard_without_a_label_fails_loudly(self, monkeypatch):
        unlabelled = {k: v for k, v in diagrams.GUARD_LABELS.items() if k != "has_outstanding"}
        monkeypatch.setattr(diagrams, "GUARD_LABELS", unlabelled)
        with pytest.raises(LookupError, match="'has_outstanding' has no label"):
            diagrams.lifecycle()

    def test_the_lifecycle_names_its_timers(self):
        lifecycle = diagrams.lifecycle()
        preview = edge(lifecycle, "new", "preview")
        assert (preview.head, preview.effect) == ("preview", "expires_at = now + preview_ttl")
        update = edge(lifecycle, "updated", "update")
        assert (update.head, update.effect) == ("update [now < expires_at]", "expires_at += update_extension")
        finalize = edge(lifecycle, "payment_pending", "finalize")
        assert finalize.text_lines() == (
            "finalize [now < expires_at]", "/ refund_deadline = now + refund_window")
        assert edge(lifecycle, "previewed", "begin_payment").guard == (
            "now < expires_at and outstanding > 0")
        assert edge(lifecycle, "finalized", "refund").head == "refund [before finalized_at + refund_window]"
        assert edge(lifecycle, "updated", "expire").head == "expire [now >= expires_at]"
        assert edge(lifecycle, "previewed", "cancel").text_lines() == ("cancel",)
        assert {(e.source, e.event, e.target) for e in lifecycle.edges} == {
            (rule.source, rule.event, rule.target) for rule in machine.TABLE.values()}

    def test_a_provider_shows_its_timer_values_and_its_calls(self):
        cheers = diagrams.provider("cheers")
        update = edge(cheers, "previewed", "update")
        assert update.text_lines() == (
            "update [now < expires_at]", "/ expires_at += 10 min",
            "POST /v1/integrations/credit-transactions/{id}/update")
        assert edge(cheers, "new", "preview").calls == ("POST /v3/integrations/credit-transactions/preview",)
        finalize = edge(cheers, "payment_pending", "finalize")
        assert finalize.text_lines()[:2] == ("finalize [now < expires_at]", "/ refund_deadline = now + 24 h")
        refund = edge(cheers, "finalized", "refund")
        assert refund.text_lines() == (
            "refund [before finalized_at + 24 h]", "POST /v1/integrations/credit-transactions/{id}/refund")
        assert edge(cheers, "updated", "begin_payment").calls == ("local",)
        expire = edge(cheers, "previewed", "expire")
        assert expire.calls == ("local",)
        assert expire.deferred == (("release", "POST /v1/integrations/credit-transactions/{id}/cancel"),)

    def test_timer_values_come_from_the_drivers_policy(self):
        class Quick:
            name = "quick"
            capabilities = Capabilities(
                remote={"preview", "finalize"}, local={"begin_payment", "update", "cancel", "refund"},
                timers=TimerPolicy(preview_ttl=timedelta(minutes=15), update_extension=timedelta(seconds=90),
                                   refund_window=timedelta(hours=2)))
            calls = {"preview": "POST /p", "finalize": "POST /f"}

        quick = diagrams.provider(Quick)
        assert edge(quick, "new", "preview").effect == "expires_at = now + 15 min"
        assert edge(quick, "previewed", "update").effect == "expires_at += 90 s"
        assert edge(quick, "finalized", "refund").head == "refund [before finalized_at + 2 h]"
        assert "preview 15 min" in quick.title

    def test_a_remote_event_without_its_call_fails_loudly(self):
        class Silent:
            name = "silent"
            capabilities = Capabilities(remote={"preview", "finalize"})
            calls = {"preview": "POST /p"}

        with pytest.raises(LookupError, match="silent driver's `calls` has no entry for 'finalize'"):
            diagrams.provider(Silent)

    @pytest.mark.parametrize("name", [*REAL_PROVIDERS, "reference"])
    def test_each_driver_names_the_call_of_every_remote_event_and_delivery(self, name):
        driver = diagrams.load_driver_class(name)
        capabilities = driver.capabilities
        kinds = {kind for event_kinds in capabilities.deferred.values() for kind in event_kinds}
        assert set(driver.calls) >= set(capabilities.remote) | kinds
        # the rest are deliveries of another mode (Forloy offline records): never a local event
        assert not set(driver.calls) & (set(machine.EVENTS) - set(capabilities.remote))
        for call in driver.calls.values():
            assert re.match(r"(GET|POST|PUT|DELETE|PATCH) /", call), call

    @pytest.mark.parametrize("name", [*REAL_PROVIDERS, "reference"])
    def test_unsupported_events_are_absent_and_said_so(self, name):
        driver = diagrams.load_driver_class(name)
        diagram = diagrams.provider(name)
        unsupported = set(machine.EVENTS) - driver.capabilities.supported
        assert {e.event for e in diagram.edges} == set(machine.EVENTS) - unsupported
        mermaid, dot = diagrams.to_mermaid(diagram), diagrams.to_dot(diagram)
        for event in unsupported:
            assert not re.search(rf"--> \w+ : {event}\b", mermaid)
            assert f"<b>{event}</b>" not in dot
            assert any(f"{event} is not supported by {name}" in line for note in diagram.notes
                       for line in note.lines)
        for event in set(machine.EVENTS) - unsupported:
            assert f"<b>{event}</b>" in dot

    def test_forloy_has_no_refund_and_no_refunded_state(self):
        forloy = diagrams.provider("forloy")
        assert "refund" not in {e.event for e in forloy.edges}
        assert "refunded" not in forloy.states
        assert "refunded" not in diagrams.to_mermaid(forloy)
        assert '"refunded"' not in diagrams.to_dot(forloy)
        assert edge(forloy, "new", "preview").calls == ("POST /api/v1/cards/lookup",)
        assert edge(forloy, "payment_pending", "finalize").calls == ("POST /api/v1/transactions/record",)
        assert edge(forloy, "previewed", "update").calls == ("local",)
        assert edge(forloy, "updated", "cancel").calls == ("local",)

    def test_a_driver_instance_may_differ_from_its_class(self):
        from txengine.providers.forloy import ForloyDriver

        offline = ForloyDriver(environment="production", email="staff@example.com", password="pw", location_id="loc-1",
                               staff_user_id="staff-1", offline=True)
        finalize = edge(diagrams.provider(offline), "updated", "finalize")
        assert finalize.calls == ("local",)
        assert finalize.deferred == (("record", "POST /api/v1/transactions/sync (up to 100 a batch)"),)

    def test_rekonect_defers_its_purchase_submit_and_refunds_with_two_calls(self):
        rekonect = diagrams.provider("rekonect")
        finalize = edge(rekonect, "previewed", "finalize")
        assert finalize.deferred == (("submit", "POST /v1/transaction (submit)"),)
        assert edge(rekonect, "finalized", "refund").calls == (
            "POST /v1/transaction (submit, cancel)", "POST /v1/payment (cancel) when paid")
        assert edge(rekonect, "previewed", "cancel").calls == ("local",)

    def test_secuconnect_aborts_on_cancel_and_expiry_and_cancels_on_refund(self):
        secuconnect = diagrams.provider("secuconnect")
        assert edge(secuconnect, "previewed", "cancel").calls == ("POST /api/v2/Smart/Transactions/{id}/abort",)
        assert edge(secuconnect, "finalized", "refund").calls == (
            "POST /api/v2/Smart/Transactions/{id}/cancel",)
        assert edge(secuconnect, "updated", "expire").deferred == (
            ("release", "POST /api/v2/Smart/Transactions/{id}/abort"),)


# --- the text forms ------------------------------------------------------------------------------


class TestFormats:
    def test_generating_twice_gives_the_same_bytes(self):
        assert diagrams.text_files() == diagrams.text_files()

    def test_another_process_with_another_hash_seed_gives_the_same_bytes(self):
        script = "import json, engine.diagrams as d; print(json.dumps(d.text_files()))"
        env = {**os.environ, "PYTHONHASHSEED": "12345"}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True)
        import json

        assert json.loads(done.stdout) == diagrams.text_files()

    def test_svg_is_deterministic(self, dot):
        text = diagrams.to_dot(diagrams.provider("cheers"))
        assert diagrams.render(text, "svg", dot=dot) == diagrams.render(text, "svg", dot=dot)

    def test_mermaid_is_a_state_diagram_with_the_initial_and_final_states(self):
        mermaid = diagrams.to_mermaid(diagrams.lifecycle())
        lines = [line.strip() for line in mermaid.splitlines()]
        assert "stateDiagram-v2" in lines
        assert "[*] --> new" in lines
        assert {"cancelled --> [*]", "refunded --> [*]", "expired --> [*]"} <= set(lines)
        assert "finalized --> [*]" not in lines
        # the composite is entered at previewed, and left by every open state's exits
        assert "[*] --> previewed" in lines
        assert "new --> open : preview<br>/ expires_at = now + preview_ttl" in lines
        assert "open --> cancelled : cancel" in lines
        for line in lines:  # Mermaid's grammar: a transition's text holds no ":" or ";"
            if " --> " in line and " : " in line:
                assert ":" not in line.split(" : ", 1)[1] and ";" not in line

    def test_dot_draws_terminal_states_as_final_and_every_transition(self):
        text = diagrams.to_dot(diagrams.lifecycle())
        for state in machine.TERMINAL:
            assert f'"{state}" [peripheries=2' in text
        assert '"__initial__" -> "new";' in text
        assert text.count("<b>finalize</b>") == 1  # drawn once, from the open composite
        assert 'ltail="cluster_open"' in text
        assert text.count("<b>update</b>") == 2  # previewed -> updated, and the loop

    def test_svg_and_png_render(self, dot):
        text = diagrams.to_dot(diagrams.provider("secuconnect"))
        svg = diagrams.render(text, "svg", dot=dot).decode()
        assert "POST /api/v2/Smart/Transactions/{id}/abort" in svg_texts(svg)
        assert diagrams.render(text, "png", dot=dot).startswith(b"\x89PNG")


# --- one transaction's path -------------------------------------------------------------------------


@pytest.fixture
def travelled(engine, sandbox, basket, clock):
    """preview, update twice, begin_payment, finalize (unknown, then rejected, then done), refund."""
    tx = engine.preview("reference", basket, customer_token=CUSTOMER)
    clock.advance(minutes=2)
    engine.update(tx.id, [tip()])
    clock.advance(minutes=1)
    engine.update(tx.id, [tip(50)])
    clock.advance(seconds=30)
    engine.begin_payment(tx.id)
    clock.advance(seconds=40)
    sandbox.faults.inject("finalize", Fault.SERVER_ERROR)
    with pytest.raises(OutcomeUnknown):
        engine.finalize(tx.id, idempotency_key="f1")
    wallet = sandbox.wallets[CUSTOMER]
    sandbox.wallets[CUSTOMER] = 0
    clock.advance(seconds=20)
    with pytest.raises(ProviderRejected):
        engine.finalize(tx.id, idempotency_key="f1")
    sandbox.wallets[CUSTOMER] = wallet
    clock.advance(seconds=15)
    engine.finalize(tx.id, idempotency_key="f2")
    clock.advance(hours=3)
    engine.refund(tx.id, comment="returned")
    return engine.get(tx.id)


class TestTransaction:
    def test_the_path_taken_is_numbered_and_timed(self, engine, travelled):
        diagram = diagrams.transaction(travelled, engine.history(travelled.id))
        taken = {(e.source, e.event): [m.text for m in e.marks if m.kind == "step"]
                 for e in diagram.edges if e.style == "taken"}
        assert taken == {
            ("new", "preview"): ["(1) 10:00:00, expires_at 10:10:00"],
            ("previewed", "update"): ["(2) 10:02:00, expires_at 10:20:00"],
            ("updated", "update"): ["(3) 10:03:00, expires_at 10:30:00"],
            ("updated", "begin_payment"): ["(4) 10:03:30"],
            ("payment_pending", "finalize"): ["(5) 10:04:45, refund_deadline 2026-01-16 10:04:45"],
            ("finalized", "refund"): ["(6) 13:04:45"],
        }
        assert diagram.current == "refunded"
        assert diagram.visited == {"new", "previewed", "updated", "payment_pending", "finalized", "refunded"}
        assert all(not e.marks for e in diagram.edges if e.style == "idle")
        assert edge(diagram, "previewed", "cancel").style == "idle"

    def test_refused_and_unknown_attempts_are_marked_where_they_happened(self, engine, travelled):
        diagram = diagrams.transaction(travelled, engine.history(travelled.id))
        finalize = edge(diagram, "payment_pending", "finalize")
        assert [(m.kind, m.text.split(" (")[0]) for m in finalize.marks] == [
            ("unknown", "10:04:10 outcome unknown"),
            ("rejected", "10:04:30 rejected INSUFFICIENT_CREDIT"),
            ("step", "(5) 10:04:45, refund_deadline 2026-01-16 10:04:45"),
        ]
        assert "HTTP 503" in finalize.marks[0].text

    def test_mermaid_and_dot_highlight_the_path(self, engine, travelled):
        diagram = diagrams.transaction(travelled, engine.history(travelled.id))
        mermaid = diagrams.to_mermaid(diagram)
        assert "open --> finalized : finalize<br>10\u223604\u223610 outcome unknown" in mermaid
        assert "class refunded current" in mermaid
        assert "class new,previewed,updated,payment_pending,finalized visited" in mermaid
        assert f"txengine diagram --tx {travelled.id}" in mermaid
        dot = diagrams.to_dot(diagram)
        assert dot.count("penwidth=2.5") >= 6  # the taken edges, and the current state
        assert "(6) 13:04:45" in dot
        assert "10:04:30 rejected INSUFFICIENT_CREDIT" in dot

    def test_a_call_in_doubt_is_marked_on_its_edge(self, engine, sandbox, basket):
        tx = engine.preview("reference", basket, customer_token=CUSTOMER)
        sandbox.faults.inject("finalize", Fault.TIMEOUT_AFTER_COMMIT)
        with pytest.raises(OutcomeUnknown):
            engine.finalize(tx.id)
        tx = engine.get(tx.id)
        diagram = diagrams.transaction(tx, engine.history(tx.id))
        finalize = edge(diagram, "previewed", "finalize")
        assert finalize.style == "tried"
        assert finalize.marks[-1].text == "in doubt: recover() or a retry re-sends it"
        assert diagram.current == "previewed"

    def test_on_a_providers_diagram_unsupported_events_stay_absent(self, engine, travelled):
        base = diagrams.provider("reference")
        diagram = diagrams.transaction(travelled, engine.history(travelled.id), base)
        assert {e.event for e in diagram.edges} == {e.event for e in base.edges}

    def test_the_cli_writes_every_format(self, db_url, travelled, dot, tmp_path, capsys):
        assert txengine(["diagram", "--tx", travelled.id, "--db", db_url]) == 0
        assert "(6) 13\u223604\u223645" in capsys.readouterr().out
        for fmt in ("dot", "svg", "png"):
            target = tmp_path / f"tx.{fmt}"
            assert txengine(["diagram", "--tx", travelled.id, "--db", db_url, "--format", fmt,
                             "--output", str(target)]) == 0
            assert target.stat().st_size > 0
        assert "(6) 13:04:45" in svg_texts((tmp_path / "tx.svg").read_text())
        db_path = db_url.removeprefix("sqlite:///")
        assert txengine(["diagram", "--tx", travelled.id, "--db", db_path, "--format", "dot"]) == 0
        assert "(1) 10:00:00" in capsys.readouterr().out

    def test_the_cli_says_what_is_wrong(self, db_url, travelled, tmp_path, capsys):
        assert txengine(["diagram", "--tx", "tx_nope", "--db", db_url]) == 1
        assert "no transaction tx_nope" in capsys.readouterr().err
        assert txengine(["diagram", "--tx", travelled.id, "--db", db_url, "--provider", "cheers"]) == 1
        assert "is a reference transaction, not cheers" in capsys.readouterr().err
        assert txengine(["diagram", "--tx", travelled.id, "--db", str(tmp_path / "none.db")]) == 2  # a missing database is configuration: exit 2 everywhere
        assert "no database" in capsys.readouterr().err


# --- the CLI and Graphviz -----------------------------------------------------------------------------


class TestCommandLine:
    def test_text_formats_go_to_stdout(self, capsys):
        assert txengine(["diagram"]) == 0
        assert capsys.readouterr().out == diagrams.to_mermaid(diagrams.lifecycle())
        assert txengine(["diagram", "--provider", "forloy", "--format", "dot"]) == 0
        assert capsys.readouterr().out == diagrams.to_dot(diagrams.provider("forloy"))

    def test_output_writes_a_file(self, tmp_path, dot):
        target = tmp_path / "cheers.svg"
        assert txengine(["diagram", "--provider", "cheers", "--format", "svg", "--output", str(target)]) == 0
        assert "POST /v3/integrations/credit-transactions/preview" in svg_texts(target.read_text())

    def test_without_graphviz_svg_says_what_to_install_and_text_still_works(self, monkeypatch, capsys):
        monkeypatch.setattr(diagrams.shutil, "which", lambda name: None)
        assert txengine(["diagram", "--format", "svg"]) == 2
        assert "apt-get install graphviz" in capsys.readouterr().err
        assert txengine(["diagram", "--format", "dot"]) == 0

    def test_ensure_dot_installs_graphviz_with_apt_as_root(self, monkeypatch):
        commands = []
        installed = []
        monkeypatch.setattr(diagrams.shutil, "which",
                            lambda name: "/usr/bin/" + name if name == "apt-get" or installed else None)
        monkeypatch.setattr(diagrams.os, "geteuid", lambda: 0)

        def run(command, **options):
            commands.append(command)
            if command[:2] == ["apt-get", "install"]:
                installed.append(True)

        monkeypatch.setattr(diagrams.subprocess, "run", run)
        assert diagrams.ensure_dot(install=True) == "/usr/bin/dot"
        assert commands == [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "graphviz"]]

    def test_ensure_dot_does_not_install_unless_root(self, monkeypatch):
        monkeypatch.setattr(diagrams.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
        monkeypatch.setattr(diagrams.os, "geteuid", lambda: 1000)
        monkeypatch.setattr(diagrams.subprocess, "run", lambda *a, **k: pytest.fail("ran apt-get"))
        with pytest.raises(diagrams.GraphvizMissing, match="sudo apt-get install graphviz"):
            diagrams.ensure_dot(install=True)

    def test_write_produces_every_committed_file(self, tmp_path, dot):
        assert diagrams.main(["--write", str(tmp_path)]) == 0
        written = sorted(path.name for path in tmp_path.iterdir())
        assert written == sorted(path.name for path in COMMITTED.iterdir())
        assert diagrams.stale(tmp_path) == []
