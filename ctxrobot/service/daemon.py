"""`ctxrobot daemon`: the runtime as a long-lived service with a control API.

On start it cleans up (thaws and removes) containers a previous instance left behind, then
runs the manifest with the scenario replayed in a loop (on a robot with live sensors the
sources simply never end). A task that crashes is restarted with exponential back-off per
its manifest `restart` policy; each crash and restart is an event on the bus. With a
retention window (`--keep`) it also removes the run folders beside its own whose runs last
recorded more than a window ago: each start records into a new folder, so the window within
one run would not bound the disk across restarts. SIGTERM/SIGINT stop the tasks, flush the
run database and exit 0.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxrobot.manifest.schema import ManifestError, RestartSpec, load_manifest
from ctxrobot.model.events import TaskStateChanged
from ctxrobot.observe.retention import expired_runs, remove_run
from ctxrobot.observe.status import StatusBoard
from ctxrobot.sched.rules import critical_rules
from ctxrobot.sched.signals import check_override
from ctxrobot.sched.state import OverrideSignals, ReloadRules
from ctxrobot.service.control import ControlError
from ctxrobot.service.control_server import ControlServer
from ctxrobot.service.listing import container_rows
from ctxrobot.service.loop import DecisionLoop
from ctxrobot.service.runtime import STOPPED_BY_SIGNAL, RunOptions, Runtime

log = logging.getLogger(__name__)

SUPERVISE_PERIOD_S = 0.25

#: How often a daemon with a retention window looks for earlier run folders it has left
#: behind (they only age, so the first look after starting finds most of them).
EXPIRED_RUNS_PERIOD_S = 600.0


@dataclass
class DaemonOptions:
    config: Path
    socket: Path
    out_dir: Path
    read_group: str | None = None
    operator_group: str | None = None
    policy: str | None = None
    metrics_port: int | None = None
    keep_s: float | None = None  # the run database's retention window (None: everything)


#: A Docker engine that shuts down first stops every container (SIGTERM, then SIGKILL)
#: and only then stops answering, up to its shutdown timeout (15 s by default) later. A
#: container stopped by such a signal is therefore judged only after that long: if the
#: engine goes away meanwhile, the engine failed, not the task.
ENGINE_SHUTDOWN_S = 15.0

#: Longest wait between two restarts: `always` restarts forever, and a doubling back-off
#: would otherwise leave a robot without the task for hours after a bad night.
MAX_BACKOFF_S = 60.0


@dataclass
class _Restarts:
    """Back-off bookkeeping of one task."""

    count: int = 0
    due: float | None = None  # when the next restart attempt may run
    given_up: bool = False
    waiting_for_engine: bool = False  # said once per outage
    judge_at: float | None = None  # when a failure is judged (see ENGINE_SHUTDOWN_S)


def should_restart(policy: RestartSpec, exit_code: int | None, restarts: int) -> bool:
    """Whether a task that stopped serving is started again, as Docker's restart policies
    mean it: ``never``; ``on-failure`` after a non-zero exit or a broken connection (the
    container still runs: ``exit_code`` None), at most ``max_retries`` times; ``always``
    after any exit, a clean one included, with no limit on the count."""
    if policy.policy == "never":
        return False
    if policy.policy == "always":
        return True
    return exit_code != 0 and restarts < policy.max_retries


def backoff_s(policy: RestartSpec, restarts: int) -> float:
    """The wait before restart number ``restarts + 1``: doubling, capped."""
    return min(MAX_BACKOFF_S, policy.backoff_s * 2.0**restarts)


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.manifest = load_manifest(options.config)
        self.runtime = Runtime(
            self.manifest,
            RunOptions(
                out_dir=options.out_dir,
                policy=options.policy,
                metrics_port=options.metrics_port,
                loop=True,
                group=options.read_group,
                keep_s=options.keep_s,
            ),
        )
        self.board = StatusBoard(
            deadlines_ms={t.name: t.deadline_ms for t in self.runtime.tasks},
            critical_rules=critical_rules(self.manifest.rules),
            policy=self.runtime.policy_name,
            config=str(options.config),
            run_dir=str(options.out_dir),
        )
        self.runtime.observers.add(self.board, "status")
        self.control = ControlServer(
            options.socket,
            {
                "status": lambda _r: self.board.snapshot(),
                "ps": self._ps,
                "context": self._context,
                "override": self._override,
                "reload": self._reload,
                "task": self._task,
                "shutdown": self._shutdown,
            },
            read_group=options.read_group,
            operator_group=options.operator_group,
        )
        self._stop = threading.Event()
        self._restarts = {t.name: _Restarts() for t in self.runtime.tasks}
        self._lock = threading.Lock()  # one task operation at a time

    # -- control handlers -----------------------------------------------------------------
    def _ps(self, _request: dict[str, Any]) -> list[dict[str, Any]]:
        return [r for r in container_rows() if r["run"] == self.runtime.run_id]

    def _decisions(self) -> DecisionLoop:
        decisions = self.runtime.decisions
        if decisions is None:
            raise ControlError("the scheduler is not running yet")
        return decisions

    def _context(self, _request: dict[str, Any]) -> dict[str, Any]:
        return self._decisions().call(
            lambda core: {
                "signals": core.context.signals,
                "overrides": core.context.overrides,
                "active_rules": list(core.active_rules),
            }
        )

    def _override(self, request: dict[str, Any]) -> dict[str, Any]:
        """Pin context signals to values (bench testing), or `clear` the pins."""
        decisions = self._decisions()
        if request.get("clear"):
            decisions.submit(OverrideSignals(None))
        else:
            signals = request.get("signals")
            if not isinstance(signals, dict) or not signals:
                raise ControlError('override needs "signals": {name: value, …} or "clear": true')
            try:
                for name, value in signals.items():
                    check_override(name, value)
            except ValueError as err:
                raise ControlError(str(err)) from None
            decisions.submit(OverrideSignals(dict(signals)))
        # Read back after the core applied it: the inbox keeps the order.
        return self._context(request)

    def _reload(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Re-read the manifest and swap in its rules; running tasks are not touched."""
        try:
            fresh = load_manifest(self.options.config)
        except ManifestError as err:
            raise ControlError(
                "reload refused, the running rules stay:\n" + "\n".join(map(str, err.problems))
            ) from None
        self._decisions().submit(ReloadRules(fresh.rules))
        self.board.set_critical_rules(critical_rules(fresh.rules))
        self.manifest = fresh
        log.info("reloaded %d rule(s) from %s", len(fresh.rules), self.options.config)
        return {"rules": [r.name for r in fresh.rules]}

    def _task(self, request: dict[str, Any]) -> dict[str, Any]:
        action, name = request.get("action"), request.get("name")
        if action not in ("stop", "start", "restart") or not isinstance(name, str):
            raise ControlError('task needs "action": stop|start|restart and "name"')
        self.runtime.task_spec(name)  # KeyError with the known names
        with self._lock:
            try:
                getattr(self.runtime, f"{action}_task")(name)
            except (RuntimeError, TimeoutError) as err:
                raise ControlError(str(err)) from None
            self._restarts[name] = _Restarts()
        return {"task": name, "action": action}

    def _shutdown(self, _request: dict[str, Any]) -> dict[str, Any]:
        self._stop.set()
        return {"stopping": True}

    # -- supervision ------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        self.runtime.request_stop()

    def _supervise(self) -> None:
        """Restart crashed tasks with exponential back-off, per their restart policy. A task
        the Docker engine took down with it waits for the engine and is then restarted at
        once, its restart budget untouched: the engine failed, not the task."""
        engine = self.runtime.engine
        now = time.monotonic()
        with self._lock:
            for name, error in self.runtime.failed_tasks().items():
                state = self._restarts[name]
                if state.given_up:
                    continue
                if engine is not None and not engine.available:
                    if not state.waiting_for_engine:
                        state.waiting_for_engine = True
                        self._publish(
                            name,
                            "waiting",
                            f"{error}; the Docker engine does not answer: restarting the task "
                            "when it does",
                        )
                    continue
                if state.waiting_for_engine or self.runtime.engine_lost_since_start(name):
                    state.waiting_for_engine, state.due, state.judge_at = False, None, None
                    self._publish(name, "restarting", "now: the Docker engine restarted")
                    self._restart(name, "the Docker engine came back")
                elif state.due is None:
                    exit_code = self.runtime.exit_code(name)
                    if state.judge_at is None:
                        outside = exit_code in STOPPED_BY_SIGNAL
                        state.judge_at = now + (ENGINE_SHUTDOWN_S if outside else 0.0)
                        self._publish(name, "crashed", error)
                    if now >= state.judge_at:
                        state.judge_at = None
                        self._schedule(name, state, error, exit_code, now)
                elif now >= state.due:
                    state.count += 1
                    state.due = None
                    self._restart(name, f"restart {state.count}")

    def _remove_expired_runs(self, keep_s: float) -> None:
        """Remove the run folders beside this run's whose runs last recorded more than the
        retention window ago: the window holds across the daemon's restarts too."""
        run_dir = self.runtime.run_dir
        now = dt.datetime.now(dt.UTC)
        for run in expired_runs(run_dir.parent, keep_s, now, run_dir):
            age_h = (now - run.last_recorded).total_seconds() / 3600.0
            why = f"last recorded {age_h:.1f} h ago, outside the {keep_s / 3600.0:g} h window"
            try:
                others = remove_run(run.folder)
            except OSError as err:
                log.warning(
                    "cannot remove the run in %s (%s): %s; trying again in %g minutes, or "
                    "remove it by hand",
                    run.folder,
                    why,
                    err,
                    EXPIRED_RUNS_PERIOD_S / 60.0,
                )
                continue
            if others:
                log.warning(
                    "removed the run in %s (%s); kept the folder for what ctxrobot did not write "
                    "there: %s",
                    run.folder,
                    why,
                    ", ".join(others),
                )
            else:
                log.info("removed run folder %s: %s", run.folder, why)

    def _schedule(
        self, name: str, state: _Restarts, error: str, exit_code: int | None, now: float
    ) -> None:
        """A task just failed: give up on it, or set the time of its next restart."""
        policy = self.runtime.task_spec(name).restart
        if not should_restart(policy, exit_code, state.count):
            state.given_up = True
            self._publish(
                name,
                "failed",
                f"not restarted (policy {policy.policy}, exit status "
                f"{'-' if exit_code is None else exit_code}, "
                f"{state.count} restart(s) so far)",
            )
            return
        state.due = now + backoff_s(policy, state.count)
        self._publish(name, "restarting", f"in {state.due - now:.1f} s")

    def _restart(self, name: str, why: str) -> None:
        """One restart attempt. One that fails leaves the task failed: the next round of
        supervision counts it like a crash."""
        try:
            self.runtime.restart_task(name)
            log.info("task %s restarted (%s)", name, why)
        except Exception as err:  # Docker's, the socket's, the task's: all mean "not yet"
            log.error("restart of task %s failed: %s", name, err)

    def _publish(self, task: str, state: str, detail: str) -> None:
        log.warning("task %s %s: %s", task, state, detail)
        self.runtime.bus.publish(
            "task.state", TaskStateChanged(time.monotonic(), task, state, detail)
        )

    def serve(self) -> int:
        """Run until stopped; 0 after a clean stop."""
        self.control.start()
        try:
            self.runtime.start()
            log.info(
                "daemon ready: run %s, control socket %s", self.runtime.run_id, self.options.socket
            )
            next_look = time.monotonic()
            while not self._stop.wait(SUPERVISE_PERIOD_S):
                try:
                    self._supervise()
                    if self.options.keep_s is not None and time.monotonic() >= next_look:
                        next_look = time.monotonic() + EXPIRED_RUNS_PERIOD_S
                        self._remove_expired_runs(self.options.keep_s)
                except Exception:  # supervision must outlive whatever it supervises
                    log.exception("supervision failed; trying again")
        finally:
            self.control.close()
            self.runtime.stop()
            log.info("daemon stopped; run database %s", self.options.out_dir / "run.db")
        return 0
