"""One run of a robot manifest: containers, channels, context, scheduler, replay, database.

`Runtime.start()` brings everything up in dependency order, `wait()` lets the scenario
play, and `stop()` takes everything down in reverse, whatever happened before: it is
called from a `finally`, and a guard process (`ctxrobot.service.guard`) covers the cases where no
`finally` runs at all.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.actuate.cgroups import CgroupError, CpuController, ParentCgroup
from ctxrobot.actuate.docker import TASK_UID, BindMount, ContainerSpec, DockerBackend, Security
from ctxrobot.manifest.schema import Manifest, TaskSpec
from ctxrobot.model.allocation import Machine
from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import DataMissingError, UserError
from ctxrobot.model.events import TaskStateChanged, UsageSampled
from ctxrobot.observe.metrics import MetricsExporter
from ctxrobot.observe.paths import prepare_run_folder
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.readers import summarize
from ctxrobot.observe.store import RunStore
from ctxrobot.service import guard
from ctxrobot.service.core import build_core
from ctxrobot.service.engine import ENGINE_ERRORS, EngineWatch, remove_run
from ctxrobot.service.freezes import FreezeWatch
from ctxrobot.service.host import read_host
from ctxrobot.service.loop import (
    DecisionLoop,
    Executor,
    PeriodicSampler,
    pin_threads,
    runtime_cpu,
)
from ctxrobot.streams.channel import TaskChannel
from ctxrobot.streams.replay import ScenarioPlayer, build_sources
from ctxrobot.streams.source import Fired, LiveSource
from ctxtask.protocol import ConnectionClosed

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = float(os.environ.get("CTXROBOT_GIL_SWITCH_S", "0.0005"))
CONTAINER_SOCKET_DIR = "/run/ctxrobot"
CONTAINER_DATA_DIR = "/data"
#: How long the take-down waits for a Docker engine that does not answer before it leaves
#: the run's containers to the guard (which waits for the engine as long as it takes).
ENGINE_WAIT_S = float(os.environ.get("CTXROBOT_ENGINE_WAIT_S", "30"))
#: Exit statuses of a container stopped by a signal from outside the task: `docker stop`
#: or `docker kill`, the kernel's OOM killer, or the Docker engine shutting down.
STOPPED_BY_SIGNAL = {128 + 15: "SIGTERM", 128 + 9: "SIGKILL"}


@dataclass
class RunOptions:
    """What `ctxrobot run` (and `bench`) may change about a manifest's run."""

    out_dir: Path
    policy: str | None = None  # None: the manifest's scheduler.policy
    duration_s: float | None = None  # None: the scenario's duration
    no_drop: bool = False  # bench mode: every sample is processed, then the run ends
    only_tasks: tuple[str, ...] | None = None  # bench `isolated`: run a subset
    cpus: float | None = None  # confine all tasks to this many CPUs (parent cgroup)
    memory_bytes: int | None = None
    connect_timeout_s: float = 180.0  # model loading on a Pi takes a while
    metrics_port: int | None = None
    loop: bool = False  # the daemon replays its scenario until stopped
    group: str | None = None  # owner group of the run folder and run.db (the daemon's readers)
    keep_s: float | None = None  # record only the last keep_s seconds (None: the whole run)

    def __post_init__(self) -> None:
        # The run folder becomes bind-mount sources (task sockets) and is logged for the
        # user: relative to the caller's working directory it would be neither.
        self.out_dir = self.out_dir.resolve()


def run_folder(out: str | None, prefix: str = "") -> Path:
    """The absolute run folder for ``--out`` (None: ``runs/<prefix><time>`` here)."""
    if out is not None:
        return Path(out).resolve()
    return (Path("runs") / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}").resolve()


class RunFailed(RuntimeError):
    """A run could not start or a task failed during it."""


class Runtime:
    def __init__(self, manifest: Manifest, options: RunOptions) -> None:
        self.manifest = manifest
        self.options = options
        self.policy_name = options.policy or manifest.scheduler.policy
        tasks = manifest.tasks
        if options.only_tasks is not None:
            tasks = [t for t in tasks if t.name in options.only_tasks]
        self.tasks: list[TaskSpec] = tasks
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.run_dir = options.out_dir
        self.bus = EventBus()
        # "The whole machine" that shares refer to: the robot's CPUs, or the envelope the
        # tasks are confined to (`--cpus`), whichever is smaller.
        self.machine = Machine(
            min(options.cpus, manifest.robot.cpus) if options.cpus else manifest.robot.cpus
        )
        self.channels: dict[str, TaskChannel] = {}
        self.controllers: dict[str, CpuController] = {}
        self.container_names: dict[str, str] = {}
        self.backend: DockerBackend | None = None
        self.engine: EngineWatch | None = None
        # The engine's loss count when each task's container was started: a task started
        # before the latest loss may have died of it (see `engine_lost_since_start`).
        self._task_epoch: dict[str, int] = {}
        self.actuator: Actuator | None = None
        self._cgroup_parent: str | None = None
        self.store: RunStore | None = None
        self.player: ScenarioPlayer | None = None
        self.live_sources: list[LiveSource] = []
        self.decisions: DecisionLoop | None = None
        self.parent: ParentCgroup | None = None
        self._guard: Any = None
        self._stop = threading.Event()
        self._stopped = False
        self._extra_stops: list[Callable[[], None]] = []
        self.t0 = 0.0
        self.t_play = 0.0
        self._cpu_play = self._cpu_end = 0.0
        self.t_end = 0.0
        # Store, status and metrics read the bus through this one consumer thread.
        self.observers = ObserverPipeline(self.bus)
        self.metrics: MetricsExporter | None = None
        self._usage: dict[str, tuple[float, int]] = {}
        self.failure: str | None = None
        # Failures no channel shows: a start that failed, a freeze that cannot be undone.
        self._failures: dict[str, str] = {}
        self.freezes: FreezeWatch | None = None  # tasks frozen by someone else
        self.task_summaries: dict[str, dict[str, object]] = {}
        self._runtime_cpu: int | None = None
        # Given back to every thread at the end: the process may run other things after.
        self._cpus_before = os.sched_getaffinity(0)

    # -- bring-up ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bring the run up; on failure everything already started is taken down."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._runtime_cpu = runtime_cpu()  # a bad setting fails before anything is made
        for warning in self.manifest.warnings:
            log.warning("%s", warning)
        data = self.manifest.data_dir
        if not data.is_dir():
            raise DataMissingError(
                f"data folder {data} not found: set CTXROBOT_DATA to the shared data folder "
                "(it holds slam/, signs/, speech/), or download it with `ctxrobot data fetch`"
            )
        self.run_dir = prepare_run_folder(self.run_dir, self.options.group)
        scenario = self.manifest.scenario
        duration = self.options.duration_s or scenario.duration_s
        # Replay data are read and decoded before anything starts: no disk I/O while playing.
        sources = build_sources(scenario, self.manifest.data_dir)
        try:
            self.player = ScenarioPlayer(
                sources.replay, duration, self._emit, loop=self.options.loop
            )
        except ValueError as err:  # the dataset readers name the file and the problem
            raise UserError(
                f"cannot replay scenario {scenario.path}: {err}; restore the file "
                "(`ctxrobot data fetch` re-creates the shared data) or point the scenario "
                "at another recording"
            ) from err
        self.live_sources = sources.live
        # The run's clock origin: everything in run.db is relative to it. Playback starts
        # later, once every task has connected (`t_play`).
        self.t0 = time.monotonic()
        self.store = RunStore.create(
            self.run_dir,
            run_id=self.run_id,
            t0=self.t0,
            policy=self.policy_name,
            manifest_path=str(self.manifest.path),
            scenario_path=str(scenario.path),
            ncpus=self.machine.cpus,
            tasks=[
                (t.name, t.image, t.deadline_ms, t.resources.cpu_min, t.resources.cpu_max)
                for t in self.tasks
            ],
            group=self.options.group,
            keep_s=self.options.keep_s,
        )
        self.observers.add(self.store, "store")
        self.backend = DockerBackend()
        self.engine = EngineWatch()
        self.engine.start()
        # The envelope needs write access to the cgroup tree: fail on it before anything runs.
        self._cgroup_parent = self._make_parent()
        stale = self.backend.cleanup()
        if stale:
            log.warning("removed containers left by a previous instance: %s", ", ".join(stale))
        self._guard = guard.spawn(self.run_id)
        for spec in self.tasks:
            self._start_task(spec)
        for spec in self.tasks:
            self._await_task(spec)
        self.actuator = Actuator(self.controllers, self.machine)
        # A decision waits for the GIL behind whichever thread holds it, up to Python's
        # switch interval (5 ms by default); the decision thread's real-time priority only
        # helps once it holds the GIL.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if self._runtime_cpu is not None:
            pin_threads({self._runtime_cpu})
        self._start_decisions(self.actuator)
        self._start_metrics()
        self._start_sampler()
        self.t_play = time.monotonic()
        self._cpu_play = _own_cpu_s()
        self.player.start(self.t_play)
        for source in self.live_sources:
            source.attach(self.bus)
            source.start(self._emit, self.t_play)
        log.info(
            "run %s started: %d task(s), policy %s", self.run_id, len(self.tasks), self.policy_name
        )

    def _make_parent(self) -> str | None:
        """A parent cgroup holding every task container, optionally with an envelope."""
        if self.options.cpus is None and self.options.memory_bytes is None:
            return None
        self.parent = ParentCgroup(f"ctxrobot-{self.run_id}")
        self.parent.create()
        self.parent.set_cpus(self.options.cpus)
        self.parent.set_memory(self.options.memory_bytes)
        return self.parent.docker_parent

    def _start_task(self, spec: TaskSpec) -> None:
        assert self.backend is not None and self.engine is not None
        self._task_epoch[spec.name] = self.engine.epoch
        channel = TaskChannel(
            spec.name,
            self.run_dir / "sockets" / spec.name,
            self.bus,
            queue_depth=spec.queue.depth,
            # Never dropping means waiting for room: the queue stays bounded either way.
            overflow="block" if self.options.no_drop else spec.queue.overflow,
        )
        channel.listen(uid=TASK_UID)
        self.channels[spec.name] = channel
        mounts = [
            BindMount(channel.socket_dir, CONTAINER_SOCKET_DIR, read_only=False),
            BindMount(self.manifest.data_dir, CONTAINER_DATA_DIR, read_only=True),
            *(BindMount(m.source, m.target, m.read_only) for m in spec.mounts),
        ]
        config = dict(spec.config)
        env = {
            **spec.env,
            "CTXROBOT_TASK_CONFIG": json.dumps(config),
            "CTXROBOT_DATA": CONTAINER_DATA_DIR,
            "CTXROBOT_SOCKET": f"{CONTAINER_SOCKET_DIR}/task.sock",
            "CTXROBOT_CONNECT_TIMEOUT": str(self.options.connect_timeout_s),
        }
        name = f"ctxrobot-{self.run_id}-{spec.name}"
        self.backend.create_and_start(
            ContainerSpec(
                name=name,
                image=spec.image,
                task=spec.name,
                run_id=self.run_id,
                command=list(spec.command) if spec.command else None,
                env=env,
                mounts=tuple(mounts),
                memory_bytes=spec.resources.memory,
                cgroup_parent=self._cgroup_parent,
                security=Security(
                    cap_add=tuple(spec.security.cap_add),
                    read_only_root=spec.security.read_only_root,
                    pids_limit=spec.security.pids_limit,
                    no_new_privileges=spec.security.no_new_privileges,
                ),
            )
        )
        self.container_names[spec.name] = name
        self._publish_state(spec.name, "starting")

    def _container_alive(self, task: str) -> bool:
        assert self.backend is not None
        try:
            container = self.backend.get(self.container_names[task])
            if container is None:
                return False
            container.reload()
        except ENGINE_ERRORS:
            return False  # the engine went away, and the container with it
        return container.status in ("created", "running")

    def _await_task(self, spec: TaskSpec) -> None:
        """Wait for the task's hello; a task that dies first fails the run with its logs."""
        assert self.backend is not None
        try:
            self.channels[spec.name].accept(
                self.options.connect_timeout_s, alive=lambda: self._container_alive(spec.name)
            )
        except (RuntimeError, TimeoutError) as exc:
            raise RunFailed(f"{exc}\n{self._logs_tail(spec.name)}") from exc
        controller = self.backend.controller_for(self.container_names[spec.name])
        self.controllers[spec.name] = controller
        if self.actuator is not None:  # a restart: the scheduler is already running
            self.actuator.attach(spec.name, controller)
        # The scheduler hears "running" and writes the task's allocation into its new
        # container, so the controller must be attached first.
        self._publish_state(spec.name, "running")

    def _logs_tail(self, task: str, lines: int = 20) -> str:
        assert self.backend is not None
        try:
            container = self.backend.get(self.container_names[task])
            if container is None:
                return f"(container of task {task!r} is gone)"
            text = container.logs(tail=lines).decode(errors="replace").rstrip()
        except ENGINE_ERRORS as err:
            return f"(logs of task {task!r} are unavailable: the Docker engine: {err})"
        return f"last {lines} log lines of task {task!r}:\n{text}"

    def _start_decisions(self, actuator: Actuator) -> None:
        core = build_core(self.manifest, self.policy_name, [t.name for t in self.tasks])
        self.decisions = DecisionLoop(core, Executor(actuator, self._set_dispatch, self.bus))
        self.decisions.attach(self.bus)
        self.decisions.start()

    def _set_dispatch(self, task: str, rate_hz: float | None, stale_after_s: float | None) -> None:
        if (channel := self.channels.get(task)) is not None:
            channel.set_dispatch(rate_hz, stale_after_s)

    # -- one task at a time (daemon: restarts, `ctxrobot ctl task`) ---------------------------
    def task_spec(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        known = ", ".join(t.name for t in self.tasks)
        raise KeyError(f"no task {name!r}; tasks: {known}")

    def stop_task(self, name: str) -> None:
        """Stop one task's container; the others keep running."""
        spec = self.task_spec(name)
        assert self.backend is not None
        if self.actuator is not None:
            self.actuator.detach(name)
        self.controllers.pop(name, None)
        channel = self.channels.pop(name, None)
        if channel is not None:
            channel.close()
        self.backend.remove(self.container_names[spec.name])
        self._publish_state(name, "stopped")

    def start_task(self, name: str) -> None:
        """(Re)start one task's container and hand it to the scheduler again. A start that
        fails leaves the task failed (`failed_tasks`), for its restart policy to decide."""
        spec = self.task_spec(name)
        if name in self.channels:
            raise RuntimeError(f"task {name!r} is running; stop or restart it")
        self._failures.pop(name, None)
        try:
            self._start_task(spec)
            self._await_task(spec)
        except BaseException as err:
            self._failures[name] = f"could not be started: {err}"
            raise

    def restart_task(self, name: str) -> None:
        self.stop_task(name)
        self.start_task(name)

    def failed_tasks(self) -> dict[str, str]:
        """Failed tasks and why: the container died, broke the protocol, could not be
        started, or stays frozen."""
        failed = {n: str(c.error) for n, c in self.channels.items() if c.error is not None}
        frozen = self.freezes.failures if self.freezes is not None else {}
        return {**failed, **frozen, **self._failures}

    def engine_lost_since_start(self, task: str) -> bool:
        """Whether the Docker engine went away after ``task``'s container was started."""
        assert self.engine is not None
        return self.engine.epoch != self._task_epoch.get(task, self.engine.epoch)

    def exit_code(self, task: str) -> int | None:
        """The exit status of a task's container, or None while it still runs (or is gone,
        or the engine does not answer)."""
        assert self.backend is not None
        try:
            container = self.backend.get(self.container_names[task])
            if container is None:
                return None
            container.reload()
        except ENGINE_ERRORS:
            return None
        if container.status != "exited":
            return None
        return int(container.attrs["State"]["ExitCode"])

    def _start_metrics(self) -> None:
        if self.options.metrics_port is None:
            return
        self.metrics = MetricsExporter(deadlines_ms={t.name: t.deadline_ms for t in self.tasks})
        port = self.metrics.serve(self.options.metrics_port)
        self.observers.add(self.metrics, "metrics")
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", port)

    def _start_sampler(self) -> None:
        jobs: dict[str, tuple[float, Callable[[float], None]]] = {
            "usage": (USAGE_PERIOD_S, self._sample_usage)
        }
        if self.decisions is not None:
            self.freezes = FreezeWatch(
                self.controllers, self.decisions, self._thaw, self._publish_state, t0=self.t0
            )
            jobs["freezers"] = (USAGE_PERIOD_S, self.freezes.check)
        if (host := self.manifest.context.host) is not None:
            jobs["host"] = (host.period_s, lambda t: self.bus.publish("host", read_host(t)))
        sampler = PeriodicSampler(jobs)
        sampler.start()
        self._extra_stops.insert(0, sampler.stop)

    def _sample_usage(self, now: float) -> None:
        """CPU each task used since the last reading (cgroup accounting), as a share of the
        machine: the one reading the scheduler, the record and the dashboard share."""
        used: dict[str, float] = {}
        for task, controller in list(self.controllers.items()):
            try:
                ns = controller.usage_ns()
            except (CgroupError, OSError):
                continue  # the container is being restarted
            before = self._usage.get(task)
            self._usage[task] = (now, ns)
            if before is not None and now > before[0]:
                used[task] = self.machine.share_of(max(0, ns - before[1]), now - before[0])
        if used:
            self.bus.publish("usage", UsageSampled(now, used))

    def _thaw(self, task: str) -> bool:
        assert self.backend is not None
        return self.backend.thaw(self.container_names[task])

    # -- running ----------------------------------------------------------------------------
    def _emit(self, source: str, fired: Fired) -> None:
        """A reading of ``source``: its summaries on the bus, its sample to its readers."""
        for topic, event in fired.events:
            self.bus.publish(topic, event)
        for spec in self.tasks:
            if spec.input == source and (channel := self.channels.get(spec.name)) is not None:
                channel.offer(fired.sample)

    def _publish_state(self, task: str, state: str, detail: str = "") -> None:
        self.bus.publish("task.state", TaskStateChanged(time.monotonic(), task, state, detail))

    def request_stop(self) -> None:
        """Ask `wait()` to return early (signal handlers call this)."""
        self._stop.set()

    def wait(self) -> None:
        """Until the scenario ends (and, without dropping, every sample is processed)."""
        assert self.player is not None
        while not self._stop.is_set():
            if self.player.join(0.2):
                break
            self._check_tasks()
        if self.options.no_drop and not self._stop.is_set():
            for name, channel in self.channels.items():
                while not self._stop.is_set() and not channel.wait_idle(0.2):
                    self._check_tasks()
                log.info("task %s processed all %d samples", name, channel.received)
        self._check_tasks()
        self.t_end = time.monotonic()
        self._cpu_end = _own_cpu_s()

    def _check_tasks(self) -> None:
        failed = self.failed_tasks()
        if failed:
            task, error = next(iter(failed.items()))
            self.failure = f"task {task!r} failed: {error}{self._cause(task)}"
            self.failure += f"\n{self._logs_tail(task)}"
            raise RunFailed(self.failure)

    def _cause(self, task: str) -> str:
        """What outside the task ended it, when something did (for the failure's line)."""
        if self.engine_lost_since_start(task):
            return " (the Docker engine stopped answering during the run)"
        channel = self.channels.get(task)
        closed = channel is not None and isinstance(channel.error, (ConnectionClosed, OSError))
        # The connection closes as the task's process dies; Docker knows it a moment later.
        deadline = time.monotonic() + (2.0 if closed else 0.0)
        while (code := self.exit_code(task)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if code in STOPPED_BY_SIGNAL:
            return (
                f" (its container was stopped from outside, exit status {code} "
                f"({STOPPED_BY_SIGNAL[code]}): `docker stop` or `docker kill`, the kernel's "
                "OOM killer, or the Docker engine shutting down)"
            )
        return ""

    def _run_figures(self) -> dict[str, Any]:
        """Whole-run figures the benchmark compares across policies."""
        played = self.t_play > 0
        wall = self.t_end - self.t_play if played else 0.0
        cpu = self._cpu_end - self._cpu_play if played else 0.0
        return {
            # Playback start until the run ended; without dropping, until every task had
            # processed every sample.
            "total_time_s": wall,
            "scenario_s": self.player.duration_s if self.player else None,
            "runtime_cpu_s": cpu,
            "overhead_cpu_pct": 100.0 * cpu / wall if wall > 0 else None,
            "no_drop": self.options.no_drop,
            "inputs": dict(self.player.counts) if self.player else {},
            "failure": self.failure,
            "faults": list(self.freezes.faults) if self.freezes is not None else [],
        }

    # -- take-down --------------------------------------------------------------------------
    def stop(self) -> dict[str, Any] | None:
        """Take everything down (idempotent); return the run summary when there is one."""
        if self._stopped:
            return None
        self._stopped = True
        if not self.t_end:
            self.t_end = time.monotonic()
            self._cpu_end = _own_cpu_s()
        if self.player is not None:
            self.player.stop()
        for source in self.live_sources:
            source.stop()
        # The periodic reads call into the decision thread: they stop before it does.
        for stop in self._extra_stops:
            stop()
        # Thaw first: a frozen task cannot even answer the end of its stream.
        if self.decisions is not None:
            self.decisions.stop()
        # What failed during the run, before the end of the stream closes every socket.
        failed = self.failed_tasks()
        for name, channel in self.channels.items():
            self.task_summaries[name] = channel.finish(timeout_s=10.0)
        try:
            # Every producer has stopped: the observers finish what is queued, and the run's
            # end is recorded before anything below can fail (store.close never raises).
            self.observers.close()
            if self.metrics is not None:
                self.metrics.close()
            summary = None
            if self.store is not None:
                duration = self.t_end - self.t0
                extra = {**self._run_figures(), "failed_tasks": failed}
                self.store.close(duration, {"task_summaries": self.task_summaries, **extra})
                summary = {**summarize(self.store.path), **extra}
        finally:
            cleaned = self.backend is None or remove_run(self.backend, self.run_id, ENGINE_WAIT_S)
            if self.engine is not None:
                self.engine.stop()
            if self.parent is not None:
                self.parent.remove()
            if self._guard is not None:
                # Containers left (the engine is away): the guard waits for the engine and
                # removes them; the runtime does not wait for it.
                guard.release(self._guard, wait=cleaned)
            self.bus.close()
            if self._runtime_cpu is not None:
                pin_threads(self._cpus_before)
        return summary


USAGE_PERIOD_S = 0.5


def _own_cpu_s() -> float:
    """CPU seconds this process (the runtime, all its threads) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
