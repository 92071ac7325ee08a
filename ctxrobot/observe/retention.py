"""The retention window (`--keep`): what pruning a run database keeps and the SQL that
prunes it, and which earlier run folders a daemon's window has left behind.

The run store's writer thread calls :func:`prune` on its own connection once a period; the
daemon calls :func:`expired_runs` and :func:`remove_run` once it has started. This module
holds no thread and reads no clock: the cut within a run is taken from its newest recorded
event, and the present moment for earlier runs is the caller's.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctxrobot.observe.paths import RunDatabaseError
from ctxrobot.observe.readers import reading
from ctxrobot.observe.schema import DB_NAME

__all__ = [
    "RETAINED",
    "RUN_ENTRIES",
    "ExpiredRun",
    "expired_runs",
    "last_recorded",
    "newest_event",
    "prune",
    "remove_run",
]

#: What a run recorded with a retention window (`RunStore.create(keep_s=…)`, `--keep`) prunes
#: of each event table: rows older than the window on the table's time column. A table that
#: records a state keeps, of the rows before the window, the last one of each key (``()``:
#: of the whole table), because that state still holds when the window begins: the rule
#: that is active, the task that runs, the allocation in force, the context. ``None``: a
#: series of its own moments, pruned whole. `retention` holds the window, the time before
#: which rows are gone (`kept_from`) and how many went. Inputs of the scheduler core go too:
#: a run that pruned them cannot be replayed.
RETAINED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "samples": ("t_sensor", None),
    "drops": ("t", None),
    "usage": ("t", None),
    "core_inputs": ("t", None),
    "context": ("t", ()),
    "allocations": ("t", ()),
    "rules": ("t", ("rule",)),
    "task_states": ("t", ("task",)),
    "source_states": ("t", ("source",)),
}


def newest_event(conn: sqlite3.Connection) -> float | None:
    """The time of the newest recorded event (None: none yet): the last row of each event
    table, since rows are appended as events arrive; no table is scanned."""
    newest = [
        row[0]
        for table, (column, _) in RETAINED.items()
        for row in conn.execute(f"SELECT {column} FROM {table} ORDER BY rowid DESC LIMIT 1")
    ]
    return max(newest) if newest else None


def prune(
    conn: sqlite3.Connection, keep_s: float, chunk_rows: int, counted: Callable[[int], None]
) -> None:
    """Delete every event row older than `keep_s` before the newest one, but the state in
    force at the cut (:data:`RETAINED`), in transactions of at most `chunk_rows` rows so
    that the WAL never holds a window's worth of deletions. Each chunk records the cut and
    its count in the `retention` table in the same transaction, and is handed to `counted`
    once committed: an interrupted prune leaves an exact record."""
    newest = newest_event(conn)
    if newest is None:
        return
    cut = newest - keep_s
    for table, (column, keys) in RETAINED.items():
        # Rows are appended as events arrive, so every row before the first one inside the
        # window is older than the cut. (A late row, older than rows before it, goes at the
        # next prune.)
        first = conn.execute(
            f"SELECT rowid FROM {table} WHERE {column} >= ? ORDER BY rowid LIMIT 1", (cut,)
        ).fetchone()
        if first is None:
            last = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
            if last is None:
                continue
            bound = last + 1
        else:
            bound = first[0]
        old = f"SELECT rowid FROM {table} WHERE rowid < :bound"
        if keys is not None:
            per_key = f" GROUP BY {', '.join(keys)}" if keys else ""
            old += (
                f" AND rowid NOT IN (SELECT max(rowid) FROM {table} WHERE rowid < :bound{per_key})"
            )
        delete = f"DELETE FROM {table} WHERE rowid IN ({old} LIMIT :chunk)"
        deleted = chunk_rows
        while deleted == chunk_rows:
            with conn:
                conn.execute("BEGIN")
                deleted = conn.execute(delete, {"bound": bound, "chunk": chunk_rows}).rowcount
                if deleted:
                    conn.execute(
                        "UPDATE retention SET kept_from = ?, rows_pruned = rows_pruned + ?",
                        (cut, deleted),
                    )
            counted(deleted)


#: What ctxrobot writes into a run folder: the database and SQLite's side files, the store's
#: disk reserve, the task sockets' folders, and what `ctxrobot report` and `ctxrobot trace`
#: derive from the database by default. Removing an expired run removes these and nothing
#: else: a file the user put there keeps the folder.
RUN_ENTRIES = (
    DB_NAME,
    f"{DB_NAME}-wal",
    f"{DB_NAME}-shm",
    f".{DB_NAME}.reserve",
    "sockets",
    "report",
    "trace.json",
)


@dataclass(frozen=True)
class ExpiredRun:
    """A run folder whose run last recorded anything before the retention window."""

    folder: Path
    last_recorded: dt.datetime  # UTC


def last_recorded(db: Path) -> dt.datetime | None:
    """When the run recorded in `db` last recorded anything (UTC): its recorded end, or for a
    run that never recorded one (killed, or the power went) its start plus the time of its
    newest event. None when `db` is not a readable run database: it is then left alone."""
    try:
        with reading(db) as conn:
            run = conn.execute("SELECT started_utc, t0, ended_utc FROM run").fetchone()
            newest = newest_event(conn)
        if run["ended_utc"] is not None:
            return dt.datetime.fromisoformat(run["ended_utc"])
        since_start = 0.0 if newest is None else max(0.0, newest - run["t0"])
        return dt.datetime.fromisoformat(run["started_utc"]) + dt.timedelta(seconds=since_start)
    except (RunDatabaseError, ValueError, TypeError):  # TypeError: no run row
        return None


def expired_runs(parent: Path, keep_s: float, now: dt.datetime, current: Path) -> list[ExpiredRun]:
    """The run folders in `parent`, other than `current`, whose run last recorded anything
    more than `keep_s` before `now` (UTC), oldest first. A folder without a readable run
    database is not a run's and is never listed; nor is a run that recorded after `now` (the
    clock went back since: its age is unknown)."""
    found = []
    for folder in parent.iterdir():
        if folder == current or not folder.is_dir() or folder.is_symlink():
            continue
        db = folder / DB_NAME
        if not db.is_file():
            continue
        last = last_recorded(db)
        if last is not None and (now - last).total_seconds() > keep_s:
            found.append(ExpiredRun(folder, last))
    return sorted(found, key=lambda run: run.last_recorded)


def remove_run(folder: Path) -> list[str]:
    """Remove what ctxrobot wrote into the run folder `folder` (:data:`RUN_ENTRIES`), then the
    folder if nothing else is left in it. Returns the names of what else is there, kept.
    Raises `OSError` when the file system refuses (permissions, a read-only disk)."""
    for name in RUN_ENTRIES:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    others = sorted(entry.name for entry in folder.iterdir())
    if not others:
        folder.rmdir()
    return others
