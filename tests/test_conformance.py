"""The driver conformance check: it passes the five bundled drivers and catches each
deliberately broken one for the reason it is broken, and for no other."""

from __future__ import annotations

import itertools

import attrs
import pytest

from txengine.errors import ProviderRejected
from txengine.models import Outcome, PricedLine, Quote
from txengine.money import Money
from txengine.testing import Finding, assert_conformant, check_driver
from txengine.testing.harnesses import bundled
from txengine.providers.reference_harness import ReferenceHarness
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox


class Harness(ReferenceHarness):
    """The reference provider's sandbox, with a driver class of the test's choosing."""

    def __init__(self, driver_class: type[ReferenceDriver]) -> None:
        self.driver_class = driver_class

    def make_driver(self, sandbox, *, transport, clock):
        return self.driver_class(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=transport)

    def __repr__(self) -> str:
        return f"Harness({self.driver_class.__name__})"


# --- deliberately broken drivers ------------------------------------------------------------------


class RefundsItCannotDo(ReferenceDriver):
    """Declares refund (inherited capabilities) but has no implementation of it."""

    def refund(self, tx, key, comment):
        raise NotImplementedError("refunds are not implemented yet")


class RefundsAtAMissingEndpoint(ReferenceDriver):
    """Declares refund, but calls an endpoint this provider does not have."""

    def refund(self, tx, key, comment):
        return (yield from self._commit(tx, "void", key, {"comment": comment}))


class CancelsLocallyButNeedsTheProvider(ReferenceDriver):
    """Declares cancel local, yet its cancel talks to the provider: the engine would
    never send it, and the provider's preview would stay open."""

    capabilities = attrs.evolve(
        ReferenceDriver.capabilities,
        remote=ReferenceDriver.capabilities.remote - {"cancel"},
        local=ReferenceDriver.capabilities.local | {"cancel"},
    )


class KeyInAHeaderTheProviderIgnores(ReferenceDriver):
    """Keeps its idempotency key on retry, but sends it where the provider does not look:
    every retry after a lost answer is a second commit."""

    def _post(self, path, body=None, idempotency_key=None):
        request = super()._post(path, body)
        if idempotency_key:
            request.headers["X-Request-Idempotency-Key"] = idempotency_key
        return request


class FreshKeyEveryAttempt(ReferenceDriver):
    """Mints a new idempotency key for every request it sends."""

    attempts = itertools.count()

    def _post(self, path, body=None, idempotency_key=None):
        if idempotency_key:
            idempotency_key = f"{idempotency_key}~{next(self.attempts)}"
        return super()._post(path, body, idempotency_key)


class FinalizesTwice(ReferenceDriver):
    """Sends finalize twice in one attempt: the provider replays the second, so only the
    requests counted at the transport show it."""

    def finalize(self, tx, key):
        yield self._post(f"/previews/{tx.provider_ref}/finalize", None, key)
        return (yield from super().finalize(tx, key))


class CancelsWithoutAsking(ReferenceDriver):
    """Declares cancel remote, and tells the engine it is done without a word to the provider."""

    def cancel(self, tx, key):
        return Outcome(provider_ref=tx.provider_ref, details={})
        yield  # pragma: no cover


class TrustsAnySuccessStatus(ReferenceDriver):
    """Takes any 2xx answer to finalize for a commit (the lax reading of #10)."""

    def finalize(self, tx, key):
        response = yield self._post(f"/previews/{tx.provider_ref}/finalize", None, key)
        if response.is_success:
            return Outcome(provider_ref=tx.provider_ref, details={})
        self._answer(response, "finalize")  # raises: rejected, or unknown


class TakesAServerErrorForSuccess(ReferenceDriver):
    """Reports a finalize done when the provider answers 503 (it hoped the provider went on)."""

    def finalize(self, tx, key):
        response = yield self._post(f"/previews/{tx.provider_ref}/finalize", None, key)
        if response.status_code >= 500:
            return Outcome(provider_ref=tx.provider_ref, details={})
        self._view(response, "finalize", status="finalized", preview_id=tx.provider_ref, lines=len(tx.items))
        return Outcome(provider_ref=tx.provider_ref, details={})


class GivesUpOnAServerError(ReferenceDriver):
    """Reads a 5xx as a refusal: after a commit whose answer was a 503 the engine says failed."""

    def _answer(self, response, where):
        if response.status_code >= 500:
            raise self.rejected("UNAVAILABLE", "the provider is unavailable")
        return super()._answer(response, where)


class WorksOutTheRest(ReferenceDriver):
    """Reads each line's discount and outstanding amount (as numbers, whatever their JSON type)
    and works out the credits itself, so a quote that does not add up still adds up."""

    def _quote(self, answer, currency, sent):
        lines = []
        for item, line in zip(sent, answer.objects("items")):
            discount = Money(int(line.raw("discount")), currency)
            outstanding = Money(int(line.raw("outstanding")), currency)
            lines.append(PricedLine(item=item, discount=discount, credits=item.gross - discount - outstanding,
                                    outstanding=outstanding))
        return Quote(lines=lines, provider_ref=answer.text("id"))


def checks(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(finding.check, finding.event) for finding in findings}


# --- the bundled drivers conform ----------------------------------------------------------------------


@pytest.mark.parametrize("harness", bundled(), ids=repr)
def test_the_bundled_drivers_conform(harness):
    assert check_driver(harness) == []


def test_the_reference_driver_conforms_through_its_subclass_harness_too():
    assert_conformant(Harness(ReferenceDriver))


# --- each broken driver is caught, for its own reason ----------------------------------------------------


@pytest.mark.parametrize("driver_class", [RefundsItCannotDo, RefundsAtAMissingEndpoint])
def test_a_driver_declaring_an_event_it_cannot_do_is_caught(driver_class):
    findings = check_driver(Harness(driver_class))
    assert ("capabilities", "refund") in checks(findings)
    assert {check for check, _ in checks(findings)} <= {"capabilities", "errors"}, findings


def test_the_unimplemented_event_is_reported_as_the_bare_error_it_leaks():
    [finding] = [f for f in check_driver(Harness(RefundsItCannotDo)) if f.check == "capabilities"]
    assert "NotImplementedError" in finding.detail


def test_a_driver_calling_the_provider_for_an_event_it_declares_local_is_caught():
    findings = check_driver(Harness(CancelsLocallyButNeedsTheProvider))
    assert checks(findings) == {("capabilities", "cancel")}
    assert "POST /previews/" in findings[0].detail and "/cancel" in findings[0].detail


def test_a_driver_that_double_commits_on_retry_is_caught_though_its_keys_are_stable():
    findings = check_driver(Harness(KeyInAHeaderTheProviderIgnores))
    found = checks(findings)
    assert ("exactly-once", "preview") in found  # a second preview after a lost answer
    assert ("exactly-once", "deliver") in found  # a second receipt after a lost answer
    assert not any(check == "idempotency-key" for check, _ in found), findings


def test_a_driver_losing_its_idempotency_key_on_retry_is_caught():
    findings = check_driver(Harness(FreshKeyEveryAttempt))
    found = checks(findings)
    assert ("idempotency-key", "preview") in found
    assert ("idempotency-key", "deliver") in found
    [finding] = [f for f in findings if (f.check, f.event) == ("idempotency-key", "preview")]
    assert "POST /previews" in finding.detail and "~" in finding.detail


def test_assert_conformant_lists_every_finding():
    with pytest.raises(AssertionError) as failed:
        assert_conformant(Harness(FreshKeyEveryAttempt))
    message = str(failed.value)
    assert "Harness(FreshKeyEveryAttempt)'s driver does not conform" in message
    assert message.count("\n- [") == len(check_driver(Harness(FreshKeyEveryAttempt)))


def test_a_rejection_on_the_happy_path_is_a_finding_not_a_crash():
    class RefusesEveryFinalize(ReferenceDriver):
        def finalize(self, tx, key):
            raise ProviderRejected("closed for the day", code="CLOSED", provider=self.name)
            yield  # pragma: no cover

    findings = check_driver(Harness(RefusesEveryFinalize))
    assert ("capabilities", "finalize") in checks(findings)


# --- faults before and after the provider commits, judged by the ledger and the wire ------------------


def test_a_driver_sending_finalize_twice_in_one_attempt_is_caught_at_the_transport():
    findings = check_driver(Harness(FinalizesTwice))
    assert ("double-send", "finalize") in checks(findings)
    [finding] = [f for f in findings if (f.check, f.event) == ("double-send", "finalize")]
    assert "POST /previews/pv_" in finding.detail and "/finalize twice" in finding.detail


def test_a_remote_event_that_sends_nothing_is_caught():
    findings = check_driver(Harness(CancelsWithoutAsking))
    assert ("double-send", "cancel") in checks(findings)
    assert any("sent no request" in f.detail for f in findings)


def details(findings: list[Finding], event: str) -> str:
    return "\n".join(f.detail for f in findings if f.event == event)


def test_a_driver_taking_any_2xx_for_a_commit_is_caught_before_and_after_the_commit():
    findings = check_driver(Harness(TrustsAnySuccessStatus))
    assert details(findings, "finalize") == (
        "after EMPTY_BEFORE_COMMIT on 'finalize' the engine reports finalize done, but the provider holds no new"
        " 'finalize' commit: a success reported without a commit")


def test_a_driver_taking_a_spoiled_quote_for_a_price_is_caught_by_what_it_records():
    findings = check_driver(Harness(WorksOutTheRest))
    found = details(findings, "preview")
    assert "after WRONG_TOTALS_AFTER_COMMIT on 'preview' the engine recorded" in found
    assert "a spoiled answer taken for a success" in found


def test_a_driver_reporting_success_after_a_5xx_is_caught_though_the_sandbox_would_replay():
    findings = check_driver(Harness(TakesAServerErrorForSuccess))
    assert "SERVER_ERROR on 'finalize' the engine reports finalize done, but the provider holds no new" \
        in details(findings, "finalize")


def test_a_driver_reporting_a_commit_as_a_failure_is_caught():
    findings = check_driver(Harness(GivesUpOnAServerError))
    found = details(findings, "finalize")
    assert "SERVER_ERROR_AFTER_COMMIT on 'finalize' the engine reports finalize failed, but the provider" \
           " committed it" in found
    assert "a commit reported as a failure" in found


def test_the_bundled_faults_cover_before_and_after_the_commit():
    from txengine.testing.conformance import DEFAULT_FAULTS
    from txengine.testing.sandbox import Fault

    assert {fault.before_commit for fault in DEFAULT_FAULTS} == {True, False}
    assert {Fault.WRONG_IDS_AFTER_COMMIT, Fault.WRONG_TYPES_AFTER_COMMIT, Fault.WRONG_TOTALS_AFTER_COMMIT,
            Fault.HUGE_AFTER_COMMIT, Fault.EMPTY_OBJECT_BEFORE_COMMIT} <= set(DEFAULT_FAULTS)
