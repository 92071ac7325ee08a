"""Manifests that cannot hurt (issue 14): every hostile input the issue found is a problem
at its FILE:LINE:COL, every limit holds exactly at its edge, every number in the schema is
bounded, host mounts follow the policy, and least-privilege overrides are warnings."""

from __future__ import annotations

import argparse
import os
import time
import typing
from pathlib import Path

import annotated_types
import pytest
from pydantic import BaseModel

from ctxrobot.manifest.defaults import REPO, memory_arg
from ctxrobot.manifest.document import MAX_CONDITION, ManifestDocument
from ctxrobot.manifest.envvars import expand
from ctxrobot.manifest.hostpaths import container_target, refused_source
from ctxrobot.manifest.scenario import Scenario
from ctxrobot.manifest.schema import check_file, load_manifest, validate_file
from ctxrobot.manifest.task import DEFAULT_PIDS_LIMIT
from ctxrobot.manifest.yamlload import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    load_yaml,
    read_text,
)

FIXTURES = Path(__file__).parent / "manifests"
HEAD = f"""\
version: 1
robot: {{name: rover, cpus: 2}}
data_dir: ${{CTXROBOT_DATA}}
scenario: {FIXTURES / "scenario.yaml"}
"""
TASK = """\
tasks:
  - name: slam
    image: ctxrobot/slam
    input: lidar
"""


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data files the fixture scenario names (empty: validation only checks they exist)."""
    root = tmp_path / "data"
    for rel in (
        "slam/intel/intel_laser.txt.gz",
        "slam/intel/intel_odom.txt",
        "slam/intel/laser.yaml",
        "signs/images/road1.png",
        "signs/images/road52.png",
        "speech/audio/ps_goforward.wav",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    monkeypatch.setenv("CTXROBOT_DATA", str(root))
    return root


def errors(tmp_path: Path, text: str) -> list[tuple[int, int, str]]:
    path = tmp_path / "robot.yaml"
    path.write_text(text)
    started = time.process_time()
    problems = validate_file(path)
    print(f"validated in {time.process_time() - started:.3f} s CPU")
    return [(p.line, p.col, p.message) for p in problems]


def only(found: list[tuple[int, int, str]]) -> tuple[int, int, str]:
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- the crashes


@pytest.mark.parametrize(
    ("line", "text", "col", "says"),
    [
        ("robot: &a {name: x, cpus: [*a]}", "", 28, "the alias *a is used inside the value"),
        ("x: !!int abc", "", 4, "the tag '!!int' does not fit the value 'abc'"),
        ("x: !!bool maybe", "", 4, "the tag '!!bool' does not fit the value 'maybe'"),
        ("x: !!timestamp nope", "", 4, "the tag '!!timestamp' does not fit"),
        ("!foo bar: 1", "", 1, "the tag '!foo' does not fit the value 'bar'"),
        ("!!map x: 1", "", 1, "the tag '!!map' does not fit the value 'x'"),
        ("x: !!set {a, b}", "", 4, "the tag '!!set' is not supported"),
        ("x: !!binary aGk=", "", 4, "the tag '!!binary' does not fit"),
        ("x: !!python/object:os.system {}", "", 4, "is not supported"),
        ("x: ", "[" * 5000 + "]" * 5000, 4 + MAX_DEPTH, f"nested more than {MAX_DEPTH} deep"),
    ],
)
def test_yaml_level_attacks_are_problems(
    tmp_path: Path, data: Path, line: str, text: str, col: int, says: str
) -> None:
    """Each stops at (or is reported at) the offending spot on line 5, right after HEAD."""
    found = errors(tmp_path, HEAD + line + text + "\n" + TASK)
    assert found[0][:2] == (5, col)
    assert says in found[0][2]
    assert len(found) == 1  # the schema stays quiet about a value already reported


def test_not_chains_beyond_the_condition_limit_are_refused_not_recursed(
    tmp_path: Path, data: Path
) -> None:
    rule = "rules:\n  - {name: r, set: {slam: {critical: true}}, when: %s}\n"
    context = "context: {voice: {source: mic}}\n"
    deepest = "not " * ((MAX_CONDITION - len("voice_active")) // 4) + "voice_active"
    assert errors(tmp_path, HEAD + TASK + context + rule % deepest) == []
    found = only(errors(tmp_path, HEAD + TASK + context + rule % ("not " * 3000 + "voice_active")))
    col = rule.splitlines()[1].index("when: ") + len("when: ") + 1
    assert found == (
        11,
        col,
        f"rules[0].when is longer than {MAX_CONDITION} characters; shorten it",
    )


def test_a_nine_level_alias_bomb_is_refused_before_it_is_built(tmp_path: Path, data: Path) -> None:
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
    )
    line, col, message = only(errors(tmp_path, HEAD + bomb + TASK))
    # a0..a2 hold 11, 111 and 1 111 values: with the keys, 1 239 before a3's eighth *a2.
    assert (line, col) == (8, len("a3: &a3 [") + 7 * len("*a2, ") + 1)
    assert message.startswith(f"the document holds more than {MAX_NODES} values by here")


def test_memory_sizes_too_large_for_a_float_are_refused(tmp_path: Path, data: Path) -> None:
    huge = "1" + "0" * 400 + ".0Ti"
    found = only(errors(tmp_path, HEAD + TASK + f"    resources: {{memory: {huge}}}\n"))
    assert found[:2] == (9, 25)
    assert "is more than the 1Ti limit; give at most 1Ti" in found[2]
    with pytest.raises(argparse.ArgumentTypeError, match="more than the 1Ti limit"):
        memory_arg(huge)


def test_nul_characters_are_refused_in_any_string(tmp_path: Path, data: Path) -> None:
    text = HEAD.replace("${CTXROBOT_DATA}", '"a\\0b"') + TASK
    assert only(errors(tmp_path, text)) == (
        3,
        11,
        "this string holds a NUL character (\\0), which no name, path or command can contain; "
        "remove it",
    )


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    for path, says in (
        (Path("/dev/zero"), "is not a regular file"),
        (fifo, "is not a regular file"),  # would block forever on open without O_NONBLOCK
        (tmp_path, "is a folder"),
        (tmp_path / "absent.yaml", "No such file or directory"),
    ):
        (problem,) = validate_file(path)
        assert (problem.line, problem.col) == (1, 1)
        assert says in problem.message


def test_file_size_limit_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("#" * (MAX_BYTES - 1) + "\n")
    assert read_text(path)[0] is not None
    path.write_text("#" * MAX_BYTES + "\n")
    text, problem = read_text(path)
    assert text is None and problem is not None
    assert f"larger than {MAX_BYTES // 1024} KiB" in problem.message


def test_depth_limit_is_exact() -> None:
    def nested(depth: int) -> str:  # the root list counts as one level
        return "[" * depth + "]" * depth

    assert load_yaml(nested(MAX_DEPTH), "f")[0] is not None
    doc, problems = load_yaml(nested(MAX_DEPTH + 1), "f")
    assert doc is None
    assert [(p.line, p.col) for p in problems] == [(1, MAX_DEPTH + 1)]


def test_value_limit_is_exact_and_counts_alias_repeats() -> None:
    items = MAX_NODES - 1  # plus the list itself
    assert load_yaml("[" + ", ".join(["1"] * items) + "]", "f")[0] is not None
    assert load_yaml("[" + ", ".join(["1"] * (items + 1)) + "]", "f")[0] is None
    # 1 list + 1 anchored list of 99 + 100 aliases of 100 values each = 10 101 values.
    reused = "[&a [" + ", ".join(["1"] * 99) + "], " + ", ".join(["*a"] * 100) + "]"
    doc, problems = load_yaml(reused, "f")
    assert doc is None and "more than 10000 values" in problems[0].message


def test_env_expansion_is_linear_and_bounded() -> None:
    hostile = "${" * 20_000  # 40 000 characters without a closing brace: all literal
    started = time.process_time()
    assert expand(hostile, {}, 10**6).text == hostile
    nested = "${" * 20_000 + "}"
    result = expand(nested, {}, 10**6)
    print(f"80 000 characters of ${{ expanded in {time.process_time() - started:.4f} s CPU")
    assert result.error_at == 0 and "bad variable reference" in result.error
    big = {"BIG": "x" * 100_000}
    assert expand("${BIG}" * 10, big, 1_000_000).text == "x" * 1_000_000
    refused = expand("${BIG}" * 11, big, 1_000_000)
    assert refused.error_at == 60 and "expands to more than 1000000 characters" in refused.error


def test_yaml_is_read_as_plain_yaml_1_2(tmp_path: Path, data: Path) -> None:
    assert only(errors(tmp_path, "%YAML 1.1\n---\n" + HEAD + TASK))[:2] == (2, 1)
    assert "%TAG" in only(errors(tmp_path, "%TAG !e! tag:e.com,2000:\n---\n" + HEAD + TASK))[2]
    doc, problems = load_yaml(
        "a: yes\nb: !!str 12\nc: !!int 0x1f\nd: 2001-12-14\ne: -_\nf: " + "9" * 5000 + "\n", "f"
    )
    assert problems == [] and doc is not None
    assert dict(doc.data) == {"a": "yes", "b": "12", "c": 31, "d": "2001-12-14", "e": "-_",
                              "f": "9" * 5000}  # fmt: skip
    assert only(errors(tmp_path, HEAD + TASK + "    deadline_ms: !!float 5\n"))[:2] == (9, 18)


# --------------------------------------------------------------------------- bounded numbers


def _number_fields(model: type[BaseModel], seen: set[type]) -> list[tuple[str, typing.Any]]:
    """Every int/float field reachable from ``model``, with its field info."""
    if model in seen:
        return []
    seen.add(model)
    found = []
    for name, info in model.model_fields.items():
        for tp in _leaf_types(info.annotation):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                found += _number_fields(tp, seen)
            elif tp in (int, float):
                found.append((f"{model.__name__}.{name}", info))
    return found


def _leaf_types(tp: typing.Any) -> list[typing.Any]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _leaf_types(args[0])
    if origin is typing.Literal:
        return []
    return [leaf for arg in args for leaf in _leaf_types(arg)] if args else [tp]


def test_every_number_in_the_schema_has_a_finite_range() -> None:
    seen: set[type] = set()
    fields = _number_fields(ManifestDocument, seen) + _number_fields(Scenario, seen)
    unbounded = []
    for name, info in fields:
        metadata = [*info.metadata, *_annotated_metadata(info.annotation)]
        low = any(isinstance(m, annotated_types.Ge | annotated_types.Gt) for m in metadata)
        high = any(isinstance(m, annotated_types.Le | annotated_types.Lt) for m in metadata)
        if not (low and high) and name != "Resources.memory":  # bounded by memory_bytes
            unbounded.append(name)
    assert len(fields) > 30
    assert unbounded == []


def _annotated_metadata(tp: typing.Any) -> list[object]:
    if typing.get_origin(tp) is typing.Annotated:
        inner, *metadata = typing.get_args(tp)
        found: list[object] = []
        for item in metadata:
            found += getattr(item, "metadata", [item])
        return found + _annotated_metadata(inner)
    return [m for arg in typing.get_args(tp) for m in _annotated_metadata(arg)]


@pytest.mark.parametrize(
    ("setting", "col", "says"),
    [
        ("deadline_ms: .inf", 18, "tasks[0].deadline_ms = inf is not a finite number; give a "
         "number between 1 and 60000"),
        ("deadline_ms: .nan", 18, "is not a finite number"),
        ("deadline_ms: 1e-12", 18, "tasks[0].deadline_ms = 1e-12 is out of range: it must be >= 1"),
        ("restart: {backoff_s: .inf}", 26, "tasks[0].restart.backoff_s = inf is not a finite"),
        ("resources: {max_freeze_s: 1e300}", 31, "must be <= 600"),
        ("resources: {memory: 1e40}", 25, "memory 1e+40 is not a size"),
        ("resources: {memory: 100000000000000000000000000000000000000000}", 25,
         "more than the 1Ti limit"),
    ],
)  # fmt: skip
def test_absurd_task_numbers_are_refused(
    tmp_path: Path, data: Path, setting: str, col: int, says: str
) -> None:
    line, found_col, message = only(errors(tmp_path, HEAD + TASK + f"    {setting}\n"))
    assert (line, found_col) == (9, col)
    assert says in message


def test_a_host_context_period_that_would_burn_a_core_is_refused(
    tmp_path: Path, data: Path
) -> None:
    found = only(errors(tmp_path, HEAD + TASK + "context: {host: {period_s: 1.0e-9}}\n"))
    assert found == (9, 28, "context.host.period_s = 1e-09 is out of range: it must be >= 0.1")


# --------------------------------------------------------------------------- mounts


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("/var/run/docker.sock", "the container engine's socket"),
        ("/run/docker.sock", "the container engine's socket"),
        ("/", "the host's whole filesystem"),
        ("/proc", "the host's process and kernel interface"),
        ("/proc/sys/kernel", "the host's process and kernel interface"),
        ("/sys/fs/cgroup", "a task could re-share the CPU itself"),
        ("/dev", "the host's devices"),
        ("/var", "it contains /var/run/docker.sock"),
        ("/run", "it contains /run/docker.sock"),
        (str(REPO), "it contains " + str(REPO / "runs")),
    ],
)
def test_mount_policy_refuses_the_host_s_dangerous_paths(source: str, says: str) -> None:
    why = refused_source(Path(source))
    assert why is not None and says in why


def test_mount_policy_follows_links_and_allows_plain_folders(tmp_path: Path) -> None:
    (tmp_path / "proc").symlink_to("/proc")
    assert refused_source(tmp_path / "proc") is not None
    assert refused_source(tmp_path) is None


@pytest.mark.parametrize(
    ("target", "normal", "refused"),
    [
        ("/run//ctxrobot", "/run/ctxrobot", True),
        ("/data/../run/ctxrobot/x", "/run/ctxrobot/x", True),
        ("//data", "/data", True),
        ("/var/run/ctxrobot", "/var/run/ctxrobot", True),
        ("/", "/", True),
        ("/proc/sys", "/proc/sys", True),
        ("relative", "relative", True),
        ("/opt/models/../maps/", "/opt/maps", False),
    ],
)
def test_mount_targets_are_normalised_before_the_reserved_check(
    target: str, normal: str, refused: bool
) -> None:
    found, why = container_target(target)
    assert found == normal
    assert (why is not None) == refused


def test_dangerous_mounts_are_problems_at_their_source(tmp_path: Path, data: Path) -> None:
    mount = "    mounts: [{source: /var/run/docker.sock, target: /s, read_only: false}]\n"
    line, col, message = only(errors(tmp_path, HEAD + TASK + mount))
    assert (line, col) == (9, 23)
    assert message.startswith("tasks[0].mounts[0].source: mount source /run/docker.sock is refused")
    # The manifest's own folder as the source: /tmp would be refused too where the checkout
    # (and its runs/ folder) is under /tmp.
    mount = "    mounts: [{source: ., target: /run//ctxrobot}]\n"
    assert only(errors(tmp_path, HEAD + TASK + mount))[:2] == (9, 34)
    refused = HEAD.replace("${CTXROBOT_DATA}", "/") + TASK
    # The scenario's data files are then missing too: those problems are the scenario file's,
    # sorted by path, so pick the manifest's own.
    found = [p for p in errors(tmp_path, refused) if p[2].startswith("data_dir ")]
    line, col, message = only(found)
    assert (line, col) == (3, 11)
    assert message.startswith("data_dir / is refused: it is the host's whole filesystem; every")


def test_mounts_are_read_only_and_normalised_unless_written_otherwise(
    tmp_path: Path, data: Path
) -> None:
    mounts = "    mounts: [{source: ., target: /x/../maps}]\n"
    (tmp_path / "robot.yaml").write_text(HEAD + TASK + mounts)
    (mount,) = load_manifest(tmp_path / "robot.yaml").task("slam").mounts
    assert (mount.source, mount.target, mount.read_only) == (tmp_path, "/maps", True)


# --------------------------------------------------------------------------- least privilege


def test_least_privilege_defaults_and_the_new_task_keys(tmp_path: Path, data: Path) -> None:
    (tmp_path / "robot.yaml").write_text(HEAD + TASK)
    manifest = load_manifest(tmp_path / "robot.yaml")
    task = manifest.task("slam")
    assert task.security.cap_add == []
    assert task.security.read_only_root and task.security.no_new_privileges
    assert task.security.pids_limit == DEFAULT_PIDS_LIMIT
    assert task.stale == "process"
    assert manifest.warnings == ()


def test_each_security_override_is_a_warning_at_its_key(tmp_path: Path, data: Path) -> None:
    path = tmp_path / "robot.yaml"
    path.write_text(
        HEAD + TASK + "    stale: skip\n"
        "    mounts: [{source: ., target: /out, read_only: false}]\n"
        "    security:\n"
        "      cap_add: [SYS_NICE]\n"
        "      read_only_root: false\n"
        "      pids_limit: 512\n"
        "      no_new_privileges: false\n"
    )
    report = check_file(path)
    assert report.errors == []
    assert load_manifest(path).task("slam").stale == "skip"
    assert [str(w) for w in report.warnings] == [
        f"{path}:10:40: warning: task 'slam' may write to the host's {tmp_path}",
        f"{path}:12:17: warning: task 'slam' adds the Linux capability SYS_NICE",
        f"{path}:13:7: warning: task 'slam' runs with a writable root filesystem",
        f"{path}:14:7: warning: task 'slam' may run 512 processes (default 256)",
        f"{path}:15:7: warning: task 'slam' may gain privileges through setuid programs "
        "(no_new_privileges: false)",
    ]


@pytest.mark.parametrize(
    ("security", "col", "says"),
    [
        ("{cap_add: [SYS_NIC]}", 26, "'SYS_NIC' is not a Linux capability; did you mean SYS_NICE?"),
        ("{cap_add: [CAP_SYS_NICE]}", 26, "write the capability 'CAP_SYS_NICE' as SYS_NICE"),
        ("{cap_add: [ALL]}", 26, "cap_add: ALL would give the task every capability"),
        ("{pids_limit: 100000}", 28, "security.pids_limit = 100000 is out of range"),
        ("{privileged: true}", 16, "unknown key 'privileged' in tasks[0].security"),
    ],
)
def test_security_values_are_checked(
    tmp_path: Path, data: Path, security: str, col: int, says: str
) -> None:
    line, found_col, message = only(errors(tmp_path, HEAD + TASK + f"    security: {security}\n"))
    assert (line, found_col) == (9, col)
    assert says in message


def test_stale_takes_skip_or_process(tmp_path: Path, data: Path) -> None:
    assert only(errors(tmp_path, HEAD + TASK + "    stale: drop\n")) == (
        9,
        12,
        "tasks[0].stale: 'drop' is not allowed; use one of 'skip' or 'process'",
    )


# --------------------------------------------------------------------------- positions, time


def test_the_cpu_time_bound_stops_reading_at_a_position(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctxrobot.manifest import yamlload

    monkeypatch.setattr(yamlload, "MAX_CPU_SECONDS", -1.0)  # already spent: stop at once
    doc, problems = load_yaml("a: 1\n", "f")
    assert doc is None
    assert [(p.line, p.col) for p in problems] == [(1, 1)]
    assert problems[0].message.startswith("reading stopped here after -1 s of CPU")


def test_bytes_yaml_cannot_hold_are_placed(tmp_path: Path) -> None:
    path = tmp_path / "robot.yaml"
    path.write_bytes(b"version: 1\nrobot: {name: \xff}\n")
    assert [(p.line, p.col) for p in validate_file(path)] == [(2, 15)]
    path.write_bytes(b"version: 1\r\nrobot: \x07\n")
    (problem,) = validate_file(path)
    assert (problem.line, problem.col) == (2, 8)
    assert "cannot hold the character U+0007" in problem.message


def test_problems_always_print_as_one_line() -> None:
    from ctxrobot.manifest.problems import Problem

    assert str(Problem("f", 1, 2, "a\nb\x1b[31m")) == "f:1:2: a\\nb\\x1b[31m"
    assert str(Problem("f", 1, 2, "careful", warning=True)) == "f:1:2: warning: careful"


def test_a_problem_inside_an_empty_flow_mapping_has_a_position(tmp_path: Path, data: Path) -> None:
    """Found by the fuzz test: `idle: {}` has no position table of its own in ruamel."""
    path = tmp_path / "scenario.yaml"
    path.write_text(
        "version: 1\nduration_s: 30\nsources:\n  camera:\n    kind: camera_replay\n    idle: {}\n"
    )
    found = [(p.line, p.col, p.message) for p in validate_file(path)]
    assert found == [
        (
            6,
            5,
            "missing required field 'dir' in sources.camera.idle; add `dir:` (image folder "
            "under data_dir)",
        )
    ]
