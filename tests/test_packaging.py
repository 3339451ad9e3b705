"""The distribution a POS installs: one top-level package, txengine, typed, complete."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
                   check=True, capture_output=True)
    [built] = out.glob("txengine-*.whl")
    return zipfile.ZipFile(built)


def source_packages() -> set[str]:
    """Every package in the repository, by the name it is installed under."""
    names = set()
    for folder, installed in (("engine", "txengine"), ("providers", "txengine/providers")):
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).as_posix()
            names.add(installed if relative == "." else f"{installed}/{relative}")
    return names


def test_the_wheel_installs_one_top_level_package_named_txengine(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"txengine"}


def test_the_wheel_holds_every_package_of_the_repository_and_says_it_is_typed(wheel):
    shipped = {name.rsplit("/", 1)[0] for name in wheel.namelist() if name.endswith("/__init__.py")}
    assert shipped == source_packages()
    assert "txengine/py.typed" in wheel.namelist()
    assert "txengine/providers/cheers/driver.py" in wheel.namelist()


def test_a_projects_own_providers_and_engine_modules_do_not_shadow_txengine(tmp_path):
    """A Django project with providers.py and an engine.py beside it still imports txengine."""
    (tmp_path / "providers.py").write_text("RAISE = 'the project providers module'\n")
    (tmp_path / "engine.py").write_text("RAISE = 'the project engine module'\n")
    probe = ("import providers, engine\n"
             "from txengine import Engine\n"
             "from txengine.providers.cheers import CheersDriver\n"
             "assert providers.RAISE and engine.RAISE\n"
             "print(CheersDriver.__module__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "txengine.providers.cheers.driver"
