"""Reader for 2D laser + odometry logs and the Freiburg relation metric.

A dataset folder (e.g. ``$CTXROBOT_DATA/slam/intel``) holds:

- ``*_laser.txt.gz``: two ``#`` header lines, then ``timestamp r_0 … r_{B-1}`` per scan;
- ``*_odom.txt``: ``#`` header lines, then ``t x y theta tv rv`` (raw wheel odometry); no
  rows: the robot had none (a recording of a lidar without an odometry feed);
- ``laser.yaml``: ``beams, angle_min_deg, angle_increment_deg, no_return_m, scan_rate_hz``
  and optionally ``angle_min_file``: a file in the folder with ``timestamp_s angle_min_deg`` per
  scan, for scanners whose start bearing changes from scan to scan (interleaved modes), and
  ``mount_x_m, mount_y_m, mount_yaw_deg``: where the laser sits on the robot's base (forward,
  left, counter-clockwise; all three or none), as ``ctxrobot record`` writes it;
- optionally ``*.relations``: ``t1 t2 x y z roll pitch yaw`` (pose of scan 2 in scan 1);
- optionally the log's ROS 1 bag (``*.bag``), whose ``/tf_static`` says where the laser sits on
  the robot's base (without it or the ``mount_`` keys, at its centre; with both, they must
  agree).

The host runtime uses this module to replay logs and derive motion context, and the SLAM task
uses it for evaluation (inside the slam container, which has no PyYAML), so it depends on
numpy, and on ``rosbags`` for a folder's bag: ``laser.yaml`` is a flat ``key: value`` mapping
and is parsed here.

:func:`score_run` scores the poses a SLAM task returned during a run (the benchmark's
quality-in-the-loop figure).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxtask.protocol import Sample
from ctxtask.se2 import between, compose, wrap

# Relation stamps are copies of scan stamps; anything farther than this is a different scan.
_STAMP_TOLERANCE_S = 1e-3
_YAML_KEYS = ("beams", "angle_min_deg", "angle_increment_deg", "no_return_m", "scan_rate_hz")
# laser.yaml keys whose value is a file name, not a number.
_YAML_FILE_KEYS = ("angle_min_file",)
# Optional laser.yaml keys: the laser's mount on the base, all three or none.
_YAML_MOUNT_KEYS = ("mount_x_m", "mount_y_m", "mount_yaw_deg")
# A mount in laser.yaml and one in the bag are the same when this close (m, rad).
_MOUNT_TOLERANCE = (1e-3, math.radians(0.01))


@dataclass(frozen=True)
class LaserGeometry:
    """How beam index maps to bearing, and which ranges are real returns."""

    angle_min: float  # rad, nominal bearing of beam 0 (counter-clockwise positive)
    angle_increment: float  # rad between consecutive beams
    max_valid_range: float  # m; a range at or above this means "no return"
    rate_hz: float  # nominal scan rate


@dataclass(frozen=True)
class LaserDataset:
    """One laser log, fully in memory (Intel: ~10 MB of float32 ranges)."""

    name: str
    stamps: np.ndarray  # (N,) float64 scan timestamps, s
    ranges: np.ndarray  # (N, B) float32, m
    # (N, 3) odometry [x, y, theta] interpolated at scan stamps; NaN without odometry
    odom_at_scans: np.ndarray
    odometry: np.ndarray  # (M, 6) raw [t, x, y, theta, tv, rv]; no rows without odometry
    geometry: LaserGeometry
    angle_min: np.ndarray  # (N,) rad, bearing of beam 0 of each scan
    relations: np.ndarray | None  # (K, 5) [t1, t2, dx, dy, dyaw] or None
    # (3,) the laser's pose on the robot's base [x m, y m, yaw rad]; the odometry and the
    # relations are the base's.
    laser_mount: np.ndarray

    @property
    def duration_s(self) -> float:
        """Time spanned by the scans (what "real time" means for this log)."""
        return float(self.stamps[-1] - self.stamps[0]) if len(self.stamps) > 1 else 0.0


def _single(folder: Path, pattern: str, required: bool) -> Path | None:
    matches = sorted(folder.glob(pattern))
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise ValueError(f"{folder}: expected one file matching {pattern!r}, found {names}")
    if not matches:
        if required:
            raise ValueError(f"{folder}: no file matching {pattern!r}")
        return None
    return matches[0]


def _load_table(path: Path, min_cols: int, what: str, may_be_empty: bool = False) -> np.ndarray:
    """Load a whitespace table with ``#`` comments; errors name the file and the problem."""
    try:
        with warnings.catch_warnings():
            # A file without rows is handled below, by name, instead of warned about.
            warnings.filterwarnings("ignore", "loadtxt: input contained no data")
            table = np.loadtxt(path, comments="#", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, EOFError) as exc:  # ragged/non-numeric rows, broken gzip
        raise ValueError(f"{path}: malformed {what}: {exc}") from exc
    if table.shape[0] == 0:
        if may_be_empty:
            return np.zeros((0, min_cols))
        raise ValueError(f"{path}: no {what} rows")
    if table.shape[1] < min_cols:
        raise ValueError(
            f"{path}: {what} rows have {table.shape[1]} columns, expected at least {min_cols}"
        )
    if not np.all(np.isfinite(table)):
        row = int(np.argwhere(~np.isfinite(table))[0, 0])
        raise ValueError(f"{path}: non-finite value in {what} data row {row + 1}")
    return table


def _parse_flat_yaml(path: Path) -> dict[str, float | str]:
    """``key: value`` lines with ``#`` comments: numbers, and file names for the file keys."""
    doc: dict[str, float | str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{path}:{lineno}: expected 'key: value', got {raw.strip()!r}")
        if key in _YAML_FILE_KEYS:
            name = value.strip().strip("'\"")
            if not name or "/" in name:
                raise ValueError(
                    f"{path}:{lineno}: {key} must name a file in this folder, got {value.strip()!r}"
                )
            doc[key] = name
            continue
        try:
            doc[key] = float(value)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: value of {key!r} is not a number: {value.strip()!r} "
                f"(file-name keys: {', '.join(_YAML_FILE_KEYS)})"
            ) from None
    return doc


def _load_geometry(path: Path) -> tuple[LaserGeometry, int, str | None, np.ndarray | None]:
    """The geometry, the beam count, the per-scan start-bearing file named (if any) and the
    laser's mount on the base (if given: x, y in m, yaw in rad)."""
    doc = _parse_flat_yaml(path)
    missing = [k for k in _YAML_KEYS if k not in doc]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    numbers = {k: doc[k] for k in _YAML_KEYS}
    assert all(isinstance(v, float) for v in numbers.values())  # file keys are not in _YAML_KEYS
    beams = int(numbers["beams"])
    if beams != numbers["beams"]:
        raise ValueError(f"{path}: beams must be an integer, got {numbers['beams']}")
    geometry = LaserGeometry(
        angle_min=math.radians(float(numbers["angle_min_deg"])),
        angle_increment=math.radians(float(numbers["angle_increment_deg"])),
        max_valid_range=float(numbers["no_return_m"]),
        rate_hz=float(numbers["scan_rate_hz"]),
    )
    if beams <= 0 or geometry.angle_increment <= 0 or geometry.max_valid_range <= 0:
        raise ValueError(f"{path}: beams, angle_increment_deg and no_return_m must be > 0")
    angle_file = doc.get("angle_min_file")
    given = [k for k in _YAML_MOUNT_KEYS if k in doc]
    mount = None
    if given:
        if len(given) < len(_YAML_MOUNT_KEYS):
            absent = [k for k in _YAML_MOUNT_KEYS if k not in doc]
            raise ValueError(
                f"{path}: the laser's mount needs {', '.join(_YAML_MOUNT_KEYS)}; "
                f"{', '.join(absent)} missing (a laser at the base's centre: leave all three out)"
            )
        x, y, yaw_deg = (float(doc[k]) for k in _YAML_MOUNT_KEYS)
        mount = np.array([x, y, math.radians(yaw_deg)])
    return geometry, beams, angle_file if isinstance(angle_file, str) else None, mount


def _load_angle_mins(path: Path, stamps: np.ndarray) -> np.ndarray:
    """Per-scan start bearings (rad) from ``timestamp_s angle_min_deg`` lines, one per scan."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (named by angle_min_file in laser.yaml)")
    table = _load_table(path, 2, "start bearing")
    if len(table) != len(stamps):
        raise ValueError(f"{path}: {len(table)} start bearings for {len(stamps)} scans")
    off = np.abs(table[:, 0] - stamps) > _STAMP_TOLERANCE_S
    if np.any(off):
        row = int(np.argmax(off)) + 1
        raise ValueError(f"{path}: data row {row} has a stamp that is not its scan's stamp")
    return np.radians(table[:, 1])


def _load_laser_mount(folder: Path, stated: np.ndarray | None) -> np.ndarray:
    """The laser's pose on the robot's base: ``stated`` by laser.yaml, or from the folder's
    ROS bag, the ``/tf_static`` transforms from the odometry's child frame (the base) down to
    the ``/scan`` frame, as a ROS SLAM node takes it from TF; with both, they must agree.
    Without either the laser sits at the base's centre."""
    bag = _single(folder, "*.bag", required=False)
    if bag is None:
        return np.zeros(3) if stated is None else stated
    from_bag = _bag_laser_mount(bag)
    if stated is not None:
        off = np.abs(stated - from_bag)
        off[2] = abs(math.remainder(float(off[2]), math.tau))
        if max(off[:2]) > _MOUNT_TOLERANCE[0] or off[2] > _MOUNT_TOLERANCE[1]:
            raise ValueError(
                f"{folder / 'laser.yaml'}: its mount {_mount_text(stated)} disagrees with "
                f"{bag.name}'s /tf_static, {_mount_text(from_bag)}: correct laser.yaml or "
                "leave its mount_ keys out"
            )
    return from_bag


def _mount_text(mount: np.ndarray) -> str:
    return f"x {mount[0]:.3f} m, y {mount[1]:.3f} m, yaw {math.degrees(mount[2]):.2f}°"


def _bag_laser_mount(bag: Path) -> np.ndarray:
    """The laser's pose on the base from a ROS 1 bag's ``/tf_static``."""
    # Imported here: replaying a log without a bag (and the other tasks' images) need no bag
    # reader.
    from rosbags.rosbag1 import Reader
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    typestore = get_typestore(Stores.ROS1_NOETIC)
    first: dict[str, Any] = {}
    parents: dict[str, tuple[str, tuple[float, float, float]]] = {}
    with Reader(bag) as reader:
        for conn in reader.connections:
            # The bag carries its message definitions (tf2_msgs is not in the store).
            typestore.register(get_types_from_msg(conn.msgdef.data, conn.msgtype))
        for topic in ("/scan", "/odom", "/tf_static"):
            conns = [c for c in reader.connections if c.topic == topic]
            for conn, _t, raw in reader.messages(connections=conns):
                msg = typestore.deserialize_ros1(raw, conn.msgtype)
                first.setdefault(topic, msg)
                if topic != "/tf_static":
                    break
                for tf in msg.transforms:
                    move, turn = tf.transform.translation, tf.transform.rotation
                    yaw = 2.0 * math.atan2(turn.z, turn.w)  # planar: rotation about z only
                    parents[tf.child_frame_id] = (tf.header.frame_id, (move.x, move.y, yaw))
    missing = [topic for topic in ("/scan", "/odom") if topic not in first]
    if missing:
        raise ValueError(f"{bag}: no {' or '.join(missing)} message to name the frames")
    base, frame = first["/odom"].child_frame_id, first["/scan"].header.frame_id
    mount = np.zeros(3)
    while frame != base:
        if frame not in parents:
            raise ValueError(
                f"{bag}: /tf_static does not join the scan frame {frame!r} to the base "
                f"{base!r} (the odometry's child frame), so the laser's mount is unknown"
            )
        frame, link = parents.pop(frame)  # popped: a cycle ends at the error above
        mount = compose(np.array(link), mount)
    return mount


def interpolate_odometry(odometry: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """Odometry ``[x, y, theta]`` at ``stamps``; theta is unwrapped so it never jumps by 2π.

    Stamps outside the odometry span take the nearest end value.
    """
    t = odometry[:, 0]
    theta = np.unwrap(odometry[:, 3])
    out = np.empty((len(stamps), 3))
    out[:, 0] = np.interp(stamps, t, odometry[:, 1])
    out[:, 1] = np.interp(stamps, t, odometry[:, 2])
    out[:, 2] = np.angle(np.exp(1j * np.interp(stamps, t, theta)))
    return out


def load_laser_dataset(folder: Path) -> LaserDataset:
    """Read a laser log folder; raises ``ValueError`` naming the file for malformed input."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    laser_path = _single(folder, "*_laser.txt.gz", required=True)
    odom_path = _single(folder, "*_odom.txt", required=True)
    yaml_path = folder / "laser.yaml"
    if not yaml_path.is_file():
        raise ValueError(f"{folder}: missing laser.yaml")
    assert laser_path is not None and odom_path is not None
    geometry, beams, angle_file, stated_mount = _load_geometry(yaml_path)

    scans = _load_table(laser_path, 2, "laser scan")
    if scans.shape[1] != beams + 1:
        raise ValueError(
            f"{laser_path}: rows have {scans.shape[1] - 1} ranges, laser.yaml says {beams} beams"
        )
    stamps = scans[:, 0].copy()
    if np.any(np.diff(stamps) <= 0):
        row = int(np.argmax(np.diff(stamps) <= 0)) + 2
        raise ValueError(f"{laser_path}: timestamps not strictly increasing at data row {row}")
    ranges = scans[:, 1:].astype(np.float32)
    if np.any(ranges < 0):
        raise ValueError(f"{laser_path}: negative range")
    if angle_file is None:
        angle_min = np.full(len(stamps), geometry.angle_min)
    else:
        angle_min = _load_angle_mins(folder / angle_file, stamps)

    odometry = _load_table(odom_path, 6, "odometry", may_be_empty=True)[:, :6]
    if np.any(np.diff(odometry[:, 0]) < 0):
        raise ValueError(f"{odom_path}: timestamps not sorted")

    relations = None
    rel_path = _single(folder, "*.relations", required=False)
    if rel_path is not None:
        rel = _load_table(rel_path, 8, "relation")
        relations = rel[:, [0, 1, 2, 3, 7]].copy()

    return LaserDataset(
        name=folder.name,
        stamps=stamps,
        ranges=ranges,
        odom_at_scans=(
            interpolate_odometry(odometry, stamps)
            if len(odometry)
            else np.full((len(stamps), 3), np.nan)
        ),
        odometry=odometry,
        geometry=geometry,
        angle_min=angle_min,
        relations=relations,
        laser_mount=_load_laser_mount(folder, stated_mount),
    )


def _scan_indices(stamps: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of the scan at each query stamp, or -1 when none lies within tolerance."""
    idx = np.clip(np.searchsorted(stamps, query), 1, len(stamps) - 1)
    left = idx - 1
    nearest = np.where(np.abs(stamps[left] - query) <= np.abs(stamps[idx] - query), left, idx)
    return np.where(np.abs(stamps[nearest] - query) <= _STAMP_TOLERANCE_S, nearest, -1)


def relation_errors(
    stamps: np.ndarray, poses: np.ndarray, relations: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-relation Freiburg errors (Kümmerle et al. 2009) of ``poses`` (one per scan stamp).

    For each relation, the error is ``δ_true⁻¹ ⊕ δ_est`` between the estimated and the true pose
    of scan 2 in scan 1. Returns (|translation| in m, |rotation| in degrees), one per relation.
    Relations whose stamps match no scan raise ``ValueError``: silently dropping them would
    flatter the score.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    if poses.shape != (len(stamps), 3):
        raise ValueError(f"poses must have shape ({len(stamps)}, 3), got {poses.shape}")
    i1 = _scan_indices(stamps, relations[:, 0])
    i2 = _scan_indices(stamps, relations[:, 1])
    bad = (i1 < 0) | (i2 < 0)
    if np.any(bad):
        raise ValueError(f"{int(bad.sum())} relation stamps match no scan stamp")
    est = between(poses[i1], poses[i2])
    # The norm of the translational part of δ_true⁻¹ ⊕ δ_est equals |t_est − t_true|.
    trans = np.hypot(est[:, 0] - relations[:, 2], est[:, 1] - relations[:, 3])
    rot = np.abs(wrap(est[:, 2] - relations[:, 4]))
    return trans, np.degrees(rot)


def score_relations(
    stamps: np.ndarray, poses: np.ndarray, relations: np.ndarray
) -> tuple[float, float]:
    """Freiburg benchmark error: mean translation (m) and rotation (deg) over the relations."""
    trans, rot = relation_errors(stamps, poses, relations)
    return float(trans.mean()), float(rot.mean())


def score_run(results: Sequence[Mapping[str, Any]], dataset_dir: Path) -> dict[str, float | int]:
    """Score the poses a SLAM task returned *during* a run (quality in the loop).

    ``results`` are the task's result dicts of one run, in sample order, as it returned them;
    samples that were dropped have no result. The poses scored are those the robot had online:
    each result's ``pose`` as returned at that moment (later loop-closure corrections do not
    reach back into it), for every result that carries one, i.e. scans that were processed and
    scans shed while standing still (their pose is odometry composed onto the last estimate).
    A relation counts when both its scans have such a pose. With no such relation the errors
    are NaN and ``relations`` is 0. Raises ``ValueError`` when the folder has no relations or
    two results carry the same ``t_log``.
    """
    folder = Path(dataset_dir)
    rel_path = _single(folder, "*.relations", required=True)
    assert rel_path is not None
    relations = _load_table(rel_path, 8, "relation")[:, [0, 1, 2, 3, 7]]
    posed = [r for r in results if r.get("pose") is not None and r.get("t_log") is not None]
    if not posed:
        return {"slam_trans_error_m": math.nan, "slam_rot_error_deg": math.nan, "relations": 0}
    stamps = np.array([float(r["t_log"]) for r in posed])
    poses = np.array([[float(v) for v in r["pose"]] for r in posed])
    order = np.argsort(stamps, kind="stable")
    stamps, poses = stamps[order], poses[order]
    if np.any(np.diff(stamps) <= 0):
        raise ValueError("results repeat a t_log: give the results of one run, once each")
    if len(stamps) < 2:
        return {"slam_trans_error_m": math.nan, "slam_rot_error_deg": math.nan, "relations": 0}
    both = (_scan_indices(stamps, relations[:, 0]) >= 0) & (
        _scan_indices(stamps, relations[:, 1]) >= 0
    )
    if not both.any():
        return {"slam_trans_error_m": math.nan, "slam_rot_error_deg": math.nan, "relations": 0}
    trans, rot = score_relations(stamps, poses, relations[both])
    return {"slam_trans_error_m": trans, "slam_rot_error_deg": rot, "relations": int(both.sum())}


def _odometry_meta(pose: np.ndarray) -> list[float] | None:
    """A scan sample's ``odom``: the pose, or None where the log has no odometry."""
    return [float(v) for v in pose] if np.all(np.isfinite(pose)) else None


def scan_sample(
    dataset: LaserDataset, k: int, *, sample_id: int | None = None, t_sensor: float | None = None
) -> Sample:
    """Scan ``k`` of the log as the runtime sends it to a SLAM task (one definition, used by
    the host's replay and by the evaluator)."""
    geo = dataset.geometry
    return Sample(
        id=k if sample_id is None else sample_id,
        t_sensor=time.monotonic() if t_sensor is None else t_sensor,
        kind="scan",
        meta={
            "angle_min": float(dataset.angle_min[k]),
            "angle_increment": geo.angle_increment,
            "max_range": geo.max_valid_range,
            "odom": _odometry_meta(dataset.odom_at_scans[k]),
            "laser_mount": [float(v) for v in dataset.laser_mount],
            "t_log": float(dataset.stamps[k]),
            "beams": int(dataset.ranges.shape[1]),
        },
        payload=np.ascontiguousarray(dataset.ranges[k], dtype="<f4").tobytes(),
    )
