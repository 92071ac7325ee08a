"""``ctxrobot sim`` from a real recorded run: ``ctxrobot run --only slam --no-drop`` in its
container, a trace built from its ``run.db``, and that trace simulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxrobot.bench.sim.trace import load_trace
from tests.conftest import ctxrobot, require_data, require_image

pytestmark = pytest.mark.docker

SCENARIO = "config/scenarios/bench-quick.yaml"


def test_a_trace_from_an_isolated_run_costs_every_sample_it_recorded(tmp_path: Path) -> None:
    require_data()
    require_image("ctxrobot/slam")
    run = tmp_path / "iso-slam"
    recorded = ctxrobot(
        "run", "--scenario", SCENARIO, "--only", "slam", "--no-drop", "--duration", "6",
        "--json", "--out", str(run),
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr
    samples = json.loads(recorded.stdout.strip().splitlines()[-1])["tasks"]["slam"]["samples"]

    trace_file = tmp_path / "trace.json"
    built = ctxrobot("sim", "--trace", str(run), "--save-trace", str(trace_file))
    assert built.returncode == 0, built.stderr
    assert "slam: " in built.stderr and "% of it" in built.stderr
    slam = load_trace(trace_file).task("slam")
    assert slam.check["samples"] == samples
    assert len(slam.samples) == samples  # each scan is its own content (its time in the log)
    # The CPU charged to samples is the cgroup's, not the wall time in the task.
    charged, cgroup = slam.check["attributed_cpu_s"], slam.check["cgroup_cpu_s"]
    print(f"slam: {samples} scans, charged {charged:.3f} CPU-s of the cgroup's {cgroup:.3f}")
    assert charged == pytest.approx(cgroup, rel=0.2)

    simulated = ctxrobot(
        "sim", "--scenario", SCENARIO, "--only", "slam", "--trace", str(trace_file),
        "--cpus", "0.05", "--policies", "isolated,cfs", "--json",
    )  # fmt: skip
    assert simulated.returncode == 0, simulated.stderr
    doc = json.loads(simulated.stdout.strip().splitlines()[-1])
    cfs = doc["policies"]["cfs"]["tasks"]["slam"]
    # Scans after the recorded 6 s were not in the trace: costed at the median scan.
    assert cfs["samples"] == 142 and cfs["costed_by_kind"] == 142 - samples
    assert "costed at their kind's median: slam" in simulated.stdout
