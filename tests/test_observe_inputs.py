"""`report` and `trace` on what users really hand them: every bad run database and every
unwritable `--out` is one line naming the path and the fix (a `UserError`, exit 2 on the
command line), never a traceback; older run databases still read.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from obsdata import record_run

from ctxrobot.model.errors import UserError
from ctxrobot.observe.readers import read_run, rule_intervals, summarize
from ctxrobot.observe.report import write_report
from ctxrobot.observe.trace import write_trace
from tests.conftest import ctxrobot, skip_unless_ci


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run recorded through the production path (bus → pipeline → store → SQLite)."""
    return record_run(tmp_path_factory.mktemp("real") / "run").db_path


def _sqlite(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as conn:
        for sql in statements:
            conn.execute(sql)
    conn.close()


def _bad_inputs(real: Path) -> dict[str, Callable[[Path], Path]]:
    """Name → a function making that bad input under a folder, returning the path to give."""
    data = real.read_bytes()

    def db_in(folder: Path, content: bytes) -> Path:
        folder.mkdir()
        (folder / "run.db").write_bytes(content)
        return folder

    def copy_then(folder: Path, *statements: str) -> Path:
        db = db_in(folder, data) / "run.db"
        _sqlite(db, *statements)
        return folder

    def empty_folder(d: Path) -> Path:
        (d / "empty").mkdir()
        return d / "empty"

    def table_less(d: Path) -> Path:
        _sqlite(d / "x.db", "CREATE TABLE notes (t TEXT)")
        return d / "x.db"

    def db_is_a_folder(d: Path) -> Path:
        (d / "r" / "run.db").mkdir(parents=True)
        return d / "r"

    return {
        "missing folder": lambda d: d / "nothing",
        "folder without run.db": empty_folder,
        "empty run.db": lambda d: db_in(d / "r", b""),
        "random bytes": lambda d: db_in(d / "r", random.Random(1).randbytes(65536)),
        "text file": lambda d: db_in(d / "r", b"this is not a database\n"),
        "truncated run.db": lambda d: db_in(d / "r", data[: len(data) // 2]),
        "header only": lambda d: db_in(d / "r", data[:100]),
        "table-less SQLite": table_less,
        "tables without a run": lambda d: copy_then(d / "r", "DELETE FROM run"),
        "missing a table": lambda d: copy_then(d / "r", "DROP TABLE samples"),
        "run.db is a folder": db_is_a_folder,
    }


BAD = [
    "missing folder",
    "folder without run.db",
    "empty run.db",
    "random bytes",
    "text file",
    "truncated run.db",
    "header only",
    "table-less SQLite",
    "tables without a run",
    "missing a table",
    "run.db is a folder",
]


@pytest.mark.parametrize("case", BAD)
def test_readers_refuse_bad_run_databases_in_one_line(
    real_run: Path, tmp_path: Path, case: str
) -> None:
    given = _bad_inputs(real_run)[case](tmp_path)
    messages = set()
    for reader in (summarize, read_run, rule_intervals, write_report, write_trace):
        with pytest.raises(UserError) as err:
            reader(given)
        messages.add(str(err.value))
    (message,) = messages  # every reader says the same
    print(f"\n{case}: {message}")
    assert "\n" not in message
    assert str(tmp_path) in message
    # Nothing was written next to a bad input.
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("trace.json"))


@pytest.mark.parametrize("command", ["report", "trace"])
@pytest.mark.parametrize("case", ["random bytes", "truncated run.db", "table-less SQLite"])
def test_the_command_line_says_one_line_and_exits_2(
    real_run: Path, tmp_path: Path, command: str, case: str
) -> None:
    given = _bad_inputs(real_run)[case](tmp_path)
    proc = ctxrobot(command, str(given))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(given) in proc.stderr


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems on demand; all unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, *options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            skip_unless_ci(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def _full(mount: Callable[..., Path]) -> Path:
    disk = mount("full", "size=256k")
    with contextlib.suppress(OSError):  # stops when the disk is full
        (disk / "ballast").write_bytes(bytes(512 * 1024))
    return disk


OUT_CASES = {
    "report: --out is a file": ("report", lambda t, m: _touch(t / "plots"), "is a file"),
    "report: --out read-only": ("report", lambda t, m: m("ro", "size=64k", "ro"), "read-only"),
    "report: --out on a full disk": ("report", lambda t, m: _full(m) / "plots", "disk is full"),
    "trace: --out inside a file": (
        "trace",
        lambda t, m: _touch(t / "afile") / "trace.json",
        "is a file",
    ),
    "trace: --out read-only": ("trace", lambda t, m: m("ro", "size=64k", "ro") / "t.json", "only"),
    "trace: --out on a full disk": ("trace", lambda t, m: _full(m) / "t.json", "disk is full"),
}


def _touch(path: Path) -> Path:
    path.write_text("already here\n")
    return path


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_an_unwritable_out_is_one_line(
    real_run: Path, tmp_path: Path, mounts: Callable[..., Path], case: str
) -> None:
    command, make, expected = OUT_CASES[case]
    out = make(tmp_path, mounts)
    writer = write_report if command == "report" else write_trace
    with pytest.raises(UserError) as err:
        writer(real_run, out)
    message = str(err.value)
    print(f"\n{case}: {message}")
    assert "\n" not in message and expected in message
    proc = ctxrobot(command, str(real_run.parent), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_trace_out_may_be_a_folder_and_defaults_beside_the_database(
    real_run: Path, tmp_path: Path
) -> None:
    assert write_trace(real_run, tmp_path) == tmp_path / "trace.json"
    assert (tmp_path / "trace.json").stat().st_size > 1000
    # Given the run.db itself, the outputs go beside it, never over it.
    size = real_run.stat().st_size
    assert write_trace(real_run) == real_run.parent / "trace.json"
    assert write_report(real_run)[0] == real_run.parent / "report" / "latency.png"
    assert real_run.stat().st_size == size and summarize(real_run)["tasks"]


def test_a_database_from_before_sources_were_recorded_still_reads(
    real_run: Path, tmp_path: Path
) -> None:
    """Older runs have no `source_states` table and no `recording_json` column."""
    old = tmp_path / "old" / "run.db"
    old.parent.mkdir()
    old.write_bytes(real_run.read_bytes())
    _sqlite(old, "DROP TABLE source_states", "ALTER TABLE run DROP COLUMN recording_json")
    run = read_run(old.parent)
    assert run.source_states == [] and "recording" not in run.run
    assert len(run.samples) == len(read_run(real_run).samples) > 0
    summary = summarize(old)
    assert summary["recording"] is None
    assert summary["tasks"] == summarize(real_run)["tasks"]
    assert [p.name for p in write_report(old.parent)] == ["latency.png", "cpu.png", "actuation.png"]
    assert write_trace(old.parent).stat().st_size > 1000
