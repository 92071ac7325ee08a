"""A synthetic but realistic run, recorded the way the runtime records one.

Every observability test (store, report, trace, metrics) builds its data by publishing
real events on a real `EventBus`, so the path under test is the production path: the
observer pipeline's thread → row tuples → writer thread → SQLite. The timeline is fixed
and seeded, so the expected numbers can be computed independently with numpy.

Timeline (seconds after t0), 20 s long:
- the robot moves from 2 s to 12 s (`motion` = "moving") → rule `slam-critical-while-moving`
- someone speaks from 8 s to 11 s (`voice_active`)           → rule `speech-on-voice`
- SLAM runs at 10 Hz, signs at 5 Hz, speech at 2 Hz; latencies are log-normal, SLAM's
  slower while the robot is stopped (it gets less CPU then)
- every 25th signs sample is dropped (queue overflow)
- the live camera fails at 5 s, reopens, and is open again at 6 s
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    SampleDropped,
    SourceStateChanged,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.store import RunStore

TASKS = [
    # name, image, deadline_ms, cpu_min, cpu_max
    ("slam", "ctxrobot/slam:latest", 100.0, 0.2, 0.8),
    ("signs", "ctxrobot/signs:latest", 200.0, 0.1, 0.6),
    ("speech", "ctxrobot/speech:latest", 500.0, 0.1, 0.6),
]
RATES_HZ = {"slam": 10.0, "signs": 5.0, "speech": 2.0}
DURATION_S = 20.0
MOVING = (2.0, 12.0)
VOICE = (8.0, 11.0)
CAMERA_STATES = [(0.0, "open"), (5.0, "failed"), (5.1, "reopening"), (6.0, "open")]


@dataclass
class RecordedRun:
    """What was published, for checking what the store and its readers report."""

    run_dir: Path
    db_path: Path
    t0: float
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    sensor_t: dict[str, list[float]] = field(default_factory=dict)  # seconds since t0
    dropped: dict[str, int] = field(default_factory=dict)
    actuation_ms: list[float] = field(default_factory=list)
    deadlines_ms: dict[str, float] = field(default_factory=dict)


def _alloc(slam_share: float) -> dict[str, dict[str, object]]:
    rest = (1.0 - slam_share) / 2
    return {
        "slam": {"weight": int(slam_share * 1000), "share_cap": slam_share, "frozen": False},
        "signs": {"weight": int(rest * 1000), "share_cap": rest, "frozen": False},
        "speech": {"weight": int(rest * 1000), "share_cap": rest, "frozen": False},
    }


def record_run(run_dir: Path, *, seed: int = 7, scale: int = 1) -> RecordedRun:
    """Publish a whole run on a fresh bus into a fresh `RunStore`, then close it.

    `scale` multiplies the sample rates (more rows, same shape) for the "nothing lost" test.
    """
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    bus = EventBus()
    store = RunStore.create(
        run_dir,
        run_id="test-run",
        t0=t0,
        policy="ctx",
        manifest_path="config/robot.yaml",
        scenario_path=None,
        ncpus=4,
        tasks=TASKS,
    )
    pipeline = ObserverPipeline(bus)
    pipeline.add(store)
    rec = RecordedRun(run_dir, store.path, t0, deadlines_ms={n: d for n, _, d, _, _ in TASKS})

    def at(s: float) -> float:
        return t0 + s

    for name, *_ in TASKS:
        bus.publish("task.state", TaskStateChanged(at(0.0), name, "starting"))
        bus.publish("task.state", TaskStateChanged(at(0.5), name, "running", "hello pid 42"))

    def allocate(t: float, reason: str, slam_share: float) -> None:
        act = float(rng.lognormal(np.log(0.15), 0.5))
        rec.actuation_ms.append(act)
        alloc = _alloc(slam_share)
        bus.publish(
            "allocation", AllocationApplied(at(t), at(t) - 0.0002, "ctx", reason, alloc, act)
        )
        used = {task: float(a["share_cap"]) * 0.8 for task, a in alloc.items()}
        bus.publish("usage", UsageSampled(at(t), used))

    signals: dict[str, object] = {"speed": 0.0, "motion": "stopped", "voice_active": False}

    def change(t: float, **new: object) -> None:
        signals.update(new)
        bus.publish("context", ContextChanged(at(t), dict(signals), tuple(new)))

    for t, state in CAMERA_STATES:
        detail = "no frame for 2 s" if state != "open" else ""
        bus.publish("source.state", SourceStateChanged(at(t), "camera", state, detail))
    allocate(0.0, "start", 0.34)
    change(0.0)
    change(MOVING[0], speed=0.4, motion="moving")
    bus.publish("rule", RuleChanged(at(MOVING[0]), "slam-critical-while-moving", True))
    allocate(MOVING[0], "rule slam-critical-while-moving", 0.6)
    change(VOICE[0], voice_active=True)
    bus.publish("rule", RuleChanged(at(VOICE[0]), "speech-on-voice", True))
    allocate(VOICE[0], "rule speech-on-voice", 0.5)
    change(VOICE[1], voice_active=False)
    bus.publish("rule", RuleChanged(at(VOICE[1]), "speech-on-voice", False))
    allocate(VOICE[1], "rule speech-on-voice ended", 0.6)
    change(MOVING[1], speed=0.0, motion="stopped")
    bus.publish("rule", RuleChanged(at(MOVING[1]), "slam-critical-while-moving", False))
    allocate(MOVING[1], "rule slam-critical-while-moving ended", 0.34)

    median_ms = {"slam": 40.0, "signs": 80.0, "speech": 250.0}
    for name, rate in RATES_HZ.items():
        rec.latencies_ms[name], rec.sensor_t[name], rec.dropped[name] = [], [], 0
        n = int(DURATION_S * rate * scale)
        for i in range(n):
            ts = 1.0 + i / (rate * scale)
            if name == "signs" and i % 25 == 24:
                bus.publish("task.dropped", SampleDropped(name, i, at(ts), "queue full"))
                rec.dropped[name] += 1
                continue
            slow = name == "slam" and not (MOVING[0] <= ts < MOVING[1])
            lat_ms = float(rng.lognormal(np.log(median_ms[name] * (2.0 if slow else 1.0)), 0.4))
            wait_s = lat_ms / 1000 * 0.2
            result = {"i": i, "pose": [ts, 0.0, 0.1]} if name == "slam" else {"i": i}
            bus.publish(
                "task.result",
                TaskResult(name, i, at(ts), at(ts + wait_s), at(ts + lat_ms / 1000), result),
            )
            rec.latencies_ms[name].append(lat_ms)
            rec.sensor_t[name].append(ts)
    pipeline.close()
    store.close(DURATION_S, {"note": "synthetic"})
    bus.close()
    return rec
