"""The kit as a POS team installs it: layered apart from our providers, harnesses found
through the registry, the sandbox toolkit usable without hypothesis."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from txengine.testing import harness_names, load_harness, register_harness
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
