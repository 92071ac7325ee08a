"""The SLAM folders of the catalogue: Freiburg benchmark logs (ROS bags → text logs) and
BreezySLAM's recordings. Each derivation follows its folder's MANIFEST.md byte for byte.
"""

from __future__ import annotations

import gzip
import math

import numpy as np

from ctxrobot.data.bags import (
    LaserBag,
    finite_difference_odometry,
    laser_text,
    odom_text,
    read_laser_bag,
    rebuild_killian_stamps,
    relation_stamps,
    text_file,
)
from ctxrobot.data.spec import (
    Dataset,
    Derivation,
    Download,
    Inputs,
    Make,
    Output,
    Source,
    constant,
    deterministic_gzip,
)

_RICOSLAM = ("INESCTEC/ricoslam", "52bfaa91c8e5e56f119265d409b1692ca29d48d2")
_RICOSLAM_DIR = "inesctec_mrdt_slam_2d_datasets"


def laser_yaml(
    *,
    no_return_m: float,
    scan_rate_hz: float,
    notes: tuple[str, ...] = (),
    angle_min_file: str | None = None,
) -> bytes:
    """ctxrobot's `laser.yaml` for a 180-beam CARMEN log (read by ctxtask.datasets.laser)."""
    lines = [
        "# Geometry of the 2D laser scans in this folder's *_laser.txt.gz (beam 0 is the "
        "rightmost beam;",
        "# bearings grow counter-clockwise). A range at or above no_return_m means the beam "
        "saw nothing.",
        *(f"# {note}" for note in notes),
        "beams: 180",
        "angle_min_deg: -90.0",
        "angle_increment_deg: 1.0",
        f"no_return_m: {no_return_m}",
        f"scan_rate_hz: {scan_rate_hz}",
    ]
    if angle_min_file is not None:
        lines.append(f"angle_min_file: {angle_min_file}")
    return text_file(lines, [])


def _freiburg_log(
    name: str,
    *,
    bag: str,
    bag_sha: str,
    relations_sha: str,
    outputs: tuple[Output, ...],
    make: Make,
    yaml: bytes,
    bag_and: tuple[str, ...] = (),
    extra_downloads: tuple[Download, ...] = (),
) -> Dataset:
    """A Freiburg benchmark log as ricoslam ships it: `.relations` + a ROS bag → text logs.

    `make` reads the bag (and the inputs named in `bag_and`) and returns `outputs`.
    """
    repo, commit = _RICOSLAM
    relations = f"{name}.relations"
    return Dataset(
        folder=f"slam/{name}",
        downloads=(
            Download(
                relations,
                Source(repo, commit, f"{_RICOSLAM_DIR}/data/{relations}"),
                relations_sha,
            ),
            Download(bag, Source(repo, commit, f"{_RICOSLAM_DIR}/bag/{bag}"), bag_sha),
            *extra_downloads,
        ),
        derivations=(
            Derivation(inputs=(bag, *bag_and), outputs=outputs, make=make),
            constant("laser.yaml", None, yaml, listed=False),
        ),
    )


def plain_logs(name: str, bag: LaserBag) -> dict[str, bytes]:
    """Laser and odometry text exactly as in the bag (intel, aces)."""
    laser = laser_text(name, bag.name, bag.scan_stamps, bag.ranges)
    return {
        f"{name}_laser.txt.gz": deterministic_gzip(f"{name}_laser.txt", laser),
        f"{name}_odom.txt": odom_text(name, bag.name, bag.odom_stamps, bag.odom),
    }


# -- intel ------------------------------------------------------------------------------------
# The corrected log's FLASER stamps are logger times relative to the start of the log; this
# offset (from the intel MANIFEST) puts them on the scan-stamp clock.
_INTEL_GFS_OFFSET_S = 976052857.337038


def gfs_reference_poses(corrected_log_gz: bytes, scan_stamps: list[float]) -> bytes:
    """`intel_gfs_reference_poses.txt`: each corrected FLASER pose matched to its scan stamp."""
    stamps = np.asarray(scan_stamps)
    rows: list[tuple[float, float, float, float, float]] = []
    for line in gzip.decompress(corrected_log_gz).decode("ascii").splitlines():
        fields = line.split()
        if not fields or fields[0] != "FLASER":
            continue
        beams = int(fields[1])
        x, y, theta = (float(v) for v in fields[2 + beams : 5 + beams])
        logger_t = float(fields[-1])
        t = logger_t + _INTEL_GFS_OFFSET_S
        i = int(np.searchsorted(stamps, t))
        near = min(
            (j for j in (i - 1, i) if 0 <= j < len(stamps)), key=lambda j: abs(stamps[j] - t)
        )
        rows.append((float(stamps[near]), logger_t, x, y, theta))
    if not rows:
        raise ValueError("intel-corrected.log.gz: no FLASER lines")
    gaps = np.abs(np.array([r[0] - (r[1] + _INTEL_GFS_OFFSET_S) for r in rows]))
    head = [
        f"# Intel Research Lab: {len(rows)} SLAM-corrected (GMapping/RBPF, Stachniss) reference "
        "poses, derived from intel-corrected.log.gz FLASER lines",
        "# columns: scan_timestamp_s (stamp of the matched scan in intel_laser.txt.gz / "
        "intel.relations time base) corrected_log_timestamp_s x_m y_m theta_rad",
        f"# matching: corrected_log_timestamp + {_INTEL_GFS_OFFSET_S:.6f} s -> nearest scan stamp "
        f"(|dt| median {float(np.median(gaps)):.4f} s, max {float(gaps.max()):.4f} s)",
    ]
    return text_file(head, [" ".join(f"{v:.6f}" for v in row) for row in rows])


def _intel_files(inputs: Inputs) -> dict[str, bytes]:
    bag = read_laser_bag(inputs["intel.orig.bag"])
    corrected = inputs["intel-corrected.log.gz"].read_bytes()
    return {
        **plain_logs("intel", bag),
        "intel_gfs_reference_poses.txt": gfs_reference_poses(corrected, bag.scan_stamps),
    }


INTEL = _freiburg_log(
    "intel",
    bag="intel.orig.bag",
    bag_sha="b37cdd3988b49893edb7afe353d55739327a6e68196f257e62e7fb287860fb5d",
    relations_sha="330378f153eeae652d6756c1746f335801f66c3e097d90611548e6c4f593c359",
    extra_downloads=(
        Download(
            "intel-corrected.log.gz",
            Source(
                "acschaefer/ple",
                "cfcb5a7f12a793b616357381a688cfcc26eed347",
                "data/carmen/intel-corrected.log.gz",
            ),
            "71bef16e9926506cf7417995ef35ace09dbd5de067fd042a3aab85188b5480dc",
        ),
    ),
    bag_and=("intel-corrected.log.gz",),
    outputs=(
        Output(
            "intel_laser.txt.gz",
            "b4d858bb6571cc6f768a93ac4b514be47f7e2a17390ef3fe8b720899b123de59",
            text_sha256="1ea84c37cfb1e100f5348379eed7a2b18c1846eb5c9787a070f9285f3cfcfe0b",
        ),
        Output(
            "intel_odom.txt", "a07fc2bd4522939d979875080ea697b05a70073d6662230f001699a13db56e04"
        ),
        Output(
            "intel_gfs_reference_poses.txt",
            "517b9915a52b32b9b3429fe5f7a4a0be77cb243a0c72d03a17043c8f1051c1df",
        ),
    ),
    make=_intel_files,
    # Ranges of 81.83 m are the log's "no return" code; 81 m sits safely below it.
    yaml=laser_yaml(no_return_m=81.0, scan_rate_hz=5.1),  # 13631 scans in 2691.3 s
)

# -- aces -------------------------------------------------------------------------------------
ACES = _freiburg_log(
    "aces",
    bag="aces.orig.bag",
    bag_sha="f94635f90d6f91e06a557bfe7d544cdd560067128b2b7825dcbc645f941247bd",
    relations_sha="11a15800a751b6f9413078a021d49c7cda85a768c2a465433b4fae7ef57b03d5",
    outputs=(
        Output(
            "aces_laser.txt.gz",
            "0526ab6ee6d6fe3609cac188a9e00aec9d3d67c59cd6fc11601250212b895a4b",
            text_sha256="97a0d678c077903894f2711b6cec5c1f56b5c5fbf6413a200141d5187f3f867b",
        ),
        Output("aces_odom.txt", "bbee8f0a9875268bf52193469d3c2f1bbad1ac029668e0f6bccaa51c442e5758"),
    ),
    make=lambda inputs: plain_logs("aces", read_laser_bag(inputs["aces.orig.bag"])),
    # Ranges of 50.00 m are this log's "no return" code (the bag's range_max).
    yaml=laser_yaml(no_return_m=49.9, scan_rate_hz=5.4),  # 7374 scans in 1365.5 s
)


# -- fr-clinic --------------------------------------------------------------------------------
FR_CLINIC_BEAMS = 180


def fr_clinic_logs(bag: LaserBag) -> dict[str, bytes]:
    """Text logs of fr-clinic: 180 ranges per scan, and each scan's start bearing.

    The scanner's interleaved 0.25° mode starts scans at −90°, −89.75°, −89.5° or −89.25°;
    those at −90° have 181 beams (−90°…+90°) and lose the last so every line has 180.
    """
    ranges = []
    for stamp, scan, angle in zip(bag.scan_stamps, bag.ranges, bag.angle_min, strict=True):
        if len(scan) == FR_CLINIC_BEAMS + 1:
            if round(math.degrees(angle), 2) != -90.0:
                raise ValueError(
                    f"{bag.name}: the 181-beam scan at {stamp:.6f} starts at "
                    f"{math.degrees(angle):.2f} deg, not -90; the bag is not the MANIFEST's"
                )
            scan = scan[:FR_CLINIC_BEAMS]
        ranges.append(scan)
    long_scans = sum(len(scan) == FR_CLINIC_BEAMS + 1 for scan in bag.ranges)
    laser = laser_text(
        "fr-clinic",
        bag.name,
        bag.scan_stamps,
        ranges,
        note=f" (last beam of the {long_scans} 181-beam scans dropped)",
        beam0="at the angle_min_deg of fr-clinic_laser_angle_min.txt",
    )
    angles_head = [
        f"# fr-clinic: bearing of beam 0 for each of the {len(ranges)} scans of "
        f"fr-clinic_laser.txt.gz (LaserScan angle_min of {bag.name} /scan, rounded to 0.01 deg)",
        "# columns: timestamp_s angle_min_deg   (step between beams: angle_increment_deg of "
        "laser.yaml)",
    ]
    angles = [
        f"{t:.6f} {math.degrees(a):.2f}"
        for t, a in zip(bag.scan_stamps, bag.angle_min, strict=True)
    ]
    return {
        "fr-clinic_laser.txt.gz": deterministic_gzip("fr-clinic_laser.txt", laser),
        "fr-clinic_laser_angle_min.txt": text_file(angles_head, angles),
        "fr-clinic_odom.txt": odom_text("fr-clinic", bag.name, bag.odom_stamps, bag.odom),
    }


FR_CLINIC = _freiburg_log(
    "fr-clinic",
    bag="fr-clinic_robotlaser.orig.bag",
    bag_sha="0b5c3f5b24d277e2a0e38b385f6c09c6cf12e490f6ae7990978f0743bf1aebaf",
    relations_sha="583b7bba8c1a3ef1f7ad41221c151534333e71b52f5fc267d5e343c79355300c",
    outputs=(
        Output(
            "fr-clinic_laser.txt.gz",
            "f6735a66dcde2cd288f332c4179a828958e37b50f1991d0878db76af3e167906",
            text_sha256="f3c98b10aa49375df44b64bd80f9a9ce19a0163ce442c8076f224271a2d66733",
        ),
        Output(
            "fr-clinic_laser_angle_min.txt",
            "fec07fecc5a8e0463030e22dd797b90aa171106c5649c7ba1696e7274a21089d",
        ),
        Output(
            "fr-clinic_odom.txt",
            "408acf5d5f177a4c39e901ba0d640e0f1ccfaa8ad2ca0c8d89d68930b1cc9f6e",
        ),
    ),
    make=lambda inputs: fr_clinic_logs(read_laser_bag(inputs["fr-clinic_robotlaser.orig.bag"])),
    yaml=laser_yaml(
        # 81.83 and 81.91 m are "no return"/error codes; real ranges reach 81.82 m.
        no_return_m=81.825,
        scan_rate_hz=1.4,  # 6917 scans in 4820.2 s
        notes=(
            "fr-clinic: each scan starts at one of four bearings (-90, -89.75, -89.5, -89.25 "
            "deg; interleaved",
            "0.25 deg mode). angle_min_file gives each scan's start bearing; angle_min_deg is "
            "only the nominal one.",
            "The laser sits 0.22 m ahead of base_link (odometry frame); see MANIFEST.md.",
        ),
        angle_min_file="fr-clinic_laser_angle_min.txt",
    ),
)


# -- mit-killian ------------------------------------------------------------------------------
def killian_logs(bag: LaserBag, relations_text: str) -> dict[str, bytes]:
    """Text logs of mit-killian with stamps rebuilt from the relations (bags.py says how) and
    tv/rv by finite differences (the bag's are 0)."""
    if len(bag.odom) != len(bag.ranges):
        raise ValueError(f"{bag.name}: {len(bag.ranges)} scans but {len(bag.odom)} poses")
    stamps = rebuild_killian_stamps(relation_stamps(relations_text), len(bag.ranges)).tolist()
    laser = laser_text(
        "mit-killian",
        bag.name,
        stamps,
        bag.ranges,
        note=" (timestamps rebuilt from mit-killian.relations, see MANIFEST.md)",
    )
    odom = odom_text(
        "mit-killian",
        bag.name,
        stamps,
        finite_difference_odometry(stamps, bag.odom),
        note="; FLASER odometry fields, tv/rv by finite differences; timestamps as "
        "mit-killian_laser.txt.gz",
    )
    return {
        "mit-killian_laser.txt.gz": deterministic_gzip("mit-killian_laser.txt", laser),
        "mit-killian_odom.txt": odom,
    }


MIT_KILLIAN = _freiburg_log(
    "mit-killian",
    bag="mit-killian.clf2bag.bag",
    bag_sha="03ed49fe8a7532440d2811bb9f1763684df0a043946c2e4cc8db7be30ee0f223",
    relations_sha="0b0f8dfc0746f9dee20b9d6d2a47a805674fd2f5be94f0ba11876bc6e97fab4b",
    bag_and=("mit-killian.relations",),
    outputs=(
        Output(
            "mit-killian_laser.txt.gz",
            "600eeb864f0b09a5a5861c66793e9ed04954364c5c0a72dc026117a398512366",
            text_sha256="fbc816e684e086805f12369ba720099993bad034d652efe1de3483df94e6d842",
        ),
        Output(
            "mit-killian_odom.txt",
            "f671654c7977a012840d81760f3265e3b3bb91a3215971a49cd5d3ed725f74b9",
        ),
    ),
    make=lambda inputs: killian_logs(
        read_laser_bag(inputs["mit-killian.clf2bag.bag"]),
        inputs["mit-killian.relations"].read_text(),
    ),
    # 51.05–51.22 m are "no return"; real ranges stop at 51.01 m.
    yaml=laser_yaml(no_return_m=51.03, scan_rate_hz=2.3),  # 17480 scans in 7676.6 s
)

# -- BreezySLAM -------------------------------------------------------------------------------
_BREEZY = ("simondlevy/BreezySLAM", "1170285cd42a88300eddd275fc3df36e642e3a2e")
BREEZYSLAM_MINES = Dataset(
    folder="slam/breezyslam-mines",
    downloads=(
        Download(
            "exp1.dat",
            Source(*_BREEZY, "examples/exp1.dat"),
            "310905b806c06781c053c492ed7c77ffbf3fc7a7e83231c723490b6f7a272190",
        ),
        Download(
            "exp2.dat",
            Source(*_BREEZY, "examples/exp2.dat"),
            "8fcb61ab87e09c821a51cb13ecfabad3a11e414e6d3890bf9ea594b70fe52569",
        ),
    ),
)

SLAM_DATASETS = (INTEL, ACES, FR_CLINIC, MIT_KILLIAN, BREEZYSLAM_MINES)
