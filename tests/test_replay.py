"""A recorded run replayed through a fresh scheduler core in virtual time.

The decision thread records every input it hands the core (with the ``now`` it handed it)
in run.db's ``core_inputs`` table. Here a run is recorded through the production path —
a real ``ctxrobot run`` of the default robot with Docker, or the decision thread, bus,
observer pipeline and run store without it — then a core built from the same manifest is
fed the recorded inputs with their recorded times: no sleep, thread, socket or container.
The allocations it decides must be the ones the run applied, in order and content.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.manifest.schema import Manifest, load_manifest
from ctxrobot.model.actions import ApplyAllocation
from ctxrobot.model.allocation import Machine
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import AudioLevel, CoreInput, Odometry, TaskResult
from ctxrobot.observe.inputs import CORE_RESULT_KEYS
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.readers import read_inputs, read_run
from ctxrobot.observe.store import RunStore
from ctxrobot.observe.values import dumps
from ctxrobot.sched.state import OverrideSignals, ReloadRules, Start
from ctxrobot.service.core import build_core
from ctxrobot.service.loop import DecisionLoop, Executor
from tests.conftest import REPO, ctxrobot, require_data, require_image
from tests.test_loop import cgroup, publish_from

ROBOT = REPO / "config" / "robot.yaml"
TASKS = ("slam", "signs", "speech")

# (trigger_t, policy, reason, allocation as stored)
Decision = tuple[float, str, str, dict[str, Any]]


def replay(
    manifest: Manifest, policy: str, tasks: Sequence[str], inputs: Sequence[CoreInput]
) -> list[Decision]:
    """The allocations a fresh core decides when handed ``inputs`` at their recorded times."""
    core = build_core(manifest, policy, tasks)
    decided: list[Decision] = []
    for recorded in inputs:
        for action in core.handle(recorded.event, recorded.t):
            if isinstance(action, ApplyAllocation):
                allocation = json.loads(dumps(action.allocation))  # as the store keeps it
                decided.append((action.trigger_t, action.policy, action.reason, allocation))
    return decided


def applied(run: Path) -> list[Decision]:
    """The allocations the run applied, from its `allocations` table."""
    return [
        (row["trigger_t"], row["policy"], row["reason"], row["allocation"])
        for row in read_run(run).allocations
    ]


@dataclasses.dataclass(frozen=True)
class Recording:
    run: Path
    manifest: Manifest
    policy: str
    tasks: list[str]
    inputs: list[CoreInput]

    def replay(self, inputs: Sequence[CoreInput] | None = None) -> list[Decision]:
        return replay(
            self.manifest, self.policy, self.tasks, self.inputs if inputs is None else inputs
        )


def load_recording(run: Path) -> Recording:
    data = read_run(run)
    return Recording(
        run=run,
        manifest=load_manifest(data.run["manifest_path"]),
        policy=data.run["policy"],
        tasks=[t["name"] for t in data.tasks],
        inputs=read_inputs(run),
    )


# -- a real run of the default robot -------------------------------------------------------
@pytest.fixture(scope="module")
def robot_run(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    require_data()
    for task in TASKS:
        require_image(f"ctxrobot/{task}")
    run = tmp_path_factory.mktemp("replay") / "run"
    proc = ctxrobot(
        "run",
        "--config",
        str(ROBOT),
        "--policy",
        "ctx",
        "--duration",
        "8",
        "--out",
        str(run),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_recording(run)


@pytest.mark.docker
def test_a_real_run_replays_to_the_allocations_it_applied(robot_run: Recording) -> None:
    inputs = robot_run.inputs
    span = inputs[-1].t - inputs[0].t
    kinds = sorted({type(i.event).__name__ for i in inputs})
    print(f"{len(inputs)} inputs over {span:.1f} s ({len(inputs) / span:.0f} rows/s): {kinds}")
    assert isinstance(inputs[0].event, Start)
    assert {"CameraFrame", "AudioLevel", "LaserScan", "TaskResult"} <= set(kinds)
    recorded = applied(robot_run.run)
    reasons = [reason for _, _, reason, _ in recorded]
    print(f"{len(recorded)} allocations: {reasons}")
    assert reasons[0] == "start" and len(recorded) >= 2, "a run that decided only once"
    assert robot_run.replay() == recorded


def _cause_of_second_decision(recording: Recording) -> int:
    """Index of the input whose handling decided the run's second allocation."""
    core = build_core(recording.manifest, recording.policy, recording.tasks)
    decisions = 0
    for index, recorded in enumerate(recording.inputs):
        actions = core.handle(recorded.event, recorded.t)
        decisions += sum(isinstance(a, ApplyAllocation) for a in actions)
        if decisions >= 2:
            return index
    raise AssertionError("the run decided only once")


def _shifted(recorded: CoreInput, by_s: float) -> CoreInput:
    """The same input ``by_s`` later: its `now` and every time it carries."""
    event = recorded.event
    if dataclasses.is_dataclass(event):
        times = {
            f.name: getattr(event, f.name) + by_s
            for f in dataclasses.fields(event)
            if f.name == "t" or f.name.startswith("t_")
        }
        event = dataclasses.replace(event, **times)
    return dataclasses.replace(recorded, t=recorded.t + by_s, event=event)


@pytest.mark.docker
def test_a_replay_without_one_input_or_with_one_changed_does_not_match(
    robot_run: Recording,
) -> None:
    recorded = applied(robot_run.run)
    cause = _cause_of_second_decision(robot_run)
    inputs = robot_run.inputs
    print(f"the second allocation came from {inputs[cause]}")
    assert robot_run.replay([*inputs[:cause], *inputs[cause + 1 :]]) != recorded
    changed = [*inputs[:cause], _shifted(inputs[cause], 0.01), *inputs[cause + 1 :]]
    assert robot_run.replay(changed) != recorded
    assert robot_run.replay(inputs[1:]) != recorded, "without Start"


# -- the decision thread, bus, pipeline and store, without Docker ------------------------------
def _play(bus: EventBus, loop: DecisionLoop, manifest: Manifest) -> None:
    """Sensor readings, a result, operator commands; and time for the core's timers."""
    for i in range(6):  # the robot drives off: slam becomes critical
        now = time.monotonic()
        publish_from("lidar", bus, "sensor.odometry", Odometry("lidar", now, 0.1 * i, 0, 0, 0.5, 0))
        time.sleep(0.05)
    publish_from("mic", bus, "sensor.audio", AudioLevel("mic", time.monotonic(), -10.0))
    now = time.monotonic()
    sign = TaskResult("signs", 1, now - 0.05, now - 0.04, now, {"detections": [{"label": "stop"}]})
    publish_from("signs:recv", bus, "task.result", sign)
    time.sleep(0.5)  # the voice's hangover runs out: a Tick
    loop.submit(OverrideSignals({"motion": "stopped"}))
    loop.submit(ReloadRules(manifest.rules[1:]))
    loop.submit(OverrideSignals(None))
    loop.call(lambda _core: None)  # every input above is handled


@pytest.fixture
def thread_run(tmp_path: Path) -> Iterator[Recording]:
    manifest = load_manifest(ROBOT)
    bus = EventBus()
    store = RunStore.create(
        tmp_path / "run",
        run_id="replay",
        t0=time.monotonic(),
        policy="ctx",
        manifest_path=ROBOT,
        scenario_path=None,
        ncpus=2,
        tasks=[(name, f"ctxrobot/{name}", None, None, None) for name in TASKS],
    )
    pipeline = ObserverPipeline(bus)
    pipeline.add(store, "store")
    controllers = {name: cgroup(tmp_path, name) for name in TASKS}
    executor = Executor(Actuator(controllers, Machine(2.0)), lambda *_: None, bus)
    loop = DecisionLoop(build_core(manifest, "ctx", TASKS), executor, rt_priority=0)
    loop.attach(bus)
    loop.start()
    try:
        _play(bus, loop, manifest)
    finally:
        loop.stop()
        pipeline.close()
        store.close(1.0)
        bus.close()
    yield load_recording(tmp_path / "run")


def test_the_decision_threads_inputs_replay_to_its_allocations(thread_run: Recording) -> None:
    kinds = [type(i.event).__name__ for i in thread_run.inputs]
    print(kinds)
    assert {"Start", "Odometry", "AudioLevel", "TaskResult", "Tick"} <= set(kinds)
    assert kinds.count("OverrideSignals") == 2 and kinds.count("ReloadRules") == 1
    recorded = applied(thread_run.run)
    assert len(recorded) >= 3
    assert thread_run.replay() == recorded
    without_reload = [i for i in thread_run.inputs if not isinstance(i.event, ReloadRules)]
    assert thread_run.replay(without_reload) != recorded


# -- what a recorded result keeps ------------------------------------------------------------
class ReadKeys(Mapping[str, Any]):
    """A result that notes every key read from it (iterating reads them all: "*")."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        self.read.add("*")
        return iter(self._items)

    def __len__(self) -> int:
        self.read.add("*")
        return len(self._items)


def test_the_core_reads_only_the_result_keys_that_are_recorded() -> None:
    core = build_core(load_manifest(ROBOT), "ctx", TASKS)
    core.handle(Start(), 0.0)
    results = []
    for i, task in enumerate(TASKS * 3):
        t = 1.0 + i * 0.1
        shed = {"shed": "stale"} if i == 4 else {}
        items = {
            "detections": [{"label": "stop"}] if i % 2 else [],
            "pose": [0, 0, 0],
            "text": "go",
            **shed,
        }
        result = ReadKeys(items)
        results.append(result)
        core.handle(TaskResult(task, i, t - 0.05, t - 0.04, t, result), t)
    read = set().union(*(r.read for r in results))
    assert read and read <= set(CORE_RESULT_KEYS), read
