"""The driver conformance check: it passes the five bundled drivers and catches each
deliberately broken one for the reason it is broken, and for no other."""

from __future__ import annotations

import itertools

import attrs
import pytest

from txengine.errors import ProviderRejected
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
