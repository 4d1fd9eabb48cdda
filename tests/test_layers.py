"""The ladder of packages: every import points down, and client/ and server/ never meet.

    aggregation <- core <- privacy <- {client, server} <- cli <- simulations

Every module's imports are read with ``ast`` (function-local and conditional imports
too), so an upward import anywhere in a file fails here, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> its rung; a module may import its own package and any lower rung
RUNGS: dict[str, int] = {"aggregation": 0, "core": 1, "privacy": 2, "client": 3, "server": 3, "cli": 4,
                         "simulations": 5}


def imported_packages(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every absolute import in ``source``, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "<relative>"))
    return found


def violations(package: str, source: str, filename: str) -> list[str]:
    out = []
    for line, target in imported_packages(source, filename):
        if target == "<relative>":
            out.append(f"{filename}:{line}: relative import (the layer test reads absolute ones only)")
        elif target == "tests":
            out.append(f"{filename}:{line}: imports the test suite")
        elif target in RUNGS and target != package and RUNGS[target] >= RUNGS[package]:
            kind = "sideways" if RUNGS[target] == RUNGS[package] else "upward"
            out.append(f"{filename}:{line}: {package} imports {target} ({kind}; the ladder is "
                       "aggregation <- core <- privacy <- {client, server} <- cli <- simulations)")
    return out


def project_modules() -> list[tuple[str, Path]]:
    return [(package, path) for package in RUNGS for path in sorted((ROOT / package).rglob("*.py"))]


def test_every_package_of_the_ladder_exists():
    assert all((ROOT / package / "__init__.py").is_file() for package in RUNGS)


def test_every_import_points_down_the_ladder():
    found = [v for package, path in project_modules()
             for v in violations(package, path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("package, source, expected", [
    ("core", "import privacy.settings\n", "core imports privacy (upward"),
    ("aggregation", "def f():\n    from core.config import RunConfig\n", "aggregation imports core (upward"),
    ("client", "if True:\n    from server.wire import x\n", "client imports server (sideways"),
    ("server", "import client.app\n", "server imports client (sideways"),
    ("privacy", "from cli.console import console\n", "privacy imports cli (upward"),
    ("cli", "from simulations import bench_perf\n", "cli imports simulations (upward"),
    ("server", "from tests.postgres import URL\n", "imports the test suite"),
    ("core", "from . import data\n", "relative import"),
])
def test_the_check_catches_an_import_that_breaks_the_ladder(package, source, expected):
    (found,) = violations(package, source, "probe.py")
    assert expected in found and found.startswith("probe.py:")


@pytest.mark.parametrize("package, source", [
    ("cli", "import aggregation\nfrom core import config\nfrom server.db import read\nimport client.app\n"),
    ("privacy", "from core.data import collate\nimport numpy\n"),
    ("server", "from server import checkpoint\n"),
])
def test_downward_and_third_party_imports_pass(package, source):
    assert violations(package, source, "probe.py") == []
