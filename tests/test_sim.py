"""``ctxrobot sim``: one simulated run with the real scheduler core, on synthetic inputs
(channels, back-pressure, rate gate, usage readings), the trace's CPU attribution, and the
command line. The policy outcomes on the recorded trace are in test_sim_policies.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from ctxrobot.bench.sim.engine import Envelope, Simulation
from ctxrobot.bench.sim.trace import SampleCost, TaskTrace, Trace, load_trace, sample_cpu
from ctxrobot.bench.sim.workload import Reading, Workload
from ctxrobot.manifest.schema import Manifest, load_manifest
from ctxrobot.model.events import CameraFrame, Odometry
from ctxrobot.streams.source import Fired
from ctxtask.protocol import Sample
from tests.conftest import REPO, ctxrobot, require_data

FIXTURE = REPO / "tests" / "fixtures" / "sim-trace.json"


@pytest.fixture(scope="module")
def robot() -> Manifest:
    require_data()  # the manifest's scenario names data files
    return load_manifest(REPO / "config" / "robot.yaml")


def camera(n: int, fps: float, image: str = "road1.png") -> list[Reading]:
    def fire(t: float, sid: int) -> Fired:
        sample = Sample(sid, t, "frame", {"name": image}, b"")
        return Fired((("sensor.camera", CameraFrame("camera", t, 0.0)),), sample)

    return [Reading(i / fps, fire, "frame", f"frame:{image}") for i in range(n)]


def standing_still(n: int, hz: float) -> list[Reading]:
    """Odometry of a robot that does not move: the context says "stopped"."""

    def fire(t: float, sid: int) -> Fired:
        sample = Sample(sid, t, "scan", {"t_log": t}, b"")
        return Fired((("sensor.odometry", Odometry("lidar", t, 0.0, 0.0, 0.0, 0.0, 0.0)),), sample)

    return [Reading(i / hz, fire, "scan", f"scan:{i}") for i in range(n)]


def costing(cpu_s: float, **tasks: str) -> Trace:
    """Every sample of each task (name=source) costs ``cpu_s`` on one CPU."""
    return Trace(
        {
            name: TaskTrace(
                source, 0.0, {}, {kind: SampleCost(cpu_s) for kind in ("frame", "scan")}
            )
            for name, source in tasks.items()
        }
    )


def test_drop_oldest_drops_and_block_holds_the_source_back(robot: Manifest) -> None:
    # Frames at 10 Hz that take 0.25 s each: the task falls behind at once.
    work = Workload(2.0, {"camera": camera(20, 10.0)})
    trace = costing(0.25, signs="camera")
    dropping = Simulation(robot, "cfs", ["signs"], work, trace, Envelope(2), no_drop=False).run()
    # signs: depth 2, drop_oldest; one in flight. Every sample is processed or dropped, and
    # every frame is sensed on time.
    assert len(dropping.samples) + len(dropping.drops) == 20
    assert {why for *_, why in dropping.drops} == {"queue_full"}
    assert [s.t_sensor for s in dropping.samples][:2] == pytest.approx([0.0, 0.1])
    blocking = Simulation(robot, "cfs", ["signs"], work, trace, Envelope(2), no_drop=True).run()
    # Back-pressure: nothing dropped, the camera waits for room and falls behind its schedule.
    assert len(blocking.samples) == 20 and not blocking.drops
    last = blocking.samples[-1]
    assert last.t_sensor == pytest.approx(19 * 0.25 - 3 * 0.25)  # room every 0.25 s
    assert last.t_end == pytest.approx(20 * 0.25)
    assert blocking.end_s == pytest.approx(5.0)


def test_a_rate_from_the_rules_sheds_samples_between_slots(robot: Manifest) -> None:
    # The robot stands still: rule signs-slow-when-stopped sets signs to 1 Hz (ctx passes it).
    work = Workload(3.0, {"lidar": standing_still(30, 10.0), "camera": camera(30, 10.0)})
    trace = costing(0.001, signs="camera")
    sim = Simulation(robot, "ctx", ["signs"], work, trace, Envelope(2))
    record = sim.run()
    reasons = [why for *_, why in record.drops]
    assert set(reasons) == {"rate"}
    processed = [s.t_sensor for s in record.samples]
    assert len(processed) + len(reasons) == 30
    gaps = [b - a for a, b in itertools.pairwise(processed[1:])]
    assert gaps and min(gaps) >= 1.0 - 1e-9  # one frame per second once the rate is set
    # The usage sampler fed the core: it knows what signs used.
    assert sim.core.tasks["signs"].demand is not None


def test_an_envelope_stretches_the_work_and_caps_follow_the_kernel(robot: Manifest) -> None:
    work = Workload(1.0, {"camera": camera(1, 1.0)})
    trace = costing(0.01, signs="camera")
    # 0.1 CPU = 1 ms per 10 ms: a 10 ms frame takes ten periods.
    record = Simulation(robot, "cfs", ["signs"], work, trace, Envelope(2, 0.1)).run()
    assert record.samples[0].t_end == pytest.approx(0.091)
    # A quota below the kernel's 1 ms minimum is raised to it (0.05 CPU grants 0.1).
    assert Envelope(2, 0.05).effective_cpus == pytest.approx(0.1)


def test_the_same_input_gives_the_same_record(robot: Manifest) -> None:
    work = Workload(3.0, {"lidar": standing_still(30, 10.0), "camera": camera(30, 10.0)})
    trace = costing(0.03, signs="camera", slam="lidar")

    def once() -> object:
        sim = Simulation(robot, "ctx", ["slam", "signs"], work, trace, Envelope(2, 0.2))
        return sim.run()

    assert once() == once()


def test_cpu_is_charged_to_samples_by_what_their_cgroup_used() -> None:
    spans = [(0.1, 0.2), (0.3, 0.35), (0.6, 0.7)]
    # Interval (0, 0.5]: 0.15 s of wall on samples, 0.3 CPU-s used: ratio 2 (two threads).
    # Interval (0.5, 1.0]: 0.1 s of wall, 0.05 CPU-s (a contended core): ratio 0.5.
    usage = [(0.5, 0.3), (1.0, 0.05)]
    assert sample_cpu(spans, usage, 2.0) == pytest.approx([0.2, 0.1, 0.05])
    # A ratio is never above the machine's CPUs; wall after the last reading counts as is.
    assert sample_cpu([(0.4, 0.45), (1.2, 1.3)], [(0.5, 1.0)], 2.0) == pytest.approx([0.1, 0.1])


def test_the_fixture_trace_loads_and_round_trips(tmp_path: Path) -> None:
    trace = load_trace(FIXTURE)
    assert set(trace.tasks) == {"slam", "signs", "speech"}
    copy = tmp_path / "trace.json"
    trace.save(copy)
    assert load_trace(copy).tasks == trace.tasks


def test_command_line(tmp_path: Path) -> None:
    require_data()
    proc = ctxrobot(
        "sim",
        "--scenario",
        "config/scenarios/bench-quick.yaml",
        "--trace",
        str(FIXTURE),
        "--load",
        "2",
        "--policies",
        "cfs,static",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(doc["policies"]) == {"cfs", "static"}
    assert doc["envelope"]["cpus"] == pytest.approx(doc["demand_cpus"] / 2)
    assert "| cfs | signs |" in proc.stdout
    # Errors a user can make: one line, exit 2.
    missing = ctxrobot("sim", "--trace", str(FIXTURE))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "ctxrobot sim: give --load L or --cpus X to simulate (or --save-trace FILE)"
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    wrong = ctxrobot("sim", "--trace", str(bad), "--load", "1")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "not a ctxrobot-sim-trace/1 file" in wrong.stderr
