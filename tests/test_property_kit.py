"""The kit as a POS team installs it: layered apart from our providers, harnesses found
through the registry, the sandbox toolkit usable without hypothesis."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from txengine.testing import harness_names, load_harness, register_harness, register_profiles
from txengine.testing.profiles import SHRINK_SECONDS, cap_shrinking
from txengine.testing.repro import ForloyOfflineLifecycle

ROOT = Path(__file__).resolve().parents[1]
#: the application layer: the only modules of the engine allowed to know the providers
APPLICATION = ROOT / "engine" / "app"  # txengine.app: the CLI, the demo, the provider wiring


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_neither_the_library_nor_the_kit_imports_the_providers():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("txengine.providers"))
        for path in (ROOT / "engine").rglob("*.py") if APPLICATION not in path.parents
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_sandbox_toolkit_imports_without_hypothesis():
    program = ("import sys; sys.modules['hypothesis'] = None\n"  # any import of it now fails
               "from txengine.testing.sandbox import Fault, Sandbox, route, serve\n"
               "from txengine.providers.cheers import CheersSandbox\n"
               "print(Fault.TIMEOUT_AFTER_COMMIT.name)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "TIMEOUT_AFTER_COMMIT"


def test_every_bundled_provider_registers_its_harness():
    assert {"reference", "cheers", "rekonect", "forloy", "forloy-offline", "secuconnect"} <= set(harness_names())
    assert load_harness("forloy-offline").offline
    assert ForloyOfflineLifecycle.harness.offline


def test_a_pos_team_registers_its_own_harness_in_process():
    from txengine.providers.reference_harness import ReferenceHarness

    class TillHarness(ReferenceHarness):
        pass

    register_harness("till", TillHarness)
    assert isinstance(load_harness("till"), TillHarness)
    from txengine.testing import repro

    assert repro.TillLifecycle.harness.provider == "reference"


def test_an_unknown_harness_names_the_known_ones():
    with pytest.raises(LookupError, match="'nope'.*reference"):
        load_harness("nope")


def test_the_kit_runs_on_a_store_the_pos_team_points_it_at(tmp_path):
    from txengine.testing import as_store_factory, check_driver
    from txengine.testing.conformance import Fault

    made: list[str] = []

    def fresh_database() -> str:
        made.append(f"sqlite:///{tmp_path / f'pos-{len(made)}.db'}")
        return made[-1]

    assert check_driver(load_harness("reference"), store=fresh_database, faults=(Fault.TIMEOUT_AFTER_COMMIT,)) == []
    assert len(made) > 5 and all(Path(url.removeprefix("sqlite:///")).exists() for url in made)
    assert as_store_factory(f"sqlite:///{tmp_path}/").new_url().startswith(f"sqlite:///{tmp_path}/")
    with pytest.raises(ValueError, match="fresh one"):
        as_store_factory("sqlite:///one.db")


# --- the shrink cap ---------------------------------------------------------------------------------


@pytest.fixture
def shrink_cap():
    """Hypothesis' shrink cap as this process had it, put back after the test."""
    from hypothesis.internal.conjecture import engine

    before = engine.MAX_SHRINKING_SECONDS
    yield engine
    engine.MAX_SHRINKING_SECONDS = before


def test_register_profiles_caps_shrinking_unless_told_not_to(shrink_cap):
    register_profiles(shrink_seconds=7)
    assert shrink_cap.MAX_SHRINKING_SECONDS == 7
    register_profiles(shrink_seconds=None)
    assert shrink_cap.MAX_SHRINKING_SECONDS == 7  # left alone
    register_profiles()
    assert shrink_cap.MAX_SHRINKING_SECONDS == SHRINK_SECONDS == 20


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), "20", True])
def test_a_shrink_cap_must_be_a_positive_number_of_seconds(shrink_cap, seconds):
    with pytest.raises(ValueError, match="positive number of seconds"):
        register_profiles(shrink_seconds=seconds)


def test_a_capped_shrink_stops_early_and_reports_an_example_that_still_fails(shrink_cap):
    runs: list[list[int]] = []

    @settings(database=None, derandomize=True, max_examples=100, phases=[Phase.generate, Phase.shrink])
    @given(st.lists(st.integers(0, 1000), min_size=5))
    def too_much(values: list[int]) -> None:
        runs.append(values)
        assert sum(values) < 100

    def reported(seconds: float) -> tuple[list[int], list[int]]:
        """The first failing example found, and the example reported."""
        runs.clear()
        cap_shrinking(seconds)
        with pytest.raises(AssertionError):
            too_much()
        return next(values for values in runs if sum(values) >= 100), runs[-1]  # the last run replays it

    found, minimal = reported(300)
    assert sum(minimal) == 100 and len(minimal) == 5 and minimal != found  # shrunk to the boundary
    found_again, example = reported(1e-9)
    assert found_again == found  # derandomized: the same search
    assert example == found  # stopped as soon as shrinking began, and reported as it stood
