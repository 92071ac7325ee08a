"""The run folder on a real full disk, and who may read it.

A 2 MB tmpfs is mounted as the disk holding the run folder, and rows are published until it
fills. What is asserted is what the user sees: one log line saying the run goes on with a
bounded buffer in memory, `close` writing what it can (the run's end and summary always)
and returning, nothing raising; then the folder and database modes and group.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import UserError
from ctxrobot.model.events import TaskResult
from ctxrobot.observe.paths import RUN_DB_MODE, RUN_FOLDER_MODE, prepare_run_folder
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.readers import read_run, summarize
from ctxrobot.observe.store import RunStore
from tests.conftest import skip_unless_ci

GROUP = "daemon"  # any group this process is not running as
PAYLOAD = "transcript " * 40  # ~440 bytes a row, like a speech result


def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        skip_unless_ci(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB file system, unmounted after the test."""
    disk = tmp_path / "disk"
    _mount(disk, "size=2m", "mode=0755")
    try:
        yield disk
    finally:
        # Lazy: a failed test may leave the database open.
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def _create(run_dir: Path, **kwargs: object) -> RunStore:
    return RunStore.create(
        run_dir,
        run_id="disk",
        t0=time.monotonic(),
        policy="ctx",
        manifest_path=None,
        scenario_path=None,
        ncpus=2,
        tasks=[("speech", "img", 500.0, None, None)],
        **kwargs,  # type: ignore[arg-type]
    )


def _publish(bus: EventBus, first: int, count: int) -> None:
    t0 = time.monotonic()
    for i in range(first, first + count):
        bus.publish("task.result", TaskResult("speech", i, t0, t0, t0 + 0.1, {"text": PAYLOAD}))


def _fill(path: Path) -> None:
    """Write zeros into `path` until the file system is full."""
    with path.open("wb") as f:
        chunk = bytes(64 * 1024)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass


def _store_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ctxrobot.observe.store" and r.levelno == level
    ]


def test_a_full_disk_keeps_a_bounded_buffer_and_close_records_the_end(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bus = EventBus()
    store = _create(small_disk / "run")
    pipeline = ObserverPipeline(bus)
    pipeline.add(store)
    published = 0
    while store.write_error is None:  # until the disk is full
        _publish(bus, published, 500)
        published += 500
        assert pipeline.drain()
        store.flush()
        assert published < 100_000, "the 2 MB disk never filled"
    filled_at = store.rows_written
    # The run goes on well past the buffer's size: memory stays bounded.
    _publish(bus, published, RunStore.BUFFER_ROWS + 5000)
    published += RunStore.BUFFER_ROWS + 5000
    assert pipeline.drain()
    assert store.rows_buffered <= RunStore.BUFFER_ROWS
    assert store.rows_lost >= 5000
    (said,) = _store_lines(caplog, logging.ERROR)  # said once, not once per batch
    print(f"\nfilled after {filled_at} rows; the user sees:\n  {said}")
    assert "the disk is full" in said and str(small_disk / "run" / "run.db") in said
    assert f"keeping the newest {RunStore.BUFFER_ROWS} rows in memory" in said
    assert "the run goes on" in said

    assert pipeline.close()
    store.close(42.0, {"note": "full disk"})  # returns, raises nothing
    assert pipeline.stats().errors == {}
    (closing,) = _store_lines(caplog, logging.WARNING)
    print(f"  {closing}")
    assert f"of {published} rows could not be written" in closing
    assert "end, summary and that count are recorded" in closing

    run = read_run(small_disk / "run")
    assert run.run["ended_utc"] is not None and run.run["duration_s"] == 42.0
    assert run.run["summary"] == {"note": "full disk"}
    recording = run.run["recording"]
    assert recording["write_error"] == "the disk is full"
    assert recording["rows_written"] == len(run.samples) == filled_at
    assert recording["rows_written"] + recording["rows_lost"] == published
    summary = summarize(small_disk / "run")
    assert summary["tasks"]["speech"]["samples"] == filled_at
    assert summary["recording"] == recording


def test_rows_kept_in_memory_are_written_once_space_is_freed(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bus = EventBus()
    store = _create(small_disk / "run")
    pipeline = ObserverPipeline(bus)
    pipeline.add(store)
    ballast = small_disk / "ballast"
    _fill(ballast)  # someone else filled the disk
    _publish(bus, 0, 3000)
    assert pipeline.drain()
    assert not store.flush()
    assert store.write_error == "the disk is full" and store.rows_buffered == 3000
    ballast.unlink()
    # The writer retries on its own; `flush` asks it to now.
    assert store.flush(timeout_s=30.0)
    assert store.rows_written == 3000 and store.rows_lost == 0
    (resumed,) = _store_lines(caplog, logging.WARNING)
    assert "writing" in resumed and "again; 0 row(s) were dropped" in resumed
    pipeline.close()
    store.close(1.0)
    assert summarize(small_disk / "run")["tasks"]["speech"]["samples"] == 3000


def test_a_disk_full_at_start_is_one_clear_error(small_disk: Path) -> None:
    _fill(small_disk / "ballast")
    with pytest.raises(UserError) as err:
        _create(small_disk / "run")
    message = str(err.value)
    print(f"\n{message}")
    assert "\n" not in message
    assert "the disk is full" in message and "--out" in message
    # Nothing half-made is left to block the next attempt.
    assert not (small_disk / "run" / "run.db").exists()
    (small_disk / "ballast").unlink()
    _create(small_disk / "run").close(0.0)


def test_run_folder_and_database_are_private_to_the_group(tmp_path: Path) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    run_dir = tmp_path / "runs" / "r1"
    old_umask = os.umask(0o022)  # a typical umask; the modes must not depend on it
    try:
        store = _create(run_dir, group=GROUP)
    finally:
        os.umask(old_umask)
    folder = run_dir.stat()
    assert stat.S_IMODE(folder.st_mode) == RUN_FOLDER_MODE == 0o750
    assert folder.st_gid == gid
    live = {p.name: p.stat() for p in run_dir.iterdir() if p.name.startswith("run.db")}
    assert set(live) == {"run.db", "run.db-wal", "run.db-shm"}  # WAL while running
    for name, st in live.items():
        assert stat.S_IMODE(st.st_mode) == RUN_DB_MODE == 0o640, name
        assert st.st_gid == gid, name
    store.close(1.0)
    db = (run_dir / "run.db").stat()
    assert stat.S_IMODE(db.st_mode) == 0o640 and db.st_gid == gid
    # A folder the user already had keeps its mode: `--out /tmp` must not close /tmp.
    mode_before = stat.S_IMODE(tmp_path.stat().st_mode)
    _create(tmp_path).close(0.0)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == mode_before


@pytest.mark.parametrize("case", ["file", "read-only", "unknown group"])
def test_a_run_folder_that_cannot_be_written_is_one_clear_error(tmp_path: Path, case: str) -> None:
    target, group = tmp_path / "run", None
    if case == "file":
        target.write_text("not a folder")
    elif case == "read-only":
        _mount(tmp_path / "ro", "size=1m", "ro")
        target = tmp_path / "ro" / "run"
    else:
        group = "no-such-group-ctxrobot"
    try:
        with pytest.raises(UserError) as err:
            prepare_run_folder(target, group)
    finally:
        if case == "read-only":
            subprocess.run(["umount", str(tmp_path / "ro")], check=True)
    message = str(err.value)
    print(f"\n{case}: {message}")
    assert "\n" not in message
    expected = {
        "file": "is a file, not a folder",
        "read-only": "read-only",
        "unknown group": "does not exist",
    }[case]
    assert expected in message
