"""The decision thread with real threads, a real bus and real cgroup files (a v2 tree in a
temp folder): events published from other threads are decided on the one decision
thread, written through the fast path, and nothing stays frozen after it stops."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.actuate.cgroups import CgroupV2Controller
from ctxrobot.model.allocation import Machine
from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import UserError
from ctxrobot.model.events import AllocationApplied, AudioLevel, TaskResult
from ctxrobot.sched.policy import CtxPolicy
from ctxrobot.sched.rules import RuleSpec
from ctxrobot.sched.signals import Voice
from ctxrobot.sched.state import OverrideSignals, SchedulerState, TaskConfig
from ctxrobot.service.loop import (
    DecisionLoop,
    Executor,
    Inbox,
    PeriodicSampler,
    pin_threads,
    runtime_cpu,
)

GREEDY = RuleSpec.model_validate(
    {"name": "voice", "when": "voice_active", "set": {"speech": {"critical": True, "share": 0.95}}}
)


def cgroup(root: Path, name: str) -> CgroupV2Controller:
    path = root / name
    path.mkdir()
    for file, text in {
        "cpu.weight": "100\n",
        "cpu.max": "max 100000\n",
        "cgroup.freeze": "0\n",
    }.items():
        (path / file).write_text(text)
    return CgroupV2Controller(path)


def publish_from(thread: str, bus: EventBus, topic: str, event: object) -> None:
    publisher = threading.Thread(target=bus.publish, args=(topic, event), name=thread)
    publisher.start()
    publisher.join()


class Rig:
    def __init__(self, root: Path, hangover_s: float = 0.05) -> None:
        self.bus = EventBus()
        self.controllers = {n: cgroup(root, n) for n in ("slam", "speech")}
        tasks = [
            TaskConfig("slam", cpu_min=0.1, cpu_max=1.0),
            TaskConfig("speech", cpu_min=0.05, cpu_max=1.0, input="mic"),
        ]
        core = SchedulerState(
            tasks,
            policy=CtxPolicy(contended_above=0.0),
            rules=[GREEDY],
            signals=[Voice("mic", threshold_db=-35, hangover_s=hangover_s)],
        )
        self.rates: list[tuple[str, str, float | None]] = []
        executor = Executor(
            Actuator(self.controllers, Machine(2.0)),
            lambda task, rate, _stale: self.rates.append(
                (threading.current_thread().name, task, rate)
            ),
            self.bus,
        )
        self.loop = DecisionLoop(core, executor, rt_priority=0)
        self.applied: list[tuple[str, AllocationApplied]] = []
        self.done = threading.Event()

        def record(event: AllocationApplied) -> None:
            self.applied.append((threading.current_thread().name, event))
            if len(self.applied) >= 3:
                self.done.set()

        self.bus.subscribe("allocation", record, name="test", inline=True)
        self.loop.attach(self.bus)

    def frozen(self, task: str) -> str:
        return (self.controllers[task].path / "cgroup.freeze").read_text().strip()


def test_events_from_any_thread_are_decided_on_the_decision_thread(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.loop.start()
    try:
        # A microphone thread: one loud chunk; the hangover timer ends the voice by itself.
        chunk = AudioLevel("mic", time.monotonic(), -10)
        publish_from("mic", rig.bus, "sensor.audio", chunk)
        deadline = time.monotonic() + 10.0
        while rig.loop.call(lambda core: core.active_rules) and time.monotonic() < deadline:
            time.sleep(0.01)
        # The voice is over; speech stays critical until its result for the chunk arrives.
        assert len(rig.applied) == 2
        result = TaskResult("speech", 0, chunk.t, chunk.t, time.monotonic(), {})
        publish_from("speech:recv", rig.bus, "task.result", result)
        assert rig.done.wait(10.0), f"only {len(rig.applied)} allocation(s) written"
    finally:
        failed = rig.loop.stop()
    assert failed == []
    assert {who for who, _ in rig.applied} == {"decide"}
    assert {who for who, _, _ in rig.rates} == {"decide"}
    assert [a.reason for _, a in rig.applied] == ["start", "context", "work-done"]
    voice = rig.applied[1][1]
    assert voice.allocation["slam"].frozen
    assert 0 <= voice.actuation_ms < 1000
    assert rig.frozen("slam") == "0", "stop thawed what the policy froze"


def test_call_reads_the_core_between_events_and_overrides_go_through_the_inbox(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.loop.start()
    try:
        rig.loop.submit(OverrideSignals({"voice_active": True}))
        signals = rig.loop.call(lambda core: dict(core.context.signals))
        assert signals == {"voice_active": True}
        assert rig.frozen("slam") == "1"
        with pytest.raises(ZeroDivisionError):
            rig.loop.call(lambda core: 1 / 0)
        assert rig.loop.call(lambda core: core.active_rules) == ["voice"], "still deciding"
    finally:
        rig.loop.stop()
    assert rig.frozen("slam") == "0"


def test_the_sampler_runs_each_job_on_its_period() -> None:
    calls: dict[str, list[float]] = {"fast": [], "slow": []}
    sampler = PeriodicSampler(
        {
            "fast": (0.05, calls["fast"].append),
            "slow": (0.2, calls["slow"].append),
        }
    )
    sampler.start()
    deadline = time.monotonic() + 30.0
    while len(calls["fast"]) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.stop()
    assert len(calls["fast"]) >= 8 and 1 <= len(calls["slow"]) <= len(calls["fast"]) // 2
    # On a period grid from the first call: a late call is not followed by a burst.
    first = calls["fast"][0]
    assert all(t >= first + k * 0.05 - 1e-3 for k, t in enumerate(calls["fast"]))


def test_the_inbox_hands_events_in_order_and_waits_out_its_timeout() -> None:
    inbox = Inbox()
    inbox.put("a")
    inbox.put("b")
    assert inbox.get(None) == "a"
    assert inbox.get(None) == "b"
    # The doorbell rang twice for two events already taken: an empty inbox must still wait
    # its whole timeout (an early None is a Tick the core never asked for).
    start = time.monotonic()
    assert inbox.get(0.2) is None
    assert time.monotonic() - start >= 0.2


def test_a_put_from_another_thread_wakes_a_waiting_get() -> None:
    inbox = Inbox()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(inbox.get(None)))
    waiter.start()
    time.sleep(0.05)  # let it block in the wait
    inbox.put("event")
    waiter.join(10.0)
    assert not waiter.is_alive() and got == ["event"]


def test_pinning_moves_every_thread_and_threads_started_later_inherit_it() -> None:
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("pinning to one CPU is visible only with two CPUs or more")
    cpu = runtime_cpu("last")
    assert cpu == max(allowed)
    halt = threading.Event()
    earlier = threading.Thread(target=halt.wait)
    earlier.start()
    try:
        pin_threads({cpu})
        later = threading.Thread(target=halt.wait)
        later.start()
        for thread in (threading.main_thread(), earlier, later):
            assert thread.native_id is not None
            assert os.sched_getaffinity(thread.native_id) == {cpu}, thread.name
    finally:
        pin_threads(allowed)
        halt.set()
    assert os.sched_getaffinity(earlier.native_id or 0) == allowed
    earlier.join()
    later.join()


def test_the_runtime_cpu_setting_names_what_is_wrong_and_the_choices() -> None:
    allowed = os.sched_getaffinity(0)
    assert runtime_cpu("any") is None
    assert runtime_cpu(str(min(allowed))) == min(allowed)
    with pytest.raises(UserError, match=r"CTXROBOT_RUNTIME_CPU='first' is not a CPU.*`any`"):
        runtime_cpu("first")
    with pytest.raises(UserError, match=r"CTXROBOT_RUNTIME_CPU=4096: this process may only use"):
        runtime_cpu("4096")
