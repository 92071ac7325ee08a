"""A watchdog process that cleans up a run's containers if the runtime dies.

The runtime starts `python -m ctxrobot.service.guard RUN_ID` with a pipe on its stdin and never
writes to it. When the runtime exits in any way — including `kill -9`, where no Python
`finally` runs — the kernel closes the pipe, the guard reads EOF, and it thaws and removes
every container labelled with that run. After a clean shutdown it finds nothing to do.
A frozen container would otherwise stay frozen forever, holding its memory. When the
Docker engine is what went away (restarting), the guard waits for it and then removes the
containers, which the engine left `Exited`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from ctxrobot.actuate.cgroups import CgroupError, ParentCgroup
from ctxrobot.actuate.docker import DockerBackend
from ctxrobot.model.errors import EngineUnavailableError
from ctxrobot.service.engine import ENGINE_ERRORS

log = logging.getLogger("ctxrobot.service.guard")

#: How long a guard waits for a Docker engine that does not answer (restarting, or
#: stopped for maintenance) before it gives up on removing its run's containers.
ENGINE_GIVE_UP_S = 3600.0


def spawn(run_id: str) -> subprocess.Popen[bytes]:
    """Start the guard for `run_id`; keep the returned process until the run ends."""
    return subprocess.Popen(
        [sys.executable, "-m", "ctxrobot.service.guard", run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        # A Ctrl-C on the terminal must reach the runtime, not kill the guard early.
        start_new_session=True,
    )


def release(guard: subprocess.Popen[bytes], timeout_s: float = 30.0, *, wait: bool = True) -> None:
    """Close the pipe (as a death would) and wait for the guard's final sweep; with
    ``wait=False`` the guard sweeps on its own (it may be waiting for the engine)."""
    if guard.stdin is not None:
        guard.stdin.close()
    if not wait:
        return
    try:
        guard.wait(timeout_s)
    except subprocess.TimeoutExpired:
        guard.kill()


def sweep(run_id: str, *, retry_s: float = 1.0, give_up_s: float = ENGINE_GIVE_UP_S) -> list[str]:
    """Remove the run's containers; while the engine does not answer (it is restarting),
    wait for it, up to ``give_up_s``. Returns the names removed."""
    deadline = time.monotonic() + give_up_s
    waiting = False
    while True:
        try:
            return DockerBackend().cleanup(run_id)
        except (EngineUnavailableError, *ENGINE_ERRORS) as err:
            if time.monotonic() >= deadline:
                log.error(
                    "the Docker engine did not answer for %.0f s (%s); the containers of run "
                    "%s stay: remove them with `docker rm -f $(docker ps -aq --filter "
                    "label=ctxrobot.run=%s)`",
                    give_up_s,
                    err,
                    run_id,
                    run_id,
                )
                return []
            if not waiting:
                log.warning("waiting for the Docker engine to remove run %s: %s", run_id, err)
                waiting = True
            time.sleep(retry_s)
            retry_s = min(10.0, retry_s * 2)


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
    removed = sweep(run_id)
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
