"""A failing run shrinks to a program a person can paste into a regression test.

The machine runs against a driver with a classic sans-IO bug: its finalize builds the
request but never yields it, and reports success, so the engine records a commit the
provider never saw.  Hypothesis finds it, shrinks it and prints the steps; the printed
program is valid Python, and running it reproduces the same invariant failure.
"""

from __future__ import annotations

import ast
import re

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import txengine.testing.repro
from txengine.models import Outcome
from txengine.testing import InvariantViolation, LifecycleStateMachine
from txengine.providers.reference_harness import ReferenceHarness
from txengine.providers.reference import ReferenceDriver, ReferenceSandbox


class ForgetsToSendFinalize(ReferenceDriver):
    """Builds the finalize request, forgets to ``yield`` it, and reports success."""

    def finalize(self, tx, key):
        self._post(f"/previews/{tx.provider_ref}/finalize", None, key)  # the bug: never sent
        return Outcome(provider_ref=tx.provider_ref)
        yield  # a generator, as every driver operation is


class ForgetfulHarness(ReferenceHarness):
    def make_driver(self, sandbox, *, transport, clock):
        return ForgetsToSendFinalize(environment="sandbox", api_key=ReferenceSandbox.api_key, transport=transport)


class ForgetfulLifecycle(LifecycleStateMachine):
    harness = ForgetfulHarness()


def reproduction(error: BaseException) -> str:
    """The program hypothesis printed for the minimal failing run."""
    notes = "\n".join(getattr(error, "__notes__", []))
    found = re.search(r"^state = ForgetfulLifecycle\(\)$.*?^state\.teardown\(\)$", notes, re.M | re.S)
    assert found, f"no reproduction in the failure report:\n{notes}"
    return found.group(0)


@pytest.fixture(scope="module")
def failure() -> InvariantViolation:
    with pytest.raises(InvariantViolation) as raised:
        # No ``explain`` phase: it traces every line the engine runs, and doubles the time.
        # Every setting pinned: the same search and shrink under any profile.
        run_state_machine_as_test(ForgetfulLifecycle, settings=settings(
            max_examples=300, stateful_step_count=30, derandomize=True, database=None, deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]))
    return raised.value


def test_the_machine_catches_a_driver_that_takes_a_refusal_for_a_commit(failure):
    assert str(failure).startswith("invariant 2: wallet"), failure


def test_the_failure_shrinks_to_a_short_program_of_engine_calls(failure):
    program = reproduction(failure)
    print(program)  # shown with -s: what a person pastes into a regression test
    steps = re.findall(r"^(?:tx_\d+ = )?state\.\w+\(", program, re.M)[:-1]  # one per step, not teardown
    assert len(steps) <= 5, program
    assert "tx_0 = state.preview(" in steps, program
    assert program.splitlines()[-2] == "state.finalize(idempotency_key=None, tx=tx_0)", program


def test_the_printed_program_is_python_that_reproduces_the_failure(failure):
    program = reproduction(failure)
    code = compile(program, "<reproduction>", "exec")
    namespace = {**vars(txengine.testing.repro), "ForgetfulLifecycle": ForgetfulLifecycle}
    with pytest.raises(InvariantViolation) as replayed:
        try:
            exec(code, namespace)
        finally:
            namespace["state"].teardown()  # the program stopped before its own teardown line
    assert str(replayed.value).split(";")[0] == str(failure).split(";")[0]
    assert str(replayed.value).startswith("invariant 2: wallet")


def test_the_minimal_program_shows_short_names_and_no_long_strings(failure):
    """Names come from one catalog whose first entry is short: a shrunk example shows 'Tip',
    never the 200-character name the catalog also holds."""
    program = reproduction(failure)
    strings = [node.value for node in ast.walk(ast.parse(program))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert "Tip" in strings, program
    assert max(map(len, strings)) <= len("SPLIT_PAYMENT"), program
