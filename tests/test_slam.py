"""SLAM task: laser log reader, the Freiburg metric, the pose graph, and the accuracy targets.

The accuracy tests run the whole task (``slam.evaluate``) over the Intel and ACES logs in this
process (host venv) and assert the targets: mean relation error ≤ 0.10 m and ≤ 1.5°. They
print timings (`pytest -s`) but do not assert them: the 2-core test machine is shared.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ctxtask.datasets.laser import (
    interpolate_odometry,
    load_laser_dataset,
    relative_poses,
    scan_sample,
    score_relations,
)
from ctxtask.protocol import Sample
from slam.evaluate import evaluate
from slam.matching import LikelihoodField, PointLineMap, correlative_search, icp
from slam.posegraph import PoseGraph
from slam.scan import scan_to_points
from slam.se2 import between, compose
from slam.task import SlamTask
from tests.conftest import REPO, require_data

TRANS_TARGET_M = 0.10
ROT_TARGET_DEG = 1.5
# Raw-odometry scores quoted in each dataset's MANIFEST.md (Kümmerle metric, mean errors).
RAW_ODOMETRY = {"intel": (7.38, 39.3), "aces": (0.55, 2.22)}


def _copy_dataset(src: Path, dst: Path) -> Path:
    """The small text files of a dataset folder (no bags), for corrupting in tests."""
    dst.mkdir()
    for pattern in ("*_laser.txt.gz", "*_odom.txt", "laser.yaml", "*.relations"):
        for f in src.glob(pattern):
            shutil.copy(f, dst / f.name)
    return dst


# ------------------------------------------------------------------------------------ reader
@pytest.mark.parametrize("name", ["intel", "aces"])
def test_raw_odometry_scores_match_manifest(name: str) -> None:
    """Reader + metric reproduce the published "no SLAM" baseline of each log."""
    ds = load_laser_dataset(require_data(f"slam/{name}"))
    assert ds.relations is not None
    trans, rot = score_relations(ds.stamps, ds.odom_at_scans, ds.relations)
    want_t, want_r = RAW_ODOMETRY[name]
    assert trans == pytest.approx(want_t, abs=0.01)
    assert rot == pytest.approx(want_r, abs=0.05)


def test_reader_fields() -> None:
    ds = load_laser_dataset(require_data("slam/aces"))
    n = len(ds.stamps)
    assert n == 7374
    assert ds.ranges.shape == (n, 180) and ds.ranges.dtype == np.float32
    assert ds.odom_at_scans.shape == (n, 3)
    assert ds.odometry.shape[1] == 6
    assert ds.relations is not None and ds.relations.shape == (1279, 5)
    assert ds.geometry.angle_increment == pytest.approx(math.radians(1.0))
    assert ds.geometry.angle_min == pytest.approx(math.radians(-90.0))
    assert ds.geometry.max_valid_range == pytest.approx(49.9)
    assert np.all(np.abs(ds.odom_at_scans[:, 2]) <= math.pi)
    assert ds.duration_s == pytest.approx(1365.5, abs=0.1)


def test_odometry_interpolation_is_angle_aware() -> None:
    """Halfway between θ = 3.1 and θ = −3.1 the robot faces ±π, not 0."""
    odom = np.array([[0.0, 0.0, 0.0, 3.1, 0, 0], [1.0, 2.0, 0.0, -3.1, 0, 0]])
    mid = interpolate_odometry(odom, np.array([0.5]))[0]
    assert mid[0] == pytest.approx(1.0)
    assert abs(mid[2]) == pytest.approx(math.pi, abs=1e-9)


def test_malformed_laser_file_names_file(tmp_path: Path) -> None:
    folder = _copy_dataset(require_data("slam/aces"), tmp_path / "aces")
    laser = folder / "aces_laser.txt.gz"
    with gzip.open(laser, "rt") as f:
        lines = f.read().splitlines()
    lines[5] = " ".join(lines[5].split()[:-3])  # a row with 3 ranges missing
    with gzip.open(laser, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"aces_laser\.txt\.gz"):
        load_laser_dataset(folder)


def test_malformed_yaml_and_missing_files(tmp_path: Path) -> None:
    folder = _copy_dataset(require_data("slam/aces"), tmp_path / "aces")
    (folder / "laser.yaml").write_text("beams: 180\nangle_min_deg: -90\n")
    with pytest.raises(ValueError, match=r"laser.yaml: missing key\(s\) angle_increment_deg"):
        load_laser_dataset(folder)
    (folder / "laser.yaml").write_text(
        "beams: 181\nangle_min_deg: -90\nangle_increment_deg: 1\nno_return_m: 49.9\n"
        "scan_rate_hz: 5\n"
    )
    with pytest.raises(ValueError, match=r"180 ranges, laser\.yaml says 181 beams"):
        load_laser_dataset(folder)
    (folder / "aces_odom.txt").unlink()
    with pytest.raises(ValueError, match=r"no file matching '\*_odom.txt'"):
        load_laser_dataset(folder)


def test_score_relations_is_exact_on_synthetic_poses() -> None:
    rng = np.random.default_rng(1)
    stamps = np.arange(50, dtype=np.float64)
    poses = np.column_stack([rng.normal(size=50), rng.normal(size=50), rng.uniform(-3, 3, 50)])
    i1, i2 = rng.integers(0, 50, 30), rng.integers(0, 50, 30)
    truth = relative_poses(poses[i1], poses[i2])
    relations = np.column_stack([stamps[i1], stamps[i2], truth])
    assert score_relations(stamps, poses, relations) == pytest.approx((0.0, 0.0), abs=1e-9)
    # Rotating scan 2 by 2° about its own origin changes only the rotational error.
    relations[:, 4] -= math.radians(2.0)
    trans, rot = score_relations(stamps, poses, relations)
    assert trans == pytest.approx(0.0, abs=1e-9)
    assert rot == pytest.approx(2.0)
    relations[0, 1] = 0.5  # no scan at this stamp
    with pytest.raises(ValueError, match="match no scan"):
        score_relations(stamps, poses, relations)


# ------------------------------------------------------------------------------- pose graph
def test_pose_graph_closes_a_loop() -> None:
    """A square driven with biased odometry snaps back onto the truth with one loop edge."""
    truth = [np.zeros(3)]
    for step in range(16):
        turn = math.pi / 2 if step % 4 == 3 else 0.0
        truth.append(compose(truth[-1], np.array([1.0, 0.0, turn])))
    truth_arr = np.array(truth)
    graph = PoseGraph(dcs_phi=1e5)
    info = np.diag([1e4, 1e4, 1e4])
    graph.add_node(truth_arr[0])
    for i in range(1, len(truth_arr)):
        z = between(truth_arr[i - 1], truth_arr[i]) + np.array([0.0, 0.0, 0.02])  # gyro bias
        graph.add_node(compose(graph.poses[i - 1], z))
        graph.add_edge(i - 1, i, z, info, robust=False)
    drift = np.hypot(*(graph.poses[-1, :2] - truth_arr[-1, :2]))
    assert drift > 0.5
    graph.add_edge(0, len(truth_arr) - 1, between(truth_arr[0], truth_arr[-1]), info * 100, True)
    graph.optimise()
    err = np.hypot(*(graph.poses[:, :2] - truth_arr[:, :2]).T)
    assert err.max() < 0.1 * drift


# ------------------------------------------------------------------------------- matching
def test_search_then_icp_recovers_a_displaced_scan() -> None:
    """A real scan moved by 0.4 m and 6° is found again by the correlative search + ICP."""
    ds = load_laser_dataset(require_data("slam/intel"))
    g = ds.geometry
    scan = scan_to_points(ds.ranges[500], g.angle_min, g.angle_increment, 30.0)
    target = PointLineMap(scan.points, scan.normals)  # the map is the scan at the origin
    field = LikelihoodField(scan.points, 0.1, 0.1, 1.0)
    guess = np.array([0.4, -0.3, math.radians(6.0)])
    found = correlative_search(field, scan.points, guess, 0.8, math.radians(10.0), 0.0175)
    assert np.hypot(*found.pose[:2]) < 0.15 and abs(found.pose[2]) < math.radians(2.0)
    assert found.runner_up < found.score
    result = icp(target, scan.points, found.pose)
    assert np.hypot(*result.pose[:2]) < 0.01 and abs(result.pose[2]) < math.radians(0.2)
    # As good a fit as the true pose itself (fitness counts only points near a map line).
    assert result.fitness >= icp(target, scan.points, np.zeros(3), max_iterations=1).fitness


# ------------------------------------------------------------------------------------ task
def test_task_lifecycle_and_map_output(tmp_path: Path) -> None:
    ds = load_laser_dataset(require_data("slam/aces"))
    task = SlamTask()
    task.setup({"map_out": str(tmp_path / "map")})
    task.initialise()
    results = [task.update(scan_sample(ds, k)) for k in range(300)]
    assert set(results[-1]) == {"pose", "t_log", "loop_closures"}
    assert len(results[-1]["pose"]) == 3
    assert results[-1]["t_log"] == pytest.approx(ds.stamps[299])
    assert len(json.dumps(results[-1])) < 200  # goes over the socket several times a second
    summary = task.terminate()
    assert summary["scans"] == 300
    assert summary["map"] == str(tmp_path / "map" / "map.yaml")
    meta = dict(
        line.split(": ", 1) for line in (tmp_path / "map" / "map.yaml").read_text().splitlines()
    )
    assert set(meta) == {
        "image",
        "resolution",
        "origin",
        "negate",
        "occupied_thresh",
        "free_thresh",
    }
    img = cv2.imread(str(tmp_path / "map" / meta["image"]), cv2.IMREAD_GRAYSCALE)
    values = set(np.unique(img).tolist())
    assert values <= {0, 205, 254} and {0, 254} <= values  # walls and free space were seen
    task.shutdown()


def test_task_survives_a_blind_scan() -> None:
    """A scan where no beam returned (all ranges at max) yields the odometry prediction."""
    ds = load_laser_dataset(require_data("slam/aces"))
    task = SlamTask()
    task.setup({})
    task.initialise()
    for k in range(20):
        task.update(scan_sample(ds, k))
    blind = scan_sample(ds, 20)
    blind = Sample(
        blind.id, blind.t_sensor, "scan", blind.meta, np.full(180, 50.0, "<f4").tobytes()
    )
    pose = task.update(blind)["pose"]
    assert np.all(np.isfinite(pose))
    assert task.terminate()["scans"] == 21


def test_task_rejects_other_samples() -> None:
    task = SlamTask()
    task.setup({})
    task.initialise()
    with pytest.raises(ValueError, match="'scan' samples"):
        task.update(Sample(0, 0.0, "audio", {"rate": 16000}, b"\0\0"))


# ------------------------------------------------------------------------------ evaluate CLI
def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slam.evaluate", *args],
        cwd=REPO / "tasks",
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_evaluate_cli_bad_folder(tmp_path: Path) -> None:
    proc = _run_cli(str(tmp_path))
    assert proc.returncode == 2
    assert "no file matching '*_laser.txt.gz'" in proc.stderr


def test_evaluate_cli_json_short_run(tmp_path: Path) -> None:
    folder = require_data("slam/aces")
    proc = _run_cli(str(folder), "--json", "--max-scans", "400", "--map-out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("trans_error_m", "rot_error_deg", "realtime_factor", "scans", "relations"):
        assert key in metrics
    assert metrics["scans"] == 400 and metrics["relations"] > 0
    assert metrics["trans_error_m"] < TRANS_TARGET_M
    assert (tmp_path / "map.png").is_file()


def test_evaluate_without_relations_still_runs(tmp_path: Path) -> None:
    folder = _copy_dataset(require_data("slam/aces"), tmp_path / "aces")
    (folder / "aces.relations").unlink()
    proc = _run_cli(str(folder), "--json", "--max-scans", "100")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["trans_error_m"] is None and metrics["relations"] == 0
    assert metrics["scans"] == 100


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("name", ["aces", "intel"])
def test_accuracy_targets(name: str) -> None:
    ds = load_laser_dataset(require_data(f"slam/{name}"))
    t0 = time.perf_counter()
    result = evaluate(ds)
    m = result.metrics
    print(
        f"\n{name}: {m['trans_error_m']:.4f} m, {m['rot_error_deg']:.3f} deg over "
        f"{m['relations']} relations; {m['cpu_s']:.1f} s CPU (process time), "
        f"{m['wall_s']:.1f} s wall, realtime factor {m['realtime_factor']:.4f}, "
        f"worst update {m['worst_update_cpu_s'] * 1000:.0f} ms CPU, "
        f"{m['loop_closures']} loop closures; test wall {time.perf_counter() - t0:.1f} s"
    )
    assert m["scans"] == len(ds.stamps)
    assert result.poses.shape == (len(ds.stamps), 3)
    assert m["trans_error_m"] <= TRANS_TARGET_M
    assert m["rot_error_deg"] <= ROT_TARGET_DEG
