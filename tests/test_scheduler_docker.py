"""The scheduler on real containers: a context change moves real CPU time, fast.

Three burner containers stand in for slam, signs and speech. They are pinned to one CPU
and the actuator is told the machine has one CPU, so every share below is a fraction of
that CPU and the burners always contend (each would use all of it alone). They run under a
per-test parent cgroup with the highest weight, so host load on this shared machine barely
dents them. The whole chain runs in real time: an audio level published on the bus →
the decision thread → voice signal → rule → ``ctx`` policy → the cgroup fast path.

CPU shares are read from each container's cgroup accounting over 1 s windows. The printed
numbers are the measurement; the asserts allow 0.05 of the CPU for quota-period edges and
host noise.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping

import pytest

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.actuate.cgroups import (
    CgroupV1Controller,
    CgroupV2Controller,
    CpuController,
    ParentCgroup,
)
from ctxrobot.actuate.docker import ContainerSpec, DockerBackend
from ctxrobot.model.allocation import Machine
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import AllocationApplied, AudioLevel
from ctxrobot.sched.policy import CtxPolicy
from ctxrobot.sched.rules import RuleSpec
from ctxrobot.sched.signals import Voice
from ctxrobot.sched.state import SchedulerState, TaskConfig
from ctxrobot.service.loop import DecisionLoop, Executor
from tests.conftest import require_image

pytestmark = pytest.mark.docker

IMAGE = "ctxrobot/burner"
TASKS = ("slam", "signs", "speech")
CPU = "1"  # every burner on this one CPU: the "machine" of these tests
WINDOW_S = 1.0
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def parent() -> Iterator[ParentCgroup]:
    require_image(IMAGE)
    if os.geteuid() != 0:
        pytest.skip("the cgroup fast path needs root (writable cgroup files)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs CPU 1 to pin the burners to")
    cgroup = ParentCgroup(f"ctxrobot-sched-test-{os.getpid()}")
    cgroup.create()
    cgroup.set_weight(10000)
    yield cgroup
    cgroup.remove()


@pytest.fixture
def controllers(parent: ParentCgroup) -> Iterator[dict[str, CpuController]]:
    """One running burner per task, on the fast path; always removed afterwards."""
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    backend = DockerBackend()
    try:
        found: dict[str, CpuController] = {}
        for task in TASKS:
            container = backend.create_and_start(
                ContainerSpec(
                    name=f"ctxrobot-{run_id}-{task}",
                    image=IMAGE,
                    task=task,
                    run_id=run_id,
                    cgroup_parent=parent.docker_parent,
                    cpuset_cpus=CPU,
                )
            )
            controller = backend.controller_for(container)
            assert isinstance(controller, CgroupV1Controller | CgroupV2Controller), (
                f"expected the cgroup fast path as root, got {controller!r}"
            )
            found[task] = controller
        yield found
    finally:
        backend.cleanup(run_id)


def shares(controllers: Mapping[str, CpuController], seconds: float = WINDOW_S) -> dict[str, float]:
    """Each task's fraction of the one-CPU machine over ``seconds`` of wall time."""
    u0, t0 = {t: c.usage_ns() for t, c in controllers.items()}, time.monotonic()
    time.sleep(seconds)
    u1, t1 = {t: c.usage_ns() for t, c in controllers.items()}, time.monotonic()
    return {t: round((u1[t] - u0[t]) / 1e9 / (t1 - t0), 3) for t in controllers}


def voice_rule(share: float) -> RuleSpec:
    return RuleSpec.model_validate(
        {
            "name": "voice",
            "when": "voice_active",
            "set": {"speech": {"critical": True, "share": share}},
        }
    )


def start_scheduler(
    controllers: Mapping[str, CpuController], share: float, hangover_s: float
) -> tuple[EventBus, DecisionLoop, list[AllocationApplied]]:
    """The runtime's decision thread over the burners, fed by the bus."""
    bus = EventBus()
    applied: list[AllocationApplied] = []
    bus.subscribe("allocation", applied.append, name="test", inline=True)
    tasks = [
        TaskConfig(name, cpu_min=0.1, cpu_max=1.0, max_freeze_s=60.0, deadline_s=0.5)
        for name in TASKS
    ]
    core = SchedulerState(
        tasks,
        policy=CtxPolicy(),
        rules=[voice_rule(share)],
        signals=[Voice("mic", threshold_db=-35.0, hangover_s=hangover_s)],
    )
    executor = Executor(Actuator(controllers, Machine(1)), lambda *_: None, bus)
    loop = DecisionLoop(core, executor)
    loop.attach(bus)
    loop.start()
    return bus, loop, applied


def speak(bus: EventBus) -> float:
    """One loud audio chunk, as the microphone source would publish it; returns its time."""
    t = time.monotonic()
    bus.publish("sensor.audio", AudioLevel("mic", t, -12.0))
    return t


def test_a_critical_task_gets_its_share_within_100ms_and_gives_it_back(
    controllers: dict[str, CpuController],
) -> None:
    guarantee = 0.6
    hangover_s = 2.0
    bus, scheduler, applied = start_scheduler(controllers, guarantee, hangover_s)
    try:
        time.sleep(0.3)
        before = shares(controllers)
        t_voice = speak(bus)
        time.sleep(0.2)
        during = shares(controllers)
        # The voice ends hangover_s after the chunk: the decision thread's own wake-up.
        time.sleep(max(0.0, t_voice + hangover_s + 0.3 - time.monotonic()))
        after = shares(controllers)
    finally:
        scheduler.stop()
    onset, release = (a for a in applied if a.reason == "context")
    print(
        f"\nshares before {before}\n       during {during}\n       after  {after}\n"
        f"actuation: onset {onset.actuation_ms:.3f} ms, release {release.actuation_ms:.3f} ms"
    )
    assert [a.reason for a in applied] == ["start", "context", "context"]
    assert onset.trigger_t == t_voice
    assert onset.actuation_ms < 100.0, "the allocation must be written within 100 ms"
    assert release.actuation_ms < 100.0
    assert release.trigger_t == pytest.approx(t_voice + hangover_s)
    assert before["speech"] < guarantee - 0.15, "without context the three should share"
    assert during["speech"] >= guarantee - TOLERANCE
    assert during["slam"] + during["signs"] <= 1.0 - guarantee + TOLERANCE
    assert after["speech"] < guarantee - 0.15
    assert min(after["slam"], after["signs"]) > 0.2


def test_stop_thaws_the_tasks_the_policy_froze(controllers: dict[str, CpuController]) -> None:
    bus, scheduler, applied = start_scheduler(controllers, share=0.95, hangover_s=30.0)
    try:
        speak(bus)
        # The decision thread applies the change; a v1 freeze completes asynchronously.
        time.sleep(0.2)
        frozen = sorted(t for t, a in applied[-1].allocation.items() if a.frozen)
        during = shares(controllers)
    finally:
        scheduler.stop()
    after = shares(controllers)
    print(f"\nfrozen {frozen}: shares during {during}, after stop {after}")
    assert frozen == ["signs", "slam"]
    assert all(not controllers[t].frozen for t in TASKS)
    assert during["slam"] < 0.01 and during["signs"] < 0.01
    assert during["speech"] > 0.9
    # Thawed, they run again under the last cap they were given (cpu_min = 0.1).
    assert min(after["slam"], after["signs"]) > 0.1 - TOLERANCE


# -- the bench's topology: a fractional envelope spread over both CPUs ---------------------
ENVELOPE_CPUS = 0.5
SAMPLE_EVERY_S = 0.005


@pytest.fixture
def envelope() -> Iterator[tuple[ParentCgroup, dict[str, CpuController]]]:
    """Three unpinned burners under a parent quota of 0.5 CPU per 10 ms period, as
    `ctxrobot bench` runs the tasks: the quota is shared by whichever CPUs they land on."""
    require_image(IMAGE)
    if os.geteuid() != 0:
        pytest.skip("the cgroup fast path needs root (writable cgroup files)")
    parent = ParentCgroup(f"ctxrobot-envelope-test-{os.getpid()}")
    parent.create()
    parent.set_cpus(ENVELOPE_CPUS)
    parent.set_weight(10000)  # host load on this shared machine must not eat the envelope
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    backend = DockerBackend()
    try:
        found: dict[str, CpuController] = {}
        for task in TASKS:
            container = backend.create_and_start(
                ContainerSpec(
                    name=f"ctxrobot-{run_id}-{task}",
                    image=IMAGE,
                    task=task,
                    run_id=run_id,
                    cgroup_parent=parent.docker_parent,
                )
            )
            found[task] = backend.controller_for(container)
        yield parent, found
    finally:
        backend.cleanup(run_id)
        parent.remove()


def usage_trace(
    controllers: Mapping[str, CpuController], seconds: float
) -> list[tuple[float, dict[str, int]]]:
    """(time, cumulative CPU ns per task), read every few milliseconds."""
    trace = []
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        trace.append((now, {t: c.usage_ns() for t, c in controllers.items()}))
        time.sleep(SAMPLE_EVERY_S)
    return trace


def first_window_at(
    trace: list[tuple[float, dict[str, int]]], task: str, fraction: float, window_s: float
) -> float | None:
    """Start of the first ``window_s`` window in which ``task`` used at least ``fraction``
    of the envelope (cgroup accounting), or None."""
    for i, (t0, u0) in enumerate(trace):
        for t1, u1 in trace[i + 1 :]:
            if t1 - t0 >= window_s:
                used = (u1[task] - u0[task]) / 1e9 / (t1 - t0)
                if used >= fraction * ENVELOPE_CPUS:
                    return t0
                break
    return None


def test_a_backlogged_critical_task_gets_80_percent_of_the_envelope_within_100ms(
    envelope: tuple[ParentCgroup, dict[str, CpuController]],
) -> None:
    """The bench's topology: a fractional envelope over 2 CPUs under a parent quota. Weights
    alone cannot split that (tasks on different CPUs never meet); the others' quotas do.

    The others' floor is 5 % each, so the policy leaves speech 90 % of the envelope: the
    80 % bar then has a margin. (With 10 % floors speech would get exactly 80 %, and whether
    one 100 ms window reached it was jitter: measured 77-79 % over the second.)"""
    _, controllers = envelope
    bus = EventBus()
    applied: list[AllocationApplied] = []
    bus.subscribe("allocation", applied.append, name="test", inline=True)
    tasks = [
        TaskConfig("slam", cpu_min=0.05, cpu_max=1.0),
        TaskConfig("signs", cpu_min=0.05, cpu_max=1.0),
        TaskConfig("speech", cpu_min=0.05, cpu_max=1.0, input="mic"),
    ]
    core = SchedulerState(
        tasks,
        policy=CtxPolicy(),
        rules=[voice_rule(0.6)],
        signals=[Voice("mic", threshold_db=-35.0, hangover_s=30.0)],
    )
    loop = DecisionLoop(
        core, Executor(Actuator(controllers, Machine(ENVELOPE_CPUS)), lambda *_: None, bus)
    )
    loop.attach(bus)
    loop.start()
    try:
        time.sleep(0.5)
        before = shares(controllers)
        # A loud chunk no result ever answers: speech is critical with work waiting.
        t_voice = speak(bus)
        trace = usage_trace(controllers, 1.0)
    finally:
        loop.stop()
    onset = next(a for a in applied if a.reason == "context")
    reached = first_window_at(trace, "speech", 0.8, window_s=0.1)
    total = (trace[-1][1]["speech"] - trace[0][1]["speech"]) / 1e9 / (trace[-1][0] - trace[0][0])
    print(
        f"\nenvelope {ENVELOPE_CPUS} CPU; speech before {before['speech']:.3f} CPU; "
        f"after the onset {total:.3f} CPU ({total / ENVELOPE_CPUS:.0%} of the envelope); "
        f"actuation {onset.actuation_ms:.3f} ms; 80 % reached "
        f"{'never' if reached is None else f'{(reached - t_voice) * 1000:.0f} ms'} after the voice"
    )
    assert before["speech"] < 0.6 * ENVELOPE_CPUS, "without context the three share"
    assert reached is not None and reached - t_voice <= 0.1
    assert onset.allocation["slam"].share_cap == onset.allocation["signs"].share_cap == 0.05
