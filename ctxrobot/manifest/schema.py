"""Loading robot manifests and scenarios, reporting every problem precisely.

The public face of the package: the loaders live here and the schema's names are
re-exported, so callers import everything from ``ctxrobot.manifest.schema``.

A file is checked in three layers, and problems from all of them are collected before
anything is raised, so one ``ctxrobot validate`` run lists everything to fix:

1. YAML itself, within limits (size, depth, alias expansion, CPU time), duplicate keys and
   ``${VAR}`` expansion: :mod:`ctxrobot.manifest.yamlload`;
2. the pydantic models (types, finite ranges, unknown keys, data files that must exist,
   the mount policy): :mod:`.scenario`, :mod:`.task`, :mod:`.document`;
3. cross references no single model can see: :mod:`.crossref`.

Each problem is ``FILE:LINE:COL: message``, where the message says what is wrong and how to
fix it. A valid manifest may still carry warnings (a task less confined than the defaults);
:func:`check_file` returns both. The loaded ``Manifest`` holds resolved values: absolute
paths, bytes and seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ctxrobot.manifest.crossref import Checker
from ctxrobot.manifest.document import (
    ContextSpec,
    FeedbackSpec,
    HostContext,
    Manifest,
    ManifestDocument,
    MotionContext,
    ObstacleContext,
    RobotSpec,
    SchedulerSpec,
    SignContext,
    VoiceContext,
)
from ctxrobot.manifest.fields import describe
from ctxrobot.manifest.hostpaths import DATA_MOUNT, probe, real, refused_source
from ctxrobot.manifest.messages import pydantic_problems
from ctxrobot.manifest.problems import ManifestError, Problem
from ctxrobot.manifest.scenario import (
    SOURCE_KINDS,
    AudioReplay,
    CameraReplay,
    IdleImages,
    LaserReplay,
    PlayAudio,
    Scenario,
    ShowImage,
)
from ctxrobot.manifest.task import Mount, QueueSpec, Resources, RestartSpec, SecuritySpec, TaskSpec
from ctxrobot.manifest.units import memory_bytes
from ctxrobot.manifest.yamlload import YamlDoc, load_yaml, read_text
from ctxrobot.sched.rules import RuleSpec, TaskSetting
from ctxtask.datasets import data_dir as default_data_dir

__all__ = [
    "DATA_MOUNT",
    "SOURCE_KINDS",
    "AudioReplay",
    "CameraReplay",
    "ContextSpec",
    "FeedbackSpec",
    "FileReport",
    "HostContext",
    "IdleImages",
    "LaserReplay",
    "Manifest",
    "ManifestDocument",
    "ManifestError",
    "MotionContext",
    "Mount",
    "ObstacleContext",
    "PlayAudio",
    "Problem",
    "QueueSpec",
    "Resources",
    "RestartSpec",
    "RobotSpec",
    "RuleSpec",
    "Scenario",
    "SchedulerSpec",
    "SecuritySpec",
    "ShowImage",
    "SignContext",
    "TaskSetting",
    "TaskSpec",
    "VoiceContext",
    "check_file",
    "load_manifest",
    "load_scenario",
    "memory_bytes",
    "validate_file",
    "with_scenario",
]


def _read(path: Path) -> tuple[YamlDoc | None, list[Problem]]:
    """Parse a YAML file whose top level must be a mapping."""
    text, refused = read_text(path)
    if text is None:
        return None, [refused] if refused is not None else []
    doc, problems = load_yaml(text, str(path))
    if doc is not None and not isinstance(doc.data, dict):
        pos = doc.pos(())
        problems.append(
            Problem(
                str(path),
                pos.line,
                pos.col,
                f"the file holds {describe(doc.data)}; it must be a mapping that starts "
                "with `version: 1`",
            )
        )
        return None, problems
    return doc, problems


def _scenario_stage(
    path: Path, data_dir: Path
) -> tuple[Scenario | None, dict[Any, object] | None, list[Problem]]:
    """Validate a scenario; also returns its source names → kinds for cross references,
    known even when other parts of the scenario are invalid."""
    doc, problems = _read(path)
    if doc is None:
        return None, None, problems
    checker = Checker(doc, str(path))
    checker.scenario()
    problems += checker.problems
    raw_sources = doc.data.get("sources")
    kinds = (
        {name: (s.get("kind") if isinstance(s, dict) else None) for name, s in raw_sources.items()}
        if isinstance(raw_sources, dict)
        else None
    )
    try:
        scenario = Scenario.model_validate(doc.data, context={"data_dir": data_dir})
    except ValidationError as exc:
        problems += pydantic_problems(exc, doc, str(path), Scenario)
        return None, kinds, problems
    scenario._path = path
    scenario._data_dir = data_dir
    return scenario, kinds, problems


def load_scenario(path: str | Path, data_dir: str | Path | None = None) -> Scenario:
    """Load and validate a scenario; data paths resolve against ``data_dir`` (default: the
    project data root). Raises ``ManifestError`` listing every problem."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    scenario, _, problems = _scenario_stage(Path(path), root)
    if problems or scenario is None:
        raise ManifestError(problems)
    return scenario


def with_scenario(manifest: Manifest, path: str | Path) -> Manifest:
    """The manifest playing another scenario (`run --scenario`, `bench`). Raises
    ``ManifestError`` when the scenario does not load or lacks a source the tasks read."""
    scenario = load_scenario(path, manifest.data_dir)
    missing = sorted({t.input for t in manifest.tasks} - set(scenario.sources))
    if missing:
        raise ManifestError(
            [
                Problem(
                    str(path),
                    1,
                    1,
                    f"the manifest's tasks read source(s) {', '.join(missing)}, which this "
                    f"scenario does not define (it has: {', '.join(scenario.sources)}); add "
                    "them or pick a scenario made for this robot",
                )
            ]
        )
    return dataclasses.replace(manifest, scenario=scenario)


def _data_dir(doc: YamlDoc, file: str, base: Path) -> tuple[Path, list[Problem]]:
    """The resolved data_dir, and why it may not be mounted into the tasks at /data."""
    written = doc.data.get("data_dir")
    if not isinstance(written, str) or not written or "\0" in written:
        # Absent: the default location. Invalid: the schema reports it; meanwhile the default.
        return default_data_dir(), []
    data_dir = real(base / written)
    why = refused_source(data_dir)
    if why is None:
        return data_dir, []
    pos = doc.pos(("data_dir",))
    message = (
        f"data_dir {data_dir} is refused: {why}; every task gets data_dir at {DATA_MOUNT}, "
        "so point it at the data folder only"
    )
    return data_dir, [Problem(file, pos.line, pos.col, message)]


def _scenario_of(
    doc: YamlDoc, path: Path, data_dir: Path
) -> tuple[Scenario | None, dict[Any, object] | None, list[Problem]]:
    scenario_file = doc.data.get("scenario")
    if not isinstance(scenario_file, str) or "\0" in scenario_file:
        return None, None, []  # the schema reports it
    scenario_path = path.parent / scenario_file
    if probe(scenario_path).kind != "missing":  # a pipe or a folder: the reader says why not
        return _scenario_stage(scenario_path, data_dir)
    pos = doc.pos(("scenario",))
    message = (
        f"scenario file not found: {scenario_path}; the path is relative to the manifest's "
        f"folder ({path.parent})"
    )
    return None, None, [Problem(str(path), pos.line, pos.col, message)]


def _privilege_warnings(document: ManifestDocument, doc: YamlDoc, file: str) -> list[Problem]:
    warnings: list[Problem] = []
    for i, task in enumerate(document.tasks):
        for where, message in task.privileges():
            path = ("tasks", i, *where)
            pos = doc.pos(path, key=doc.has_key(path))
            warnings.append(Problem(file, pos.line, pos.col, message, warning=True))
    return warnings


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate a manifest and its scenario. Raises ``ManifestError`` listing
    every problem in both files."""
    path = Path(path)
    doc, problems = _read(path)
    if doc is None:
        raise ManifestError(problems)
    data_dir, refusals = _data_dir(doc, str(path), path.parent)
    scenario, sources, scenario_problems = _scenario_of(doc, path, data_dir)
    problems += refusals + scenario_problems
    document: ManifestDocument | None = None
    try:
        document = ManifestDocument.model_validate(doc.data, context={"base": path.parent})
    except ValidationError as exc:
        problems += pydantic_problems(exc, doc, str(path), ManifestDocument)
    checker = Checker(doc, str(path))
    checker.manifest(sources, str(doc.data.get("scenario")))
    problems += checker.problems
    if problems or document is None or scenario is None:
        raise ManifestError(problems)
    return Manifest(
        path=path,
        version=document.version,
        robot=document.robot,
        data_dir=data_dir,
        scenario=scenario,
        tasks=document.tasks,
        scheduler=document.scheduler,
        context=document.context,
        rules=list(document.rules),
        warnings=tuple(sorted(_privilege_warnings(document, doc, str(path)))),
    )


_MANIFEST_KEYS = {"robot", "tasks", "scenario", "scheduler", "context", "rules", "data_dir"}
_SCENARIO_KEYS = {"sources", "duration_s"}


@dataclass(frozen=True)
class FileReport:
    """What ``ctxrobot validate`` prints for one file: errors make it invalid, warnings
    (a task less confined than the defaults) do not."""

    errors: list[Problem]
    warnings: list[Problem]


def check_file(path: str | Path) -> FileReport:
    """Errors and warnings of a manifest (with its scenario) or a standalone scenario file,
    told apart by their top-level keys."""
    path = Path(path)
    doc, problems = _read(path)
    if doc is None:
        return FileReport(sorted(problems), [])
    keys = set(doc.data)
    try:
        if keys & _MANIFEST_KEYS:
            return FileReport([], list(load_manifest(path).warnings))
        if keys & _SCENARIO_KEYS:
            load_scenario(path)
            return FileReport([], [])
    except ManifestError as exc:
        return FileReport(exc.problems, [])  # already sorted
    neither = Problem(
        str(path),
        1,
        1,
        "neither a manifest (it would have `tasks:` and `scenario:`) nor a scenario (it "
        "would have `sources:` and `duration_s:`)",
    )
    return FileReport(sorted([*problems, neither]), [])


def validate_file(path: str | Path) -> list[Problem]:
    """Every error in a manifest (with its scenario) or a standalone scenario file; an
    empty list means valid. :func:`check_file` also returns the warnings."""
    return check_file(path).errors
