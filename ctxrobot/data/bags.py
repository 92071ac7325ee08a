"""ROS 1 laser bags → the text logs our SLAM reader loads (`*_laser.txt.gz`, `*_odom.txt`).

The Freiburg benchmark logs reach us as bags built by INESCTEC/ricoslam from CARMEN logs.
They are read with `rosbags`. Number formats are those of the shared
files: stamps and odometry with 6 decimals, ranges with CARMEN's 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.rosbag1 import Reader
from rosbags.typesys import Stores, get_typestore

OdomRow = tuple[float, float, float, float, float]  # x_m y_m theta_rad tv_m_per_s rv_rad_per_s

LASER_COLUMNS = (
    "# columns: timestamp_s range_0_m ... range_{last}_m   "
    "(beam 0 = rightmost, {beam0}; counter-clockwise)"
)
ODOM_COLUMNS = "# columns: timestamp_s x_m y_m theta_rad tv_m_per_s rv_rad_per_s"


@dataclass(frozen=True)
class LaserBag:
    """The /scan and /odom topics of a bag, in bag order, values unchanged."""

    name: str  # the bag's file name, quoted in the text headers
    scan_stamps: list[float]  # header stamps, s
    ranges: list[np.ndarray]  # float32 ranges of each scan, m
    angle_min: list[float]  # bearing of beam 0 of each scan, rad
    odom_stamps: list[float]
    odom: list[OdomRow]


def read_laser_bag(bag: Path) -> LaserBag:
    """Read a bag's /scan and /odom; the heading is theta = 2·atan2(qz, qw), exact for the
    planar quaternions the converters wrote."""
    typestore = get_typestore(Stores.ROS1_NOETIC)
    logs = LaserBag(bag.name, [], [], [], [], [])
    with Reader(bag) as reader:
        conns = [c for c in reader.connections if c.topic in ("/scan", "/odom")]
        for conn, _t, raw in reader.messages(connections=conns):
            msg = typestore.deserialize_ros1(raw, conn.msgtype)
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            if conn.topic == "/scan":
                logs.scan_stamps.append(stamp)
                logs.ranges.append(msg.ranges)
                logs.angle_min.append(msg.angle_min)
            else:
                pose, twist = msg.pose.pose, msg.twist.twist
                theta = 2.0 * math.atan2(pose.orientation.z, pose.orientation.w)
                logs.odom_stamps.append(stamp)
                logs.odom.append(
                    (pose.position.x, pose.position.y, theta, twist.linear.x, twist.angular.z)
                )
    if not logs.scan_stamps or not logs.odom:
        raise ValueError(f"{bag.name}: no /scan or no /odom messages")
    return logs


def text_file(head: Sequence[str], body: Sequence[str]) -> bytes:
    return "\n".join([*head, *body, ""]).encode()


def laser_text(
    name: str,
    bag: str,
    stamps: Sequence[float],
    ranges: Sequence[np.ndarray],
    *,
    note: str = "",
    beam0: str = "-90 deg",
) -> bytes:
    """`<name>_laser.txt`: one `stamp r_0 … r_last` line per scan under two header lines."""
    beams = len(ranges[0])
    if any(len(r) != beams for r in ranges):
        raise ValueError(f"{bag}: scans of different lengths; the text log needs one")
    head = [
        f"# {name}: {len(ranges)} laser scans, {beams} ranges each, derived from {bag} topic "
        f"/scan{note}",
        LASER_COLUMNS.format(last=beams - 1, beam0=beam0),
    ]
    body = [
        f"{t:.6f} " + " ".join(f"{r:.2f}" for r in scan.tolist())
        for t, scan in zip(stamps, ranges, strict=True)
    ]
    return text_file(head, body)


def odom_text(
    name: str, bag: str, stamps: Sequence[float], rows: Sequence[OdomRow], *, note: str = ""
) -> bytes:
    """`<name>_odom.txt`: one `stamp x y theta tv rv` line per pose under two header lines."""
    head = [
        f"# {name}: {len(rows)} wheel-odometry poses, derived from {bag} topic /odom "
        f"(frame odom -> base_link{note})",
        ODOM_COLUMNS,
    ]
    body = [
        f"{t:.6f} " + " ".join(f"{v:.6f}" for v in row) for t, row in zip(stamps, rows, strict=True)
    ]
    return text_file(head, body)


# -- mit-killian: scan stamps rebuilt from the relations (its MANIFEST, "Timestamps") ----------
# The only bag of this log has synthetic stamps (1e9 s + 0.1 s × index), so the stamps come
# from the relations, whose timestamps are those of the original scans.
#
# Step 1: consecutive relation stamps are a whole number of scan periods of about 0.439 s
# apart; the MANIFEST measured |Δt/0.439 − k| ≤ 0.075 for every gap, so rounding is never in
# doubt (a tolerance of 0.1 still rejects the half-period ambiguity of a wrong period).
KILLIAN_NOMINAL_PERIOD_S = 0.439
KILLIAN_STEP_TOLERANCE = 0.1
# Step 2: the bag index of the first relation scan. It cannot be computed from the stamps:
# it was found by scan matching, placing scan i2 in scan i1's frame by each relation's pose
# and scoring shifts of ±6 scans. In 656 of the 725 relations with a clear winner (> 1 cm
# margin) the best index is 20, every 500 s stretch of the log agrees (so no scans are
# missing between relation stamps), and with i1 fixed 2497 of 2518 clear cases confirm i2.
# What can be checked here is that the relation scans then all land inside the bag.
KILLIAN_FIRST_RELATION_SCAN = 20
# Step 3: the log's stamps have millisecond precision.
KILLIAN_STAMP_DECIMALS = 3


def relation_stamps(relations_text: str) -> np.ndarray:
    """The distinct scan timestamps of a `.relations` file, sorted."""
    rows = [line.split() for line in relations_text.splitlines()]
    stamps = [float(f) for row in rows if row and not row[0].startswith("#") for f in row[:2]]
    if not stamps:
        raise ValueError("the relations file has no relations")
    return np.unique(np.asarray(stamps))


def rebuild_killian_stamps(relation_times: np.ndarray, scan_count: int) -> np.ndarray:
    """Stamps for the bag's `scan_count` scans from the distinct relation stamps.

    Relation scans keep their stamp exactly; the others are interpolated linearly in index
    and rounded to 1 ms; scans before the first and after the last relation scan are
    extrapolated with the mean period between them.
    """
    steps_exact = np.diff(relation_times) / KILLIAN_NOMINAL_PERIOD_S
    steps = np.round(steps_exact)
    worst = float(np.max(np.abs(steps_exact - steps), initial=0.0))
    if worst > KILLIAN_STEP_TOLERANCE or np.any(steps < 1):
        raise ValueError(
            f"mit-killian.relations: stamps are not whole scan periods of "
            f"{KILLIAN_NOMINAL_PERIOD_S} s apart (worst {worst:.3f} periods off)"
        )
    index = KILLIAN_FIRST_RELATION_SCAN + np.concatenate([[0], np.cumsum(steps)]).astype(int)
    if index[-1] >= scan_count:
        raise ValueError(
            f"mit-killian: the relations span scans {index[0]}..{index[-1]} but the bag has "
            f"{scan_count}; the bag or the relations are not the MANIFEST's"
        )
    all_index = np.arange(scan_count)
    stamps = np.interp(all_index, index, relation_times)
    period = (relation_times[-1] - relation_times[0]) / (index[-1] - index[0])
    before, after = all_index < index[0], all_index > index[-1]
    stamps[before] = relation_times[0] - (index[0] - all_index[before]) * period
    stamps[after] = relation_times[-1] + (all_index[after] - index[-1]) * period
    return np.round(stamps, KILLIAN_STAMP_DECIMALS)


def finite_difference_odometry(stamps: Sequence[float], rows: Sequence[OdomRow]) -> list[OdomRow]:
    """`rows` with tv/rv from consecutive poses: tv is the displacement along the mean heading
    over Δt, rv the wrapped heading change over Δt; the first row's are 0."""
    out: list[OdomRow] = []
    for i, (x, y, theta, _tv, _rv) in enumerate(rows):
        tv = rv = 0.0
        if i > 0:
            px, py, ptheta = rows[i - 1][:3]
            dt = stamps[i] - stamps[i - 1]
            turn = math.atan2(math.sin(theta - ptheta), math.cos(theta - ptheta))
            heading = ptheta + turn / 2
            along = (x - px) * math.cos(heading) + (y - py) * math.sin(heading)
            # + 0.0 turns the -0.0 of a robot standing still into 0.0 ("0.000000").
            tv, rv = along / dt + 0.0, turn / dt + 0.0
        out.append((x, y, theta, tv, rv))
    return out
