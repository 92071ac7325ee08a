"""The folders tell the truth: layers and purity checked by import-linter (.importlinter),
module and function sizes bounded, and every package says what it may import.

import-linter's graph (grimp) includes imports made inside functions, so the layer and
acyclic contracts also prove that no function-level import dodges a cycle.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "ctxrobot"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: Argument parsing is a list of declarations, long by nature (the issue's exemption).
PARSER_BUILDERS = ("build_parser", "add_")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / ".importlinter")],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": f"{root}:{root / 'tasks'}", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_the_layer_contracts_hold() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # The sans-I/O core reaching for the runtime (and so for threads and Docker).
        ("sched/policy.py", "from ctxrobot.service import runtime", "Layers"),
        ("sched/state.py", "import threading", "does no I/O"),
        ("observe/status.py", "from ctxrobot.service import loop", "Layers"),
        ("data/spec.py", "from ctxrobot.model import events", "Data fetching"),
    ],
)
def test_a_deliberate_violation_fails(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(PACKAGE, copy / "ctxrobot", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tasks" / "ctxtask", copy / "tasks" / "ctxtask")
    shutil.copy(REPO / ".importlinter", copy)
    target = copy / "ctxrobot" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    proc = lint_imports(copy)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "BROKEN" in proc.stdout and contract in proc.stdout


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_600_lines() -> None:
    sizes = {p.relative_to(REPO): len(p.read_text().splitlines()) for p in _modules()}
    big = {str(p): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert big == {}
    print(f"\nlargest module: {max(sizes.items(), key=lambda kv: kv[1])}")


def test_no_function_over_80_lines_outside_argument_parsing() -> None:
    long: dict[str, int] = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if node.name.startswith(PARSER_BUILDERS):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = length
    assert long == {}


@pytest.mark.parametrize(
    "package",
    sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()),
)
def test_every_package_says_what_lives_there_and_what_it_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc, f"ctxrobot/{package}/__init__.py has no docstring"
    assert "import" in doc.lower(), (
        f"ctxrobot/{package}'s docstring does not say what it may import"
    )
