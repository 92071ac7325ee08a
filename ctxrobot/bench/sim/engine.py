"""One simulated run: the scenario's sources, the task channels, the CPU model and the
*real* scheduler core, in virtual time.

What a run does, and how each part is stood in for:

- **sources** (``ScenarioPlayer``, one thread per source): each reading fires at its
  offset, or as soon as its source is free again after back-pressure; its sensor events
  go to the core, its sample to the channel of every task reading that source;
- **channels** (``TaskChannel``): a queue of ``depth`` samples per task; ``drop_oldest``
  evicts, ``block`` holds the source back (``--no-drop`` makes every queue ``block``);
  one sample in flight; the rate gate (the runtime's own ``RateGate``) and ``stale: skip``
  shed samples as they would go out;
- **tasks**: a sample reaches its task ``dispatch_s`` after it goes out (host delivery,
  from the trace) and then needs its traced CPU (``ctxrobot.bench.sim.cpu``); its result
  carries what the real result told the core (``shed``, ``detections``);
- **the core** (``build_core``, exactly as a run builds it) gets the sensor events, the
  results, the drops and a ``UsageSampled`` every ``usage_period_s``, and a ``Tick`` when
  it asked for one; its ``ApplyAllocation`` becomes cgroup limits in the CPU model (as
  ``ctxrobot.actuate`` would write them, quota clamps included), its ``SetDispatch`` the
  channel's rate gate. Actuation takes no time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ctxrobot.actuate.cgroups import (
    DEFAULT_PERIOD_US,
    ENVELOPE_PERIOD_US,
    MIN_QUOTA_US,
    quota_us,
    weight_to_shares,
)
from ctxrobot.bench.sim.cpu import EPS_CPU_S, Bandwidth, Cpus, Limits
from ctxrobot.bench.sim.trace import SampleCost, Trace
from ctxrobot.bench.sim.workload import Reading, Workload
from ctxrobot.manifest.schema import Manifest, TaskSpec
from ctxrobot.model.actions import Action, ApplyAllocation, Publish, SetDispatch
from ctxrobot.model.allocation import TaskAllocation
from ctxrobot.model.events import RuleChanged, SampleDropped, TaskResult, UsageSampled
from ctxrobot.sched.state import Start, Tick
from ctxrobot.service.core import build_core
from ctxrobot.service.loop import CORE_TOPICS
from ctxrobot.service.runtime import USAGE_PERIOD_S
from ctxrobot.streams.channel import RateGate

__all__ = ["Envelope", "SampleRecord", "SimRecord", "Simulation"]

#: A run that has not processed its last sample this many scenario lengths after playback
#: began is stopped and reported incomplete (a task starved for good).
MAX_OVERRUN = 50.0


@dataclass(frozen=True)
class Envelope:
    """The machine the tasks run on: its CPUs, and the ``--cpus`` quota around them."""

    ncpus: int
    cpus: float | None = None  # None: no envelope, the whole machine
    period_s: float = ENVELOPE_PERIOD_US / 1e6
    task_period_s: float = DEFAULT_PERIOD_US / 1e6

    @property
    def quota_s(self) -> float | None:
        """The parent's quota per period, as the kernel gets it (at least 1 ms)."""
        if self.cpus is None:
            return None
        return max(MIN_QUOTA_US, round(self.cpus * self.period_s * 1e6)) / 1e6

    @property
    def effective_cpus(self) -> float:
        """CPUs the envelope really grants (its quota ÷ period; the machine without one)."""
        quota = self.quota_s
        return float(self.ncpus) if quota is None else min(self.ncpus, quota / self.period_s)


@dataclass(slots=True)
class SampleRecord:
    task: str
    sample_id: int
    t_sensor: float
    t_start: float
    t_end: float = float("nan")
    shed: bool = False  # the task's result says it skipped the work ("shed" in it)


@dataclass
class SimRecord:
    """Everything a simulated run leaves: what ``run.db`` would hold, as far as it is used."""

    policy: str
    tasks: list[str]
    samples: list[SampleRecord] = field(default_factory=list)
    drops: list[tuple[str, int, float, str]] = field(default_factory=list)  # task, id, t, why
    rules: list[tuple[float, str, bool]] = field(default_factory=list)
    decisions: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    end_s: float = 0.0
    complete: bool = True
    costed_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass
class _Channel:
    spec: TaskSpec
    overflow: str
    dispatch_s: float
    costs: Sequence[SampleCost]
    queue: deque[SampleRecord] = field(default_factory=deque)
    rate: RateGate = field(default_factory=RateGate)
    stale_after_s: float | None = None  # as the scheduler set it: None, every sample goes out
    in_flight: SampleRecord | None = None
    arrives_at: float | None = None  # when the sample in flight reaches the task

    @property
    def idle(self) -> bool:
        return not self.queue and self.in_flight is None


@dataclass
class _Player:
    """One source's player: the next reading, or the sample it waits to hand over."""

    readings: Sequence[Reading]
    readers: Sequence[str]
    index: int = 0
    due: float | None = 0.0
    waiting: list[str] = field(default_factory=list)  # readers still to be offered
    sample: tuple[int, float] | None = None  # (id, t_sensor) being handed over

    @property
    def done(self) -> bool:
        return self.index >= len(self.readings) and self.sample is None


class Simulation:
    """One run of ``tasks`` of ``manifest`` under ``policy``: see the module doc."""

    def __init__(
        self,
        manifest: Manifest,
        policy: str,
        tasks: Sequence[str],
        workload: Workload,
        trace: Trace,
        envelope: Envelope,
        *,
        no_drop: bool = True,
    ) -> None:
        self.core = build_core(manifest, policy, tasks)
        self.envelope = envelope
        # The machine the policy shares out: the envelope as asked for, as the runtime says.
        robot = float(manifest.robot.cpus)
        self.machine_cpus = robot if envelope.cpus is None else min(envelope.cpus, robot)
        quota = envelope.quota_s
        self.cpus = Cpus(
            envelope.ncpus,
            tasks,
            None if quota is None else Bandwidth(quota, envelope.period_s),
            envelope.task_period_s,
        )
        self.record = SimRecord(policy, list(tasks), cpu_s=self.cpus.used_s)
        self.channels = {
            spec.name: self._channel(spec, workload, trace, no_drop)
            for spec in manifest.tasks
            if spec.name in tasks
        }
        self.players = {
            source: _Player(
                readings,
                [n for n, ch in self.channels.items() if ch.spec.input == source],
                due=readings[0].offset_s if readings else None,
            )
            for source, readings in workload.sources.items()
        }
        self.duration_s = workload.duration_s
        self.now = 0.0
        self._kicked: list[str] = []
        self._wake: float | None = None
        self._usage_at = 0.0
        self._usage_before: dict[str, float] | None = None

    def _channel(self, spec: TaskSpec, workload: Workload, trace: Trace, no_drop: bool) -> _Channel:
        task = trace.task(spec.name)
        readings = workload.sources.get(spec.input, [])
        costs = []
        for reading in readings:
            cost = task.cost(reading)
            if cost is None:
                raise ValueError(f"trace of {spec.name} has no cost for {reading.kind} samples")
            if reading.key not in task.samples:
                self.record.costed_by_kind[spec.name] = (
                    self.record.costed_by_kind.get(spec.name, 0) + 1
                )
            costs.append(cost)
        overflow = "block" if no_drop else spec.queue.overflow
        return _Channel(spec, overflow, task.dispatch_s, costs)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> SimRecord:
        self._handle(Start())
        limit = self.duration_s * MAX_OVERRUN
        still = 0
        while not self._finished():
            t = self._next_time()
            if t > limit:
                self.record.complete = False
                break
            still = still + 1 if t <= self.now else 0
            if still > 10_000:
                raise RuntimeError(f"simulation makes no progress at t={self.now}")
            done = self.cpus.advance(t)
            self.now = self.cpus.now
            for task in done:
                self._finish(task)
            if not done:
                self._due()
            self._settle()
        self.record.end_s = self.now
        return self.record

    def _finished(self) -> bool:
        return all(p.done for p in self.players.values()) and all(
            ch.idle for ch in self.channels.values()
        )

    def _next_time(self) -> float:
        times = [self._usage_at]
        times += [p.due for p in self.players.values() if p.due is not None]
        times += [ch.arrives_at for ch in self.channels.values() if ch.arrives_at is not None]
        for t in (self.cpus.next_event(), self._wake):
            if t is not None:
                times.append(t)
        return max(self.now, min(times))

    def _due(self) -> None:
        """Everything due now, in a fixed order: samples reaching their tasks, the core's
        wake-up, the sources, the usage reading."""
        for name, ch in self.channels.items():
            if ch.arrives_at is not None and ch.arrives_at <= self.now:
                ch.arrives_at = None
                self._begin(name, ch)
        if self._wake is not None and self._wake <= self.now:
            self._handle(Tick())
        for player in self.players.values():
            if player.due is not None and player.due <= self.now:
                self._fire(player)
        if self._usage_at <= self.now:
            self._sample_usage()

    def _settle(self) -> None:
        """Let channels send and blocked sources hand over, until nothing moves."""
        moved = True
        while moved:
            moved = False
            while self._kicked:
                self._dispatch(self._kicked.pop(0))
            for player in self.players.values():
                if player.waiting and self._offer(player):
                    moved = True

    # -- sources and channels ------------------------------------------------------------------
    def _fire(self, player: _Player) -> None:
        """The source's next reading: its events to the core, its sample to the readers."""
        sid = player.index
        fired = player.readings[sid].fire(self.now, sid)
        player.due = None
        for topic, event in fired.events:
            if topic in CORE_TOPICS:
                self._handle(event)
        player.sample = (sid, self.now)
        player.waiting = list(player.readers)
        self._offer(player)

    def _offer(self, player: _Player) -> bool:
        """Hand the pending sample to each reader in turn; False while one is full and
        blocks (the source waits), True once every reader has it."""
        assert player.sample is not None
        sid, t_sensor = player.sample
        while player.waiting:
            name = player.waiting[0]
            ch = self.channels[name]
            if len(ch.queue) >= ch.spec.queue.depth:
                if ch.overflow == "block":
                    return False
                old = ch.queue.popleft()
                self._unprocessed(name, old, "queue_full")
            ch.queue.append(SampleRecord(name, sid, t_sensor, t_sensor))
            player.waiting.pop(0)
            self._kicked.append(name)
        player.sample = None
        player.index += 1
        if player.index < len(player.readings):
            player.due = max(self.now, player.readings[player.index].offset_s)
        return True

    def _dispatch(self, name: str) -> None:
        """What the channel's send loop does when it may send: the oldest sample goes out,
        unless the rate gate or its age make it useless (then it is shed)."""
        ch = self.channels[name]
        while ch.queue and ch.in_flight is None:
            sample = ch.queue.popleft()
            reason = self._shed_reason(ch, sample)
            if reason is not None:
                self._unprocessed(name, sample, reason)
                continue
            ch.rate.beginning_execution(None, self.now)  # type: ignore[arg-type]  # reads the time
            ch.in_flight = sample
            sample.t_start = self.now + ch.dispatch_s
            ch.arrives_at = sample.t_start
            if ch.dispatch_s <= 0:
                ch.arrives_at = None
                self._begin(name, ch)

    def _shed_reason(self, ch: _Channel, sample: SampleRecord) -> str | None:
        if not ch.rate.can_execute(self.now):
            return "rate"
        stale = ch.stale_after_s
        if stale is not None and self.now - sample.t_sensor > stale:
            return "stale"
        return None

    def _begin(self, name: str, ch: _Channel) -> None:
        """The sample in flight reaches its task: its processing starts."""
        assert ch.in_flight is not None
        cost = ch.costs[ch.in_flight.sample_id]
        if cost.cpu_s <= EPS_CPU_S:
            self._finish(name)
        else:
            self.cpus.start(name, cost.cpu_s, cost.width)

    def _finish(self, name: str) -> None:
        """The task's result: to the record, the core, and the channel's next sample."""
        ch = self.channels[name]
        sample = ch.in_flight
        assert sample is not None
        ch.in_flight = None
        sample.t_end = self.now
        cost = ch.costs[sample.sample_id]
        sample.shed = "shed" in cost.result
        self.record.samples.append(sample)
        self._handle(
            TaskResult(
                name,
                sample.sample_id,
                sample.t_sensor,
                sample.t_start,
                self.now,
                cost.task_result(),
            )
        )
        self._kicked.append(name)

    def _unprocessed(self, name: str, sample: SampleRecord, reason: str) -> None:
        self.record.drops.append((name, sample.sample_id, self.now, reason))
        self._handle(SampleDropped(name, sample.sample_id, self.now, reason, sample.t_sensor))

    def _sample_usage(self) -> None:
        """The runtime's usage sampler: CPU per task since the last reading, as a share of
        the machine the policy shares out (the first reading only starts the count)."""
        used_now = dict(self.cpus.used_s)
        if self._usage_before is not None:
            period = USAGE_PERIOD_S * self.machine_cpus
            used = {t: (used_now[t] - self._usage_before[t]) / period for t in used_now}
            self._handle(UsageSampled(self.now, used))
        self._usage_before = used_now
        self._usage_at = self.now + USAGE_PERIOD_S

    # -- the core and its actions ----------------------------------------------------------
    def _handle(self, event: object) -> None:
        for action in self.core.handle(event, self.now):
            self._execute(action)
        # Only an event changes what the core waits for: ask once, not on every step.
        self._wake = self.core.wake_at()

    def _execute(self, action: Action) -> None:
        if isinstance(action, ApplyAllocation):
            self.record.decisions += 1
            for name, (_, after) in action.changes.items():
                self.cpus.set_limits(name, self._limits(after))
        elif isinstance(action, SetDispatch):
            channel = self.channels[action.task]
            channel.rate.rate_hz = action.rate_hz
            channel.stale_after_s = action.stale_after_s
            self._kicked.append(action.task)
        elif isinstance(action, Publish) and isinstance(action.event, RuleChanged):
            rule = action.event
            self.record.rules.append((rule.t, rule.rule, rule.active))

    def _limits(self, alloc: TaskAllocation) -> Limits:
        """The cgroup values the actuator would write for ``alloc``, as the kernel takes
        them: a quota below 1 ms is raised to 1 ms, one above the envelope's is refused
        (v1's EINVAL) and the actuator then writes no quota at all."""
        cap: float | None = None
        if alloc.share_cap is not None:
            period_us = round(self.envelope.task_period_s * 1e6)
            cap = quota_us(alloc.share_cap, self.machine_cpus, period_us) / period_us
            if self.envelope.cpus is not None and cap > self.envelope.effective_cpus:
                cap = None
        return Limits(shares=weight_to_shares(alloc.weight), cap_cpus=cap, frozen=alloc.frozen)
