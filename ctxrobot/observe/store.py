"""The run database's writer: `RunStore` records one run into `<run_dir>/run.db`.

Why it is shaped this way:

- The store is an observer of the pipeline (`ctxrobot.observe.pipeline`): its handlers run
  on the pipeline's thread and only turn an event into a row tuple appended to a bounded
  in-memory buffer. A single writer thread owns the SQLite connection and inserts each
  batch in one transaction (one fsync per batch, not per row); the hot path never waits
  on the disk.
- **The scheduler core's inputs are recorded** (`core_inputs`: every event the decision
  thread handed the core, with the `now` it was handed, in order; `ctxrobot.observe.inputs`
  is the codec), so a run can be replayed through a fresh core in virtual time.
- WAL mode lets `ctxrobot report`, `trace` and `summarize` read a run while the daemon is
  still writing it.
- **A disk that refuses rows does not end the run.** The store keeps the newest
  `BUFFER_ROWS` rows in memory and retries every `RETRY_INTERVAL_S`; older rows are
  dropped and counted. It says so in one log line when it starts, one when writing works
  again, and records the count in the run row (`recording_json`) at `close`.
- **`close` always records the run's end** (`ended_utc`, duration, summary): a small
  reserve file, made when the run starts, is given back to the file system when the end
  would not fit on a full disk. `close` never raises on a write error.
- **A run that never ends keeps a window** (`keep_s`, `--keep`): a robot records about
  75 MB an hour, so a daemon would fill an SD card within weeks. Every `PRUNE_PERIOD_S`
  the writer deletes the rows older than the window, in small transactions (the WAL never
  holds more than a chunk of deletions), except the state still in force when the window
  begins (`retention.RETAINED`). SQLite reuses the freed pages, so the file stops growing
  once it holds a window. The cut is taken from the newest recorded event, not from a
  clock, and what went is recorded in the `retention` table.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    CoreInput,
    RuleChanged,
    SampleDropped,
    SourceStateChanged,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.observe.inputs import encode
from ctxrobot.observe.paths import (
    RUN_DB_MODE,
    OutputPathError,
    create_file,
    group_id,
    os_problem,
    prepare_run_folder,
)
from ctxrobot.observe.pipeline import Handler
from ctxrobot.observe.retention import prune
from ctxrobot.observe.schema import DB_NAME, INSERTS, create_database
from ctxrobot.observe.values import allocated_shares, dumps

__all__ = ["RunStore", "TaskRow"]

log = logging.getLogger(__name__)

# Tasks arrive as (name, image, deadline_ms, cpu_min, cpu_max).
TaskRow = tuple[str, str, float | None, float | None, float | None]
Row = tuple[str, tuple[Any, ...]]  # (table, values)

_SQLITE_FULL = 13
# A row that cannot be stored, as opposed to a disk that cannot store anything.
_BAD_ROW_ERRORS = (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.IntegrityError)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _write_problem(err: sqlite3.Error | OSError) -> str:
    """Why a write failed, in words ("the disk is full" for every way SQLite says it)."""
    if isinstance(err, OSError):
        return os_problem(err)
    if getattr(err, "sqlite_errorcode", None) == _SQLITE_FULL:
        return "the disk is full"
    return str(err)


class RunStore:
    """Writes one run's events into `<run_dir>/run.db` from a background writer thread."""

    #: The writer flushes at least this often, so live readers lag by at most this much.
    FLUSH_INTERVAL_S = 0.25
    #: ...or as soon as this many rows are pending; also the size of one transaction.
    FLUSH_ROWS = 2000
    #: Rows kept in memory while the disk refuses them (a few MB); the oldest go first.
    BUFFER_ROWS = 20_000
    #: How long an event waits for a healthy writer that is behind before a row is dropped.
    CATCH_UP_S = 5.0
    #: How often a refused write is tried again.
    RETRY_INTERVAL_S = 2.0
    #: Space set aside at the start so that the run's end fits on a full disk.
    RESERVE_BYTES = 256 * 1024
    #: How often a run with a retention window prunes what fell out of it.
    PRUNE_PERIOD_S = 60.0
    #: Rows deleted per transaction when pruning.
    PRUNE_CHUNK_ROWS = 5000

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        deadlines_ms: Mapping[str, float | None],
        reserve: Path | None = None,
        keep_s: float | None = None,
    ) -> None:
        """Use `create`; this takes over an open connection to an initialised database."""
        self.path = path
        self._conn = conn
        self._deadlines_ms = dict(deadlines_ms)
        self._reserve = reserve
        self.keep_s = keep_s  # the retention window (None: the whole run is kept)
        self._next_prune = time.monotonic() + self.PRUNE_PERIOD_S
        self._prune_requested = False
        self._prunes = 0  # prunes finished, successful or not
        self.rows_pruned = 0
        self._logged_prune_error = False
        self._allocated: dict[str, float] = {}  # task → share, from the last allocation
        self._pending: collections.deque[Row] = collections.deque(maxlen=self.BUFFER_ROWS)
        self._cond = threading.Condition()
        self._stop = False
        self._urgent = False  # `flush` asked for a write now, not at the next interval
        self._closed = False
        self._added = 0  # rows ever handed in
        self._settled = 0  # rows written or dropped: `flush` waits for it to catch up
        self._in_flight = 0  # rows the writer is trying to write right now
        self._attempts = 0  # write attempts finished, successful or not
        self.rows_written = 0
        self.rows_lost = 0  # dropped from a full buffer, or never written by `close`
        self.write_error: str | None = None  # why writing failed (None: it never did)
        self._failing = False  # the last write failed; rows are being kept in memory
        self._logged_bad_row = False
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        *,
        run_id: str,
        t0: float,
        policy: str,
        manifest_path: str | Path | None,
        scenario_path: str | Path | None,
        ncpus: float,
        tasks: Iterable[TaskRow],
        group: str | int | None = None,
        keep_s: float | None = None,
    ) -> RunStore:
        """Create the run folder (0750) and database (0640), owned by `group` when given;
        record the run and its tasks. Problems the user can fix raise `OutputPathError`.

        `keep_s`: keep only the last this many seconds of events (None: all of them)."""
        if keep_s is not None and not keep_s > 0:
            raise ValueError(f"a retention window must be positive, not {keep_s} s")
        run_dir = prepare_run_folder(run_dir, group)
        path = run_dir / DB_NAME
        if path.exists():
            # Appending a second run would make every reader's numbers a mix of two runs.
            raise OutputPathError(
                f"{path} exists: every run needs its own run folder; give --out a new one"
            )
        task_rows = [tuple(t) for t in tasks]
        run_row = (
            run_id,
            _utc_now(),
            t0,
            policy,
            None if manifest_path is None else str(manifest_path),
            None if scenario_path is None else str(scenario_path),
            socket.gethostname(),
            ncpus,
        )
        reserve = run_dir / f".{DB_NAME}.reserve"
        try:
            create_file(path, RUN_DB_MODE, group_id(group))
            conn = create_database(path, run_row, task_rows, keep_s)
            create_file(reserve, 0o600, None, size=cls.RESERVE_BYTES)
        except (OSError, sqlite3.Error) as err:
            for leftover in (path, path.with_name(f"{DB_NAME}-wal"), reserve):
                leftover.unlink(missing_ok=True)
            raise OutputPathError(
                f"cannot create {path}: {_write_problem(err)}: free space there or give "
                "--out a folder on another disk"
            ) from err
        return cls(path, conn, {row[0]: row[2] for row in task_rows}, reserve, keep_s)

    # -- the observer: event → row, on the pipeline's thread -------------------------------

    def handlers(self) -> Mapping[type, Handler]:
        return {
            TaskResult: self._on_result,
            SampleDropped: self._on_dropped,
            TaskStateChanged: self._on_state,
            ContextChanged: self._on_context,
            RuleChanged: self._on_rule,
            AllocationApplied: self._on_allocation,
            UsageSampled: self._on_usage,
            SourceStateChanged: self._on_source,
            CoreInput: self._on_core_input,
        }

    def _on_result(self, ev: TaskResult) -> None:
        latency_ms = ev.latency_s * 1000.0
        miss = ev.missed(self._deadlines_ms.get(ev.task))
        # int(): SQLite would store a numpy integer as a blob.
        sample = int(ev.sample_id)
        row = (ev.task, sample, ev.t_sensor, ev.t_start, ev.t_end, latency_ms, int(miss))
        self._add("samples", (*row, dumps(ev.result)))

    def _on_dropped(self, ev: SampleDropped) -> None:
        self._add("drops", (ev.task, int(ev.sample_id), ev.t, ev.reason))

    def _on_state(self, ev: TaskStateChanged) -> None:
        self._add("task_states", (ev.t, ev.task, ev.state, ev.detail))

    def _on_context(self, ev: ContextChanged) -> None:
        self._add("context", (ev.t, dumps(ev.signals), dumps(list(ev.changed))))

    def _on_rule(self, ev: RuleChanged) -> None:
        self._add("rules", (ev.t, ev.rule, int(ev.active)))

    def _on_allocation(self, ev: AllocationApplied) -> None:
        self._allocated = allocated_shares(ev.allocation)
        row = (ev.t, ev.trigger_t, ev.policy, ev.reason, dumps(ev.allocation), ev.actuation_ms)
        self._add("allocations", row)

    def _on_usage(self, ev: UsageSampled) -> None:
        # NULL allocated share: no allocation was applied yet (or ever, under `cfs`).
        for task, used in ev.used.items():
            self._add("usage", (ev.t, task, float(used), self._allocated.get(task)))

    def _on_source(self, ev: SourceStateChanged) -> None:
        self._add("source_states", (ev.t, ev.source, ev.state, ev.detail))

    def _on_core_input(self, ev: CoreInput) -> None:
        # Encoded here, on the pipeline's thread: the decision thread only published it.
        kind, body = encode(ev.event)
        self._add("core_inputs", (ev.t, ev.seq, kind, body))

    def _add(self, table: str, row: tuple[Any, ...]) -> None:
        with self._cond:
            if self._closed:
                self.rows_lost += 1
                return
            if len(self._pending) == self.BUFFER_ROWS and not self._failing:
                # A healthy writer that is behind catches up: the observer thread waits for
                # it rather than lose rows. Only a disk that refuses them drops rows.
                self._cond.notify_all()
                self._cond.wait_for(
                    lambda: len(self._pending) < self.BUFFER_ROWS or self._failing,
                    self.CATCH_UP_S,
                )
            if len(self._pending) == self.BUFFER_ROWS:
                self.rows_lost += 1  # the deque drops its oldest row
                self._settled += 1
            self._pending.append((table, row))
            self._added += 1
            if len(self._pending) >= self.FLUSH_ROWS and not self._failing:
                self._cond.notify_all()

    # -- the writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stop
                        or self._urgent
                        or self._prune_requested
                        or (len(self._pending) >= self.FLUSH_ROWS and not self._failing)
                    ),
                    self.RETRY_INTERVAL_S if self._failing else self.FLUSH_INTERVAL_S,
                )
                if self._stop:
                    return  # `close` writes what is left
                self._urgent = False
                batch = list(self._pending)
                self._pending.clear()
                self._in_flight = len(batch)
                self._cond.notify_all()  # room again for an event waiting in `_add`
            if batch:
                self._write_or_keep(batch)
            # Not held while waiting for the next batch: up to BUFFER_ROWS rows of memory.
            del batch
            if self.keep_s is not None and (
                self._prune_requested or time.monotonic() >= self._next_prune
            ):
                self._prune(self.keep_s)

    def _write_or_keep(self, batch: Sequence[Row]) -> None:
        """Write `batch`; rows the disk refuses go back to the front of the buffer."""
        written, error = self._write_chunks(batch)
        with self._cond:
            self._settled += written
            self._in_flight = 0
            self._attempts += 1
            if error is None:
                if self._failing:
                    self._failing = False
                    log.warning(
                        "run store: writing %s again; %d row(s) were dropped while it failed",
                        self.path,
                        self.rows_lost,
                    )
            else:
                kept = collections.deque(
                    itertools.chain(batch[written:], self._pending), maxlen=self.BUFFER_ROWS
                )
                dropped = len(batch) - written + len(self._pending) - len(kept)
                self.rows_lost += dropped
                self._settled += dropped
                self._pending = kept
                if not self._failing:
                    self._failing = True
                    self.write_error = error
                    log.error(
                        "run store: cannot write %s (%s); the run goes on, keeping the newest "
                        "%d rows in memory and retrying every %.0f s (older rows are dropped "
                        "and counted); free space there to record them",
                        self.path,
                        error,
                        self.BUFFER_ROWS,
                        self.RETRY_INTERVAL_S,
                    )
            self._cond.notify_all()

    def _write_chunks(self, rows: Sequence[Row]) -> tuple[int, str | None]:
        """Insert `rows` in transactions of `FLUSH_ROWS`; (rows handled, why it stopped).

        A row SQLite cannot store (a value it cannot bind, a NULL where none may be) is
        dropped and counted, so that one bad event cannot stop the recording."""
        handled = 0
        for start in range(0, len(rows), self.FLUSH_ROWS):
            chunk = rows[start : start + self.FLUSH_ROWS]
            try:
                try:
                    written = self._insert(chunk, skip_bad_rows=False)
                except _BAD_ROW_ERRORS:
                    self._roll_back()
                    written = self._insert(chunk, skip_bad_rows=True)
            except sqlite3.Error as err:
                self._roll_back()
                return handled, _write_problem(err)
            self.rows_written += written
            handled += len(chunk)
            if written < len(chunk):
                with self._cond:
                    self.rows_lost += len(chunk) - written
        return handled, None

    def _insert(self, chunk: Sequence[Row], *, skip_bad_rows: bool) -> int:
        """Insert `chunk` in one transaction; returns the rows written. Without
        `skip_bad_rows` a bad row fails the whole chunk (fast path: one executemany per
        table); with it, rows go one by one and bad ones are left out."""
        with self._conn:
            self._conn.execute("BEGIN")
            if not skip_bad_rows:
                by_table: dict[str, list[tuple[Any, ...]]] = {}
                for table, row in chunk:
                    by_table.setdefault(table, []).append(row)
                for table, values in by_table.items():
                    self._conn.executemany(INSERTS[table], values)
                return len(chunk)
            written = 0
            for table, row in chunk:
                try:
                    self._conn.execute(INSERTS[table], row)
                    written += 1
                except _BAD_ROW_ERRORS as err:
                    if not self._logged_bad_row:
                        self._logged_bad_row = True
                        log.error("run store: dropped a %s row SQLite cannot store: %s", table, err)
            return written

    def _roll_back(self) -> None:
        """Leave no transaction open after a failed write (rollback itself may fail)."""
        if self._conn.in_transaction:
            try:
                self._conn.rollback()
            except sqlite3.Error:
                log.debug("run store: rollback failed", exc_info=True)

    def _prune(self, keep_s: float) -> None:
        """Delete what fell out of the retention window (on the writer thread, which owns
        the connection). A failure (a full disk refuses even deletions in WAL mode) is
        logged once and tried again at the next period; the recording goes on."""
        with self._cond:
            self._prune_requested = False
        self._next_prune = time.monotonic() + self.PRUNE_PERIOD_S
        try:
            prune(self._conn, keep_s, self.PRUNE_CHUNK_ROWS, self._count_pruned)
        except sqlite3.Error as err:
            self._roll_back()
            if not self._logged_prune_error:
                self._logged_prune_error = True
                log.warning(
                    "run store: cannot prune %s to its %.0f s window (%s); trying again "
                    "every %.0f s",
                    self.path,
                    keep_s,
                    _write_problem(err),
                    self.PRUNE_PERIOD_S,
                )
        with self._cond:
            self._prunes += 1
            self._cond.notify_all()

    def _count_pruned(self, rows: int) -> None:
        with self._cond:
            self.rows_pruned += rows

    # -- control ---------------------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Commit every row handed to the store so far, now (live readers, tests).

        Returns False when not all of them could be written (timeout, or the disk refused
        them once more). Events still queued in the pipeline are not included:
        `pipeline.drain()` first.
        """
        with self._cond:
            target, attempts = self._added, self._attempts
            self._urgent = True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: self._settled >= target or (self._failing and self._attempts > attempts),
                timeout_s,
            )
            return self._settled >= target

    def prune(self, timeout_s: float = 5.0) -> bool:
        """Prune to the retention window now instead of at the next period (what a test of
        the window calls); `flush` first for the newest rows to count.
        Returns False when the store has no window or the prune did not finish in time."""
        if self.keep_s is None:
            return False
        with self._cond:
            done = self._prunes
            self._prune_requested = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._prunes > done, timeout_s)

    @property
    def rows_buffered(self) -> int:
        """Rows in memory waiting for the disk."""
        with self._cond:
            return len(self._pending) + self._in_flight

    def recording(self) -> dict[str, Any]:
        """How the recording went: rows written, rows lost, why writing failed."""
        with self._cond:
            return {
                "rows_written": self.rows_written,
                "rows_lost": self.rows_lost,
                "write_error": self.write_error,
                "rows_pruned": self.rows_pruned,
            }

    def close(self, duration_s: float, summary: Mapping[str, Any] | None = None) -> None:
        """Write every pending row and the run's end, then close the file. Idempotent.

        Close the pipeline first, so that no event arrives after. Never raises on a write
        error: what cannot be written is counted, logged, and recorded in the run row.
        """
        if self._closed:
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._writer.join()
        with self._cond:
            self._closed = True
            rest = list(self._pending)
            self._pending.clear()
        written, error = self._write_chunks(rest)
        if error is not None:
            self.write_error = self.write_error or error
            self.rows_lost += len(rest) - written
        recording = self.recording()
        ended = self._write_end(duration_s, summary, recording)
        if recording["rows_lost"] and ended:
            log.warning(
                "run store: %d of %d rows could not be written to %s (%s); the run's end, "
                "summary and that count are recorded",
                recording["rows_lost"],
                recording["rows_lost"] + recording["rows_written"],
                self.path,
                self.write_error,
            )
        self._fold_wal()
        self._conn.close()
        if self._reserve is not None:
            self._reserve.unlink(missing_ok=True)

    def _write_end(
        self, duration_s: float, summary: Mapping[str, Any] | None, recording: Mapping[str, Any]
    ) -> bool:
        """Record the run's end; on a full disk, give the reserve back and try once more.
        Returns whether it is recorded."""
        values = (
            _utc_now(),
            duration_s,
            None if summary is None else dumps(summary),
            dumps(recording),
        )
        for attempt in ("first", "after releasing the reserve"):  # at most two
            try:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.execute(
                        "UPDATE run SET ended_utc = ?, duration_s = ?, summary_json = ?,"
                        " recording_json = ?",
                        values,
                    )
                return True
            except sqlite3.Error as err:
                self._roll_back()
                if attempt == "first" and self._reserve is not None:
                    self._reserve.unlink(missing_ok=True)
                    self._reserve = None
                    continue
                log.error(
                    "run store: cannot record the end of the run in %s (%s); %d of %d rows "
                    "are there, its duration and summary are not",
                    self.path,
                    _write_problem(err),
                    recording["rows_written"],
                    recording["rows_lost"] + recording["rows_written"],
                )
                return False
        return False

    def _fold_wal(self) -> None:
        """A finished run is read, copied and archived, not written: fold the WAL back into
        run.db and leave WAL mode, so run.db alone is the whole run and read-only readers
        need no -shm file next to it. Best effort: on a full disk the WAL stays, and
        readers read it."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            mode = self._conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        except sqlite3.Error as err:
            log.info("run store: %s keeps its WAL file (%s)", self.path, _write_problem(err))
            return
        if mode != "delete":
            # A live reader still holds the db open; run.db is complete anyway after the
            # checkpoint, it just stays in WAL mode.
            log.info("run store: %s stays in WAL mode (a reader has it open)", self.path)
