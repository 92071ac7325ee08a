"""A watchdog process that cleans up a run's containers if the runtime dies.

The runtime starts `python -m ctxrobot.service.guard RUN_ID` with a pipe on its stdin and never
writes to it. When the runtime exits in any way — including `kill -9`, where no Python
`finally` runs — the kernel closes the pipe, the guard reads EOF, and it thaws and removes
every container labelled with that run. After a clean shutdown it finds nothing to do.
A frozen container would otherwise stay frozen forever, holding its memory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from ctxrobot.actuate.cgroups import CgroupError, ParentCgroup
from ctxrobot.actuate.docker import DockerBackend

log = logging.getLogger("ctxrobot.service.guard")


def spawn(run_id: str) -> subprocess.Popen[bytes]:
    """Start the guard for `run_id`; keep the returned process until the run ends."""
    return subprocess.Popen(
        [sys.executable, "-m", "ctxrobot.service.guard", run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        # A Ctrl-C on the terminal must reach the runtime, not kill the guard early.
        start_new_session=True,
    )


def release(guard: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Close the pipe (as a death would) and wait for the guard's final sweep."""
    if guard.stdin is not None:
        guard.stdin.close()
    try:
        guard.wait(timeout_s)
    except subprocess.TimeoutExpired:
        guard.kill()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="ctxrobot.service.guard: %(message)s")
    if len(argv) != 1:
        print("usage: python -m ctxrobot.service.guard RUN_ID", file=sys.stderr)
        return 2
    run_id = argv[0]
    # The runtime may run at real-time priority; a watchdog that only waits does not.
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Block until the runtime's end of the pipe closes.
    while os.read(0, 4096):
        pass
    removed = DockerBackend().cleanup(run_id)
    if removed:
        log.warning("runtime of run %s ended without cleaning up; removed %s", run_id, removed)
    try:
        # The envelope cgroup of a `--cpus/--memory` run; nothing to do when there was none.
        ParentCgroup(f"ctxrobot-{run_id}").remove()
    except CgroupError as err:
        log.warning("cannot remove the parent cgroup of run %s: %s", run_id, err)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
