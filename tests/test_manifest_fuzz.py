"""Property-based fuzzing of `ctxrobot validate` (issue 14): at least 1 000 hostile manifests
and scenarios a run, built from deep nesting, alias bombs, bad tags, huge, NaN and infinite
numbers, NUL bytes, long strings, `${VAR}` junk, dangerous mounts, wrong values at every key
of the default robot and random edits of its text.

Each document is validated in-process and must give problems (never an exception), each one
line of `FILE:LINE:COL: message` inside the file, within 2 s of CPU. The 3 slowest and 20
others are then measured with tracemalloc (under 200 MB), and 6 of them go through the real
command line, `python -m ctxrobot validate`: exit status 0 or 2, stderr holding only
problems, peak RSS (from wait4) under 200 MB, CPU beyond the interpreter's start under 2 s.
"""

from __future__ import annotations

import io
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from ctxrobot.manifest.schema import check_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "manifests"
BASE = (REPO / "config" / "robot.yaml").read_text()
EXAMPLE = (REPO / "config" / "examples" / "every-feature.yaml").read_text()
SCENARIO = (FIXTURES / "scenario.yaml").read_text()
EXAMPLES = 1000
CPU_LIMIT_S = 2.0
MEMORY_LIMIT = 200 * 1024**2
PLACEHOLDER = "__HOSTILE__"

# --------------------------------------------------------------------------- values


def _double_quoted(text: str) -> str:
    """Any text as a YAML double-quoted scalar (escapes for everything unprintable)."""
    return '"' + text.encode("unicode_escape").decode().replace('"', '\\"') + '"'


NUMBERS = st.one_of(
    st.integers(1, 5000).map(lambda n: "9" * n),
    st.integers(-400, 400).map(lambda e: f"1e{e}"),
    st.floats().map(lambda f: {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}.get(str(f), repr(f))),
    st.integers().map(str),
    st.sampled_from(
        [".nan", ".NaN", ".inf", "-.inf", "-0", "0x1F", "0o17", "0b101", "1_000", "-_", "0b_",
         "._", "+.5", "1e-12", "1e300", "-1", "0", "0.0000001", "1" + "0" * 400 + ".0Ti",
         "1e40", "768Mi", "-1Gi", "1.5Gi", "9" * 30 + "Ti", "1:30"]
    ),
)  # fmt: skip
STRINGS = st.one_of(
    st.integers(0, 140_000).map(lambda n: "'" + "a" * n + "'"),
    st.integers(1, 25_000).map(lambda n: "'" + "${" * n + "'"),
    st.integers(1, 25_000).map(lambda n: "x${" * n),
    st.integers(1, 3000).map(lambda n: "not " * n + "voice_active"),
    st.integers(1, 300).map(lambda n: "(" * n + "voice_active" + ")" * n),
    st.integers(1, 2000).map(lambda n: "'" + "${HOME}" * n + "'"),
    st.text(max_size=40).map(_double_quoted),
    st.sampled_from(
        ['"a\\0b"', '"\\e[31mred\\e[0m"', '"\\ud800"', '"line\\nbreak"', "'${'", "${X:-}",
         "${X:-[[[[}", "${ X }", "${1X}", "${CTXROBOT_DATA}", "'${X:-${Y}}'", '"\\x00"',
         "/", "/proc", "/proc/self/root", "/sys/fs/cgroup", "/dev/zero", "/var/run/docker.sock",
         "/run//ctxrobot", "//data", "/data/../run/ctxrobot", "../../../..", ".", "..", "",
         "SYS_ADMIN", "ALL", "CAP_SYS_NICE", "speed >", "motion == 'stoped'", "__import__('os')",
         "yes", "no", "on", "null", "~", "true", "2001-13-45", "=", "<<"]
    ),
)  # fmt: skip
TAGS = st.tuples(
    st.sampled_from(
        ["!!int", "!!bool", "!!float", "!!str", "!!null", "!!timestamp", "!!map", "!!seq",
         "!!set", "!!omap", "!!pairs", "!!binary", "!!python/object:os.system", "!foo", "!",
         "!<tag:yaml.org,2002:int>", "!<!>", "!!merge", "!!value"]
    ),
    st.sampled_from(["abc", "maybe", "nope", "1", "0x10", "[1]", "{a: 1}", "''", "true", "~"]),
).map(" ".join)  # fmt: skip
COLLECTIONS = st.one_of(
    st.sampled_from(
        ["[]", "{}", "[1, [2, [3]]]", "{a: 1}", "*undefined", "&a [*a]", "&b {x: *b}", "{<<: 5}",
         "{<<: [1]}", "{<<: {a: 1}, <<: {b: 2}}", "[&c 1, *c, *c]", "{? [a] : 1}", "{[a]: 1}",
         "{a: 1, a: 2}", "[" * 40 + "]" * 40, "{a: " * 40 + "1" + "}" * 40]
    ),
    st.integers(1, 6000).map(lambda n: "[" * n + "]" * n),
    st.lists(st.sampled_from(["1", "a", "~", ".nan", "[]"]), max_size=30).map(
        lambda items: "[" + ", ".join(items) + "]"
    ),
)  # fmt: skip
HOSTILE_VALUE = st.one_of(NUMBERS, STRINGS, TAGS, COLLECTIONS)
MOUNTS = st.tuples(
    st.sampled_from(["/", "/proc", "/sys", "/dev", "/var/run/docker.sock", "/run", "/var", ".",
                     "/tmp", "..", "/etc", "nowhere", "'a\\0b'"]),
    st.sampled_from(["/x", "/run//ctxrobot", "/data", "//data/x", "/", "/proc", "rel", "/a/../b"]),
    st.sampled_from(["true", "false", "~", "1"]),
).map(lambda m: f"[{{source: {m[0]}, target: {m[1]}, read_only: {m[2]}}}]")  # fmt: skip
SECURITY = st.fixed_dictionaries(
    {},
    optional={
        "cap_add": st.lists(st.sampled_from(["SYS_NICE", "SYS_NIC", "sys_nice", "ALL", "BPF",
                                             "CAP_NET_RAW", "1", "~"]), max_size=4),
        "read_only_root": st.sampled_from(["true", "false", "1", "~"]),
        "no_new_privileges": st.sampled_from(["true", "false", "yes"]),
        "pids_limit": st.sampled_from(["0", "16", "512", "100000", ".inf", "1e300"]),
        "privileged": st.just("true"),
    },
).map(lambda d: "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in d.items()) + "}")  # fmt: skip


def _flow(value: Any) -> str:
    return "[" + ", ".join(value) + "]" if isinstance(value, list) else str(value)


# --------------------------------------------------------------------------- documents


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(data, dict | list):
        for key, value in data.items() if isinstance(data, dict) else enumerate(data):
            found += _paths(value, (*prefix, key))
    return found


def _dump(data: Any) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _load(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


BASE_DATA = _load(BASE)
BASE_PATHS = _paths(BASE_DATA)
SCENARIO_DATA = _load(SCENARIO)
SCENARIO_PATHS = _paths(SCENARIO_DATA)


@st.composite
def value_at_a_key(draw: st.DrawFn) -> tuple[str, bytes]:
    """The default robot (or the fixture scenario) with one value, or a new key, hostile."""
    manifest = draw(st.booleans())
    data = _load(BASE if manifest else SCENARIO)
    path = draw(st.sampled_from(BASE_PATHS if manifest else SCENARIO_PATHS))
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if isinstance(parent, dict) and draw(st.booleans()):
        parent[draw(st.sampled_from(["extra", "deadlin_ms", "stale", "security", "mounts"]))] = (
            PLACEHOLDER
        )
    else:
        parent[path[-1]] = PLACEHOLDER
    text = _dump(data).replace(PLACEHOLDER, draw(HOSTILE_VALUE), 1)
    return ("robot.yaml" if manifest else "scenario.yaml"), text.encode()


@st.composite
def task_sections(draw: st.DrawFn) -> tuple[str, bytes]:
    """Mounts and security sections of every shape added to the first task."""
    lines = [f"    mounts: {draw(MOUNTS)}"] if draw(st.booleans()) else []
    stale = draw(st.sampled_from(["skip", "process", "drop", "1"]))
    lines += [f"    security: {draw(SECURITY)}", f"    stale: {stale}"]
    text = BASE.replace("    input: lidar\n", "    input: lidar\n" + "\n".join(lines) + "\n", 1)
    return "robot.yaml", text.encode()


def _bomb(levels: int, fanout: int, before_base: bool) -> str:
    lines = [f"b0: &b0 [{', '.join(['x'] * fanout)}]"]
    lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + (BASE if before_base else "")


STRUCTURES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(2, 12), st.booleans()).map(lambda b: _bomb(*b)),
    st.integers(1, 6000).map(lambda n: BASE + "x: " + "[" * n + "]" * n + "\n"),
    st.integers(1, 2000).map(lambda n: BASE + "x: " + "{a: " * n + "1" + "}" * n + "\n"),
    st.integers(1, 300).map(lambda n: BASE + "".join("  " * i + "k:\n" for i in range(n))),
    st.sampled_from(
        [BASE.replace("robot: {name: pi-rover, cpus: 2}", "robot: &a {name: x, cpus: [*a]}"),
         "%YAML 1.1\n---\n" + BASE, "%TAG !e! tag:e.com,2000:\n---\n" + BASE, BASE + "---\n" + BASE,
         "", "\n", "# only a comment\n", "~", "[]", "- 1\n", "'text'", BASE + "...\n",
         BASE.replace("version: 1", "version: 1\n!foo bar: 1"), "\ufeff" + BASE,
         BASE.replace("\n", "\r\n"), BASE.replace("\n", "\u2028"),
         BASE + "x: [" + ", ".join(["1"] * 9_000) + "]\n"]  # near the most values a file may hold
    ),
).map(lambda text: ("robot.yaml", text.encode()))  # fmt: skip


@st.composite
def text_edits(draw: st.DrawFn) -> tuple[str, bytes]:
    """Random edits of the shipped configs' text: inserts of hostile snippets or YAML
    punctuation, deletions, duplicated or swapped lines."""
    name, text = draw(
        st.sampled_from(
            [("robot.yaml", BASE), ("robot.yaml", EXAMPLE), ("scenario.yaml", SCENARIO)]
        )
    )
    snippets = st.one_of(
        HOSTILE_VALUE, st.sampled_from(list(":-[]{},&*!|>'\"%@`#\t\n ")), st.text(max_size=10)
    )
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "line"]))
        if op == "insert":
            text = text[:at] + draw(snippets) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        else:
            lines = text.splitlines(keepends=True) or [""]
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i] + lines[i]
            text = "".join(lines)
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # now and then a byte that is not UTF-8, or a NUL
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\x00", b"\xc3", b"\x1b"])) + raw[at:]
    return name, raw


DOCUMENTS = st.one_of(
    value_at_a_key(),
    task_sections(),
    STRUCTURES,
    text_edits(),
    st.binary(max_size=3000).map(lambda raw: ("robot.yaml", raw)),
)

# --------------------------------------------------------------------------- checks


def _workspace(root: Path) -> Path:
    """A folder laid out like config/: the robot names scenarios/default.yaml and data_dir."""
    (root / "scenarios").mkdir(parents=True, exist_ok=True)
    (root / "scenarios" / "default.yaml").write_text(SCENARIO)
    data = root / "data"
    for rel in (
        "slam/intel/intel_laser.txt.gz",
        "slam/intel/intel_odom.txt",
        "slam/intel/laser.yaml",
        "signs/images/road1.png",
        "signs/images/road52.png",
        "speech/audio/ps_goforward.wav",
    ):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).touch()
    return data


_LINE = re.compile(r"(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (warning: )?\S.*")


def _check_line(printed: str, files: set[str], text: str) -> None:
    """One printed problem: FILE:LINE:COL inside a file we wrote, one line."""
    match = _LINE.fullmatch(printed)
    assert match is not None, f"not FILE:LINE:COL: {printed[:300]!r}"
    assert match["file"] in files, printed[:300]
    line, col = int(match["line"]), int(match["col"])
    lines = re.split(r"\r\n|\r|\n", text)  # YAML 1.2 line breaks, as ruamel counts them
    assert 1 <= line <= len(lines), printed[:300]
    assert 1 <= col <= max(len(x) for x in lines) + 1, printed[:300]


def test_hostile_manifests_give_problems_not_crashes(tmp_path: Path, monkeypatch: Any) -> None:
    data = _workspace(tmp_path)
    monkeypatch.setenv("CTXROBOT_DATA", str(data))
    runs: list[tuple[float, str, bytes]] = []  # CPU seconds, file name, document

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(DOCUMENTS)
    def validate_one(document: tuple[str, bytes]) -> None:
        name, raw = document
        path = tmp_path / name
        path.write_bytes(raw)
        started = time.process_time()
        report = check_file(path)
        cpu = time.process_time() - started
        runs.append((cpu, name, raw))
        assert cpu < CPU_LIMIT_S, f"{cpu:.2f} s CPU for {raw[:200]!r}"
        files = {str(path), str(tmp_path / "scenarios" / "default.yaml")}
        text = raw.decode("utf-8", "replace")
        for problem in [*report.errors, *report.warnings]:
            _check_line(str(problem), files, text)

    validate_one()
    cpu = sorted(r[0] for r in runs)
    print(
        f"\n{len(runs)} hostile documents, CPU per document: median "
        f"{statistics.median(cpu) * 1000:.0f} ms, p99 {cpu[int(len(cpu) * 0.99)] * 1000:.0f} ms, "
        f"max {cpu[-1] * 1000:.0f} ms, total {sum(cpu):.1f} s"
    )
    assert len(runs) >= EXAMPLES
    slowest = sorted(runs, key=lambda r: -r[0])
    spread = runs[:: len(runs) // 20]
    peaks = [_peak_memory(tmp_path / name, raw) for _, name, raw in [*slowest[:3], *spread]]
    print(
        f"tracemalloc peak over {len(peaks)} documents (the 3 slowest among them): max "
        f"{max(peaks) / 2**20:.1f} MB, median {statistics.median(peaks) / 2**20:.1f} MB"
    )
    assert max(peaks) < MEMORY_LIMIT
    _through_the_cli(tmp_path / "cli", [*slowest[:2], *spread[:: len(spread) // 4]])


def _peak_memory(path: Path, raw: bytes) -> int:
    """Peak Python heap while validating ``raw`` (pydantic-core's Rust heap is not traced;
    the command-line sample below measures the whole process)."""
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        check_file(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _through_the_cli(root: Path, sample: list[tuple[float, str, bytes]]) -> None:
    _workspace(root)
    baseline = min(_cli(root, "empty.yaml", b"")[2] for _ in range(2))
    for _, name, raw in sample:
        code, stderr, cpu, rss = _cli(root, name, raw)
        print(
            f"cli: exit {code}, CPU {cpu:.2f} s (start-up {baseline:.2f} s), "
            f"RSS {rss / 2**20:.0f} MB"
        )
        assert code in (0, 2), stderr[-2000:]
        assert "Traceback" not in stderr
        text = raw.decode("utf-8", "replace")
        files = {str(root / name), str(root / "scenarios" / "default.yaml")}
        for line in stderr.splitlines():
            _check_line(line, files, text)
        assert rss < MEMORY_LIMIT
        assert cpu - baseline < CPU_LIMIT_S


#: Runs its arguments and prints the child's exit status, CPU seconds and peak RSS (KiB). A
#: process's peak RSS starts at its parent's when it forks and execs (the kernel keeps the
#: old memory's high-water mark), so the CLI is started from this small process, not pytest.
_MEASURE = """\
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"""


def _cli(root: Path, name: str, raw: bytes) -> tuple[int, str, float, int]:
    """Exit status, stderr, CPU seconds and peak RSS of `ctxrobot validate` on ``raw``."""
    path = root / name
    path.write_bytes(raw)
    env = {**os.environ, "CTXROBOT_DATA": str(root / "data")}
    command = [sys.executable, "-m", "ctxrobot", "validate", str(path)]
    with subprocess.Popen(
        [sys.executable, "-c", _MEASURE, *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI too, not only the measuring parent
            raise AssertionError(f"ctxrobot validate hangs on {raw[:200]!r}") from None
    code, cpu, rss_kib = out.split()
    printed = err.decode("utf-8", "replace")
    return int(code), printed, float(cpu), int(rss_kib) * 1024
