"""ARCHITECTURE.md names real code: a rename that leaves the document behind fails here.

Every `path.py::Name` reference (a function, a class, or `Class.method`) must name a file
that exists and defines it, read with `ast` (no module is imported). The "One sample's
path" section must be a numbered list of such references that walks the runtime in order,
and the layer diagram must list the layers of `.importlinter`, top to bottom.
"""

from __future__ import annotations

import ast
import configparser
import functools
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOC = REPO / "ARCHITECTURE.md"
#: A code span opening with `path.py::Name` or `path.py::Class.method` (a call may follow).
REFERENCE = re.compile(r"`([\w./-]+\.py)::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)[^`]*`")
#: A code span that is only a repository path to a Python file.
PATH_SPAN = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.py)`")
STEP = re.compile(r"^(\d+)\. (.*)$")
#: Files the sample's path must pass through, in this order (a path that skips the context,
#: the cgroup write, the task or the run store no longer describes the runtime).
PATH_LANDMARKS = (
    "ctxrobot/streams/replay.py",
    "ctxrobot/model/bus.py",
    "ctxrobot/sched/signals.py",
    "ctxrobot/sched/policy.py",
    "ctxrobot/actuate/cgroups.py",
    "ctxrobot/streams/channel.py",
    "tasks/ctxtask/runner.py",
    "tasks/slam/task.py",
    "ctxrobot/observe/store.py",
    "ctxrobot/observe/dash.py",
)


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the `## title` section (up to the next `## ` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"ARCHITECTURE.md has no '## {title}' section"
    return match.group(1)


def resolve(path: str) -> Path | None:
    """A path as written in the document: from the repository root, or short for
    `ctxrobot/<path>`."""
    for root in (REPO, REPO / "ctxrobot"):
        if (root / path).is_file():
            return root / path
    return None


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def defines(path: Path, qualname: str) -> bool:
    """Whether `path` defines `qualname`: a top-level function or class, then members of
    that class for each further dotted part."""
    body: list[ast.stmt] = parsed(path).body
    for part in qualname.split("."):
        found = next(
            (
                node
                for node in body
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and node.name == part
            ),
            None,
        )
        if found is None:
            return False
        body = found.body if isinstance(found, ast.ClassDef) else []
    return True


def references(text: str) -> list[tuple[str, str]]:
    return REFERENCE.findall(text)


def sample_path_steps(text: str) -> list[tuple[int, str, str]]:
    """(number, file, name) of each numbered step of "One sample's path"."""
    steps = []
    for line in section(text, "One sample's path").splitlines():
        if (step := STEP.match(line)) is None:
            continue
        found = REFERENCE.match(step.group(2))
        assert found, f"step {step.group(1)} does not open with a `path.py::Name` reference"
        steps.append((int(step.group(1)), found.group(1), found.group(2)))
    return steps


def test_every_code_reference_names_a_definition() -> None:
    refs = references(doc_text())
    assert len(refs) >= 40, f"only {len(refs)} `path.py::Name` references found"
    missing = []
    for path, name in refs:
        file = resolve(path)
        if file is None:
            missing.append(f"{path}: no such file")
        elif not defines(file, name):
            missing.append(f"{path}::{name}: not defined there")
    assert not missing, "ARCHITECTURE.md is out of date:\n" + "\n".join(missing)


def test_every_python_path_exists() -> None:
    paths = set(PATH_SPAN.findall(doc_text()))
    missing = sorted(p for p in paths if resolve(p) is None)
    assert not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"


def test_the_sample_path_is_a_numbered_walk_through_the_runtime() -> None:
    steps = sample_path_steps(doc_text())
    assert [n for n, _, _ in steps] == list(range(1, len(steps) + 1)), "steps not numbered 1..n"
    assert len(steps) >= 25, f"the sample's path has only {len(steps)} steps"
    files = [path for _, path, _ in steps]
    positions = []
    for landmark in PATH_LANDMARKS:
        assert landmark in files, f"the sample's path never enters {landmark}"
        positions.append(files.index(landmark))
    assert positions == sorted(positions), (
        f"the sample's path visits {PATH_LANDMARKS} out of order: first steps {positions}"
    )


def test_the_layer_diagram_matches_the_import_contract() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    contract = config["importlinter:contract:layers"]["layers"]
    layers = [line.strip() for line in contract.strip().splitlines()]
    block = re.search(r"```\n(.*?)```", section(doc_text(), "Layers"), re.S)
    assert block, "the Layers section has no diagram"
    # Each diagram line: the layer (or independent layers joined by " | "), then a note
    # after a run of spaces.
    drawn = [re.split(r"\s{2,}", line.strip())[0] for line in block.group(1).splitlines()]
    assert drawn == layers, f"diagram {drawn} != .importlinter layers {layers}"


@pytest.mark.parametrize(
    ("qualname", "expected"),
    [
        ("SchedulerState.handle", True),
        ("SchedulerState", True),
        ("SchedulerState.handel", False),  # a misspelt method
        ("handle", False),  # a method is not a module-level function
        ("TRANSITIONS", False),  # assignments are not definitions
    ],
)
def test_the_checker_tells_defined_from_undefined(qualname: str, expected: bool) -> None:
    assert defines(REPO / "ctxrobot/sched/state.py", qualname) is expected
