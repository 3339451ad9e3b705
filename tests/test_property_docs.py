"""The README's testing-kit example must run exactly as printed."""

from __future__ import annotations

import re
import unittest
from pathlib import Path

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from txengine.testing import LifecycleStateMachine

GUIDE = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested by tests/test_property_docs.py: keep it runnable -->"


def example() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    found = re.search(re.escape(MARKER) + r"\n```python\n(.*?)\n```", text, re.S)
    assert found, f"{GUIDE.name} lost its tested example (the block right after {MARKER!r})"
    return found.group(1)


def load_example() -> dict:
    namespace = {"__name__": "test_till_driver"}
    exec(compile(example(), "README.md", "exec"), namespace)
    return namespace


def test_the_guides_example_defines_a_test_module_pytest_collects():
    namespace = load_example()
    assert callable(namespace["test_the_till_driver_conforms"])
    assert issubclass(namespace["TestTillLifecycle"], unittest.TestCase)
    assert issubclass(namespace["TillLifecycle"], LifecycleStateMachine)


def test_the_guides_conformance_test_passes():
    load_example()["test_the_till_driver_conforms"]()


def test_the_guides_lifecycle_machine_runs_clean():
    machine = load_example()["TillLifecycle"]
    run_state_machine_as_test(machine, settings=settings(settings(), max_examples=20))
    assert machine.steps_total > 20 * 10
