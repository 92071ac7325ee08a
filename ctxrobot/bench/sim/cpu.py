"""The CPU model of ``ctxrobot sim``: N CPUs, an envelope quota, one cgroup per task.

A task runs one *job* at a time (the sample it is processing): so many CPU-seconds of
work, on at most ``width`` CPUs at once (1 for a single-threaded task). What the model
assumes, each in one line (``docs/sim.md`` says why, and where it is known to be wrong):

- **Fluid CFS.** Between two events every runnable task runs at a constant rate: its
  weighted max-min fair share of the CPUs it may use (:func:`fair_rates`). On one CPU two
  tasks split it by weight (``cpu.shares``); on two CPUs each has its own. Time slices,
  wake-up preemption, migration costs and caches are not modelled.
- **Quotas throttle per period.** A CFS quota (the envelope's, a task's ``share_cap``) is a
  budget of CPU time per period, refilled at each period boundary; once it is spent
  everything under it stalls until the next boundary. Budgets are not split into the
  kernel's per-CPU 5 ms slices. Every period grid starts at t = 0.
- **Writing a quota refills it** at once, as the kernel does; the grid stays.
- **cpu.idle**: a SCHED_IDLE task gets only CPU time no other task wants.
- **cpuset**: a task runs only on the CPUs listed.
- **Freezing** stops a task at once; its job keeps the work it has left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Bandwidth", "Claim", "Cpus", "Limits", "fair_rates"]

#: CPU-seconds below which a job is done or a budget spent (1 ns): floating-point dust.
EPS_CPU_S = 1e-9
#: Slack in placing a time on a period grid (a boundary computed as k × period).
_GRID_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class Claim:
    """What one runnable task asks of the CPUs right now."""

    name: str
    weight: float
    width: float  # most CPUs it can use at once
    cpus: frozenset[int]  # the CPUs it may run on
    idle: bool = False  # SCHED_IDLE: only what nobody else wants


def _level(claims: Sequence[Claim], room: float) -> float:
    """The water level λ at which Σ min(width, λ·weight) reaches ``room`` (inf: never)."""
    if sum(c.width for c in claims) <= room + EPS_CPU_S:
        return math.inf
    # Piecewise linear in λ, with a breakpoint where each claim reaches its width.
    capped, slope = 0.0, sum(c.weight for c in claims)
    for c in sorted(claims, key=lambda c: c.width / c.weight):
        at = c.width / c.weight
        if capped + slope * at >= room:
            break
        capped += c.width
        slope -= c.weight
    return (room - capped) / slope


def _constraint_sets(claims: Iterable[Claim]) -> list[frozenset[int]]:
    """The CPU sets whose capacity can bind: unions of the claims' cpusets."""
    sets: set[frozenset[int]] = set()
    for cpus in {c.cpus for c in claims}:
        sets |= {cpus | s for s in sets} | {cpus}
    return sorted(sets, key=lambda s: (len(s), sorted(s)))


def _fill(claims: Sequence[Claim], rates: dict[str, float], everyone: Sequence[Claim]) -> None:
    """Progressive filling: raise every free claim's rate with its weight until it reaches
    its width or a set of CPUs is full, fix those, go on with the rest. ``rates`` holds the
    rates fixed before (an earlier stage) and receives these."""
    free = list(claims)
    sets = _constraint_sets(everyone)
    while free:
        level, tight = math.inf, []
        for cpus in sets:
            inside = [c for c in free if c.cpus <= cpus]
            if not inside:
                continue
            used = sum(rates[c.name] for c in everyone if c.name in rates and c.cpus <= cpus)
            at = _level(inside, max(0.0, len(cpus) - used))
            if at < level - 1e-12:
                level, tight = at, inside
            elif at <= level + 1e-12:
                tight = tight + [c for c in inside if c not in tight]
        if math.isinf(level):
            for c in free:
                rates[c.name] = c.width
            return
        for c in tight:
            rates[c.name] = min(c.width, level * c.weight)
        free = [c for c in free if c not in tight]


def fair_rates(claims: Sequence[Claim], ncpus: int) -> dict[str, float]:
    """Each claim's CPU rate: weighted max-min fair over ``ncpus`` CPUs, each claim at most
    its width and only on its cpuset; SCHED_IDLE claims share what the others leave."""
    everyone = [c for c in claims if c.cpus and c.weight > 0]
    for c in everyone:
        if not c.cpus <= frozenset(range(ncpus)):
            raise ValueError(f"task {c.name}: cpuset {sorted(c.cpus)} outside CPUs 0-{ncpus - 1}")
    rates: dict[str, float] = {}
    _fill([c for c in everyone if not c.idle], rates, everyone)
    _fill([c for c in everyone if c.idle], rates, everyone)
    return rates


class Bandwidth:
    """A CFS quota: ``quota_s`` of CPU time per ``period_s``, refilled on the grid
    k × ``period_s``; what is left of a period is lost at its end."""

    def __init__(self, quota_s: float, period_s: float, now: float = 0.0) -> None:
        if quota_s <= 0 or period_s <= 0:
            raise ValueError(f"a quota needs a positive budget and period: {quota_s}/{period_s}")
        self.quota_s = quota_s
        self.period_s = period_s
        self.left = quota_s
        self._period = self._index(now)

    def _index(self, now: float) -> int:
        return math.floor(now / self.period_s + _GRID_SLACK)

    def refill(self, now: float) -> None:
        """Start a new budget if ``now`` is in a later period than the last one."""
        index = self._index(now)
        if index > self._period:
            self._period, self.left = index, self.quota_s

    @property
    def spent(self) -> bool:
        return self.left <= EPS_CPU_S

    def next_refill(self) -> float:
        return (self._period + 1) * self.period_s


@dataclass(frozen=True, slots=True)
class Limits:
    """One task's cgroup settings as the kernel applies them (see ``Cpus.set_limits``)."""

    shares: int = 1024  # v1 cpu.shares (weight 100)
    cap_cpus: float | None = None  # its own quota in CPUs (None: none)
    frozen: bool = False
    idle: bool = False  # cpu.idle
    cpuset: frozenset[int] | None = None  # None: every CPU


@dataclass(slots=True)
class _Job:
    left_s: float  # CPU-seconds of work still to do
    width: float


class Cpus:
    """The machine: ``ncpus`` CPUs, an optional envelope quota over every task, and each
    task's limits and current job. Time moves only through :meth:`advance`."""

    def __init__(
        self,
        ncpus: int,
        tasks: Sequence[str],
        envelope: Bandwidth | None = None,
        task_period_s: float = 0.1,
    ) -> None:
        if ncpus < 1:
            raise ValueError(f"a machine needs at least one CPU, got {ncpus}")
        self.ncpus = ncpus
        self.envelope = envelope
        self.task_period_s = task_period_s
        self.now = 0.0
        self.used_s = dict.fromkeys(tasks, 0.0)
        self.limits = {t: Limits() for t in tasks}
        self._caps: dict[str, Bandwidth] = {}
        self._jobs: dict[str, _Job] = {}
        self._rates: dict[str, float] | None = None
        self._next: tuple[float | None] | None = None  # next_event's answer, until a change

    # -- what the simulator tells it ----------------------------------------------------
    def set_limits(self, task: str, limits: Limits) -> None:
        """Apply ``task``'s cgroup settings from now on. A changed quota starts full."""
        before = self.limits[task]
        self.limits[task] = limits
        if limits.cap_cpus != before.cap_cpus:
            self._caps.pop(task, None)
            if limits.cap_cpus is not None:
                period = self.task_period_s
                self._caps[task] = Bandwidth(limits.cap_cpus * period, period, self.now)
        self._rates, self._next = None, None

    def start(self, task: str, cpu_s: float, width: float = 1.0) -> None:
        """``task`` begins a job of ``cpu_s`` CPU-seconds on at most ``width`` CPUs."""
        if task in self._jobs:
            raise RuntimeError(f"task {task} already has a job: one sample at a time")
        self._jobs[task] = _Job(max(cpu_s, 0.0), min(max(width, 1.0), float(self.ncpus)))
        self._rates, self._next = None, None

    def busy(self, task: str) -> bool:
        return task in self._jobs

    # -- time ---------------------------------------------------------------------------
    def rates(self) -> Mapping[str, float]:
        """Each running task's CPU rate now (a throttled or frozen one is absent)."""
        if self._rates is None:
            self._rates = self._compute_rates()
        return self._rates

    def _compute_rates(self) -> dict[str, float]:
        if self.envelope is not None and self.envelope.spent:
            return {}
        everywhere = frozenset(range(self.ncpus))
        claims = []
        for task, job in self._jobs.items():
            lim = self.limits[task]
            cap = self._caps.get(task)
            if lim.frozen or (cap is not None and cap.spent) or job.left_s <= EPS_CPU_S:
                continue
            cpus = everywhere if lim.cpuset is None else lim.cpuset
            claims.append(Claim(task, lim.shares, min(job.width, len(cpus)), cpus, lim.idle))
        return {t: r for t, r in fair_rates(claims, self.ncpus).items() if r > 0}

    def next_event(self) -> float | None:
        """When a job ends, a budget runs out or a throttled task may run again (None:
        nothing will change until the simulator changes something)."""
        if self._next is None:
            self._next = (self._compute_next(),)
        return self._next[0]

    def _compute_next(self) -> float | None:
        if not self._jobs:
            return None
        rates = self.rates()
        steps = [self._jobs[t].left_s / r for t, r in rates.items()]
        steps += [self._caps[t].left / r for t, r in rates.items() if t in self._caps]
        if self.envelope is not None and rates:
            steps.append(self.envelope.left / sum(rates.values()))
        times = [self.now + s for s in steps]
        # A budget in use, or one a waiting task is throttled by, refills at its boundary.
        waiting = [t for t in self._jobs if not self.limits[t].frozen]
        times += [self._caps[t].next_refill() for t in waiting if t in self._caps]
        if self.envelope is not None and waiting:
            times.append(self.envelope.next_refill())
        return min(times, default=None)

    def advance(self, to: float) -> list[str]:
        """Run until ``to``, or until jobs end if that comes first (then :attr:`now` is
        when they ended); the tasks whose job ended, whose jobs are gone."""
        stuck = 0
        while self.now < to:
            upcoming = self.next_event()
            step_to = to if upcoming is None else min(to, max(upcoming, self.now))
            stuck = stuck + 1 if step_to <= self.now else 0
            if stuck > 3:
                raise RuntimeError(f"CPU model makes no progress at t={self.now}: {self._jobs}")
            self._run(step_to - self.now)
            self.now = step_to
            for bandwidth in (self.envelope, *self._caps.values()):
                if bandwidth is not None:
                    bandwidth.refill(self.now)
            self._rates, self._next = None, None
            finished = [t for t, job in self._jobs.items() if job.left_s <= EPS_CPU_S]
            if finished:
                for task in finished:
                    del self._jobs[task]
                return finished
        return []

    def _run(self, dt: float) -> None:
        for task, rate in self.rates().items():
            work = rate * dt
            self._jobs[task].left_s -= work
            self.used_s[task] += work
            if (cap := self._caps.get(task)) is not None:
                cap.left -= work
            if self.envelope is not None:
                self.envelope.left -= work
