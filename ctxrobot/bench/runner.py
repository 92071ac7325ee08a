"""Running the bench's `ctxrobot run` subprocesses, one step (one or more side-by-side runs)
at a time.

Why each run is a **subprocess** in its own run folder: the runtime's own CPU
(``overhead_cpu_pct``) is then that process's rusage alone, not mixed with the bench's
analysis and plotting; a crashed run cannot take the bench down; and every run leaves a
complete ``run.db`` to inspect with ``ctxrobot report``/``trace`` afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ctxrobot.model.errors import UserError

#: A run gets this many times its scenario length (and at least RUN_TIMEOUT_MIN_S) to finish;
#: without dropping, a starved envelope legitimately runs long, a hung one must not hang the
#: bench forever.
RUN_TIMEOUT_FACTOR = 10.0
RUN_TIMEOUT_MIN_S = 600.0
#: After SIGTERM a run takes its containers down; it gets this long before SIGKILL.
STOP_GRACE_S = 60.0
#: How long a finished run's containers may take to disappear before the next run starts.
SETTLE_TIMEOUT_S = 60.0
#: `ctxrobot run`'s exit status for a problem with the user's input or machine.
EXIT_USAGE = 2


class BenchError(RuntimeError):
    """A run of the bench failed; the message says which and where its log is."""


def run_timeout_s(scenario_s: float) -> float:
    return max(RUN_TIMEOUT_MIN_S, RUN_TIMEOUT_FACTOR * scenario_s)


class _Launched:
    """One started run: its process, its stderr log, and where it writes."""

    def __init__(self, cmd: Sequence[str], out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.log_path = out_dir / "run.log"
        self._err: IO[str] = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True)

    def finish(self, deadline: float) -> dict[str, Any]:
        """Wait until the run ends (at the latest at monotonic ``deadline``); its summary."""
        try:
            stdout, _ = self.proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"run timed out; log: {self.log_path}") from None
        finally:
            self._err.close()
        return self._summary(stdout)

    def stop(self) -> None:
        """SIGTERM (the run takes its containers down like any clean stop), then SIGKILL."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()

    def _summary(self, stdout: str) -> dict[str, Any]:
        lines = stdout.strip().splitlines()
        summary: dict[str, Any] | None = None
        if lines:
            try:
                summary = json.loads(lines[-1])
            except json.JSONDecodeError:
                summary = None
        log_lines = self.log_path.read_text(errors="replace").splitlines()
        if self.proc.returncode == EXIT_USAGE and log_lines:
            # The run's own one-line verdict on the user's input or machine: it holds for every
            # run of the bench, so say it as it is instead of as one run's failure.
            message = log_lines[-1].removeprefix("ctxrobot run: ")
            raise UserError(f"{message} (log: {self.log_path})")
        if self.proc.returncode != 0 or summary is None or summary.get("failure"):
            tail = "\n".join(log_lines[-15:])
            raise BenchError(
                f"run failed (exit {self.proc.returncode}); log: {self.log_path}\n{tail}"
            )
        return summary


def execute_step(
    commands: Sequence[tuple[Sequence[str], Path]], timeout_s: float
) -> list[dict[str, Any]]:
    """Start every run of a step, wait for all; their summaries in the same order.

    When one fails, the others are stopped and the first failure is raised.
    """
    launched = [_Launched(cmd, out_dir) for cmd, out_dir in commands]
    deadline = time.monotonic() + timeout_s
    summaries: list[dict[str, Any]] = []
    try:
        for run in launched:
            summaries.append(run.finish(deadline))
    except KeyboardInterrupt:
        # The runs got the same SIGINT (same process group): let them finish their take-down.
        for run in launched:
            run.proc.wait(STOP_GRACE_S)
        raise
    except BaseException:
        for run in launched:
            run.stop()
        raise
    for _, out_dir in commands:
        wait_for_teardown(out_dir)
    return summaries


def wait_for_teardown(run_dir: Path, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Until no container of the run in ``run_dir`` is left (its guard may still be removing
    them): the next run must not start beside a container that is still going down, which
    would both load the machine and race the next run's own stale-container cleanup."""
    from ctxrobot.actuate.docker import DockerBackend
    from ctxrobot.observe.readers import reading

    with reading(run_dir) as conn:
        run_id = conn.execute("SELECT id FROM run").fetchone()[0]
    backend = DockerBackend()
    deadline = time.monotonic() + timeout_s
    while backend.list_managed(run_id):
        if time.monotonic() > deadline:
            raise BenchError(f"containers of run {run_id} still exist {timeout_s:.0f} s after it")
        time.sleep(0.5)
