"""`ctxrobot data fetch`: rebuild the shared data folder from its public originals.

Every file in the data folder either is a verbatim copy of a file in a public GitHub
repository (pinned to the commit its folder's MANIFEST.md names) or is derived from such
files by a fixed rule that MANIFEST.md describes. This module holds that catalogue, downloads
the originals from raw.githubusercontent.com (or a mirror of it), checks every sha256 the
manifests give, derives the files our readers use, and writes a `SHA256SUMS` per folder.

Guarantees that matter to users:

- **Verified**: a download whose sha256 differs from the manifest is an error naming the
  file, the expected and the actual hash; it is never written. Where a manifest gives only
  the sha256 of its folder's `SHA256SUMS` listing (GTSRB images, road-sign photos), those
  files are written as they arrive and the listing is checked once the folder is complete;
  on a mismatch the folder gets no `SHA256SUMS` and the next fetch downloads them again.
- **Atomic**: every file is written to a temp file in its folder and renamed into place, so
  an interrupted or failed fetch never leaves a half-written file under the final name.
- **Idempotent**: files already present with the right hash are neither downloaded nor
  rewritten, so a second fetch does no I/O beyond hashing.

Derivations are byte-exact with the shared folder: the same header lines and number
formats, and for gzip the same level (9), mtime (0) and stored name as Python's `gzip`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import gzip
import hashlib
import http.client
import io
import math
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctxtask.datasets import data_dir

RAW_GITHUB = "https://raw.githubusercontent.com"
DEFAULT_TIMEOUT_S = 60.0
# The largest original is 3.9 MB (intel.orig.bag); the limit only stops a wrong URL or a
# misconfigured mirror from filling the disk.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# GTSRB and the road-sign subset are ~450 small files; a few connections in parallel hide
# the round-trip time without hammering the server.
_WORKERS = 8
_CHUNK = 1 << 16
GROUPS = ("slam", "signs", "speech")
SUMS_NAME = "SHA256SUMS"


class FetchError(Exception):
    """A problem that stops the whole fetch: no network, a disk error, or bad arguments."""


# -- catalogue types --------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One file in a public GitHub repository at a pinned commit."""

    repo: str  # owner/name
    commit: str  # 40-hex snapshot commit from the MANIFEST
    path: str  # path inside the repository

    def url(self, base: str = RAW_GITHUB) -> str:
        return f"{base}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class Download:
    """An original to download; `name` is its path inside the dataset folder."""

    name: str
    source: Source
    sha256: str | None  # None where the MANIFEST only gives the hash of the folder's listing
    keep: bool = True  # False: only an input of a derivation (goforward.raw), not kept


@dataclass(frozen=True)
class Output:
    """A derived file and the sha256 its MANIFEST gives (None: not in any MANIFEST)."""

    name: str
    sha256: str | None
    # For .gz outputs: the sha256 of the uncompressed text. Another zlib build (zlib-ng on
    # some distributions) may deflate differently; the content is still what we promise.
    text_sha256: str | None = None
    listed: bool = True  # False: ctxrobot's own reader config, not part of the MANIFEST


Inputs = Mapping[str, Path]


@dataclass(frozen=True)
class Derivation:
    """Files made from downloaded inputs (or from constants when `inputs` is empty)."""

    inputs: tuple[str, ...]  # Download names
    outputs: tuple[Output, ...]
    make: Callable[[Inputs], dict[str, bytes]]


@dataclass(frozen=True)
class Dataset:
    """One folder of the data root and everything needed to rebuild it."""

    folder: str  # e.g. "slam/intel"
    downloads: tuple[Download, ...]
    derivations: tuple[Derivation, ...] = ()
    # Downloads chosen from the content of an earlier download (GTSRB images from the CSV).
    expand: Callable[[Path], tuple[Download, ...]] | None = None
    listing_sha256: str | None = None  # sha256 of the folder's SHA256SUMS, from the MANIFEST
    dot_paths: bool = False  # SHA256SUMS names files "./sub/x" (as `find . | sha256sum`)

    @property
    def group(self) -> str:
        return self.folder.split("/", 1)[0]


# -- derivations: SLAM ------------------------------------------------------------------------
_LASER_COLUMNS = (
    "# columns: timestamp_s range_0_m ... range_{last}_m   "
    "(beam 0 = rightmost, -90 deg; counter-clockwise)"
)
_ODOM_COLUMNS = "# columns: timestamp_s x_m y_m theta_rad tv_m_per_s rv_rad_per_s"


@dataclass(frozen=True)
class BagLogs:
    """The /scan and /odom topics of a laser bag, as the text files our reader loads."""

    stamps: list[float]  # scan header stamps, s
    laser_text: bytes
    odom_text: bytes


def _gzip(name: str, data: bytes) -> bytes:
    """Deterministic gzip: level 9, mtime 0, stored name `name` (what the shared files use)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def bag_to_text(bag: Path, name: str) -> BagLogs:
    """Convert a ROS 1 laser bag to `<name>_laser.txt` and `<name>_odom.txt` content.

    Stamps, ranges and odometry are copied unchanged (ranges at CARMEN's 2 decimals); the
    heading is theta = 2·atan2(qz, qw), exact for the planar quaternions the converter wrote.
    """
    try:
        from rosbags.rosbag1 import Reader
        from rosbags.typesys import Stores, get_typestore
    except ImportError as exc:
        raise ImportError(
            "reading the ROS bags needs the `rosbags` package: pip install rosbags "
            "(or pip install 'ctxrobot[data]')"
        ) from exc
    typestore = get_typestore(Stores.ROS1_NOETIC)
    scans: list[str] = []
    odom: list[str] = []
    stamps: list[float] = []
    beams = 0
    with Reader(bag) as reader:
        conns = [c for c in reader.connections if c.topic in ("/scan", "/odom")]
        for conn, _t, raw in reader.messages(connections=conns):
            msg = typestore.deserialize_ros1(raw, conn.msgtype)
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            if conn.topic == "/scan":
                ranges = msg.ranges.tolist()
                beams = len(ranges)
                stamps.append(stamp)
                scans.append(f"{stamp:.6f} " + " ".join(f"{r:.2f}" for r in ranges))
            else:
                pose, twist = msg.pose.pose, msg.twist.twist
                theta = 2.0 * math.atan2(pose.orientation.z, pose.orientation.w)
                values = (pose.position.x, pose.position.y, theta, twist.linear.x, twist.angular.z)
                odom.append(f"{stamp:.6f} " + " ".join(f"{v:.6f}" for v in values))
    if not scans or not odom:
        raise ValueError(f"{bag.name}: no /scan or no /odom messages")
    laser_head = [
        f"# {name}: {len(scans)} laser scans, {beams} ranges each, "
        f"derived from {bag.name} topic /scan",
        _LASER_COLUMNS.format(last=beams - 1),
    ]
    odom_head = [
        f"# {name}: {len(odom)} wheel-odometry poses, derived from {bag.name} topic /odom "
        "(frame odom -> base_link)",
        _ODOM_COLUMNS,
    ]
    return BagLogs(
        stamps=stamps,
        laser_text="\n".join([*laser_head, *scans, ""]).encode(),
        odom_text="\n".join([*odom_head, *odom, ""]).encode(),
    )


# The corrected log's FLASER stamps are logger times relative to the start of the log; this
# offset (from the intel MANIFEST) puts them on the scan-stamp clock.
_INTEL_GFS_OFFSET_S = 976052857.337038


def gfs_reference_poses(corrected_log_gz: bytes, scan_stamps: list[float]) -> bytes:
    """`intel_gfs_reference_poses.txt`: each corrected FLASER pose matched to its scan stamp."""
    import numpy as np

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
    body = [" ".join(f"{v:.6f}" for v in row) for row in rows]
    return "\n".join([*head, *body, ""]).encode()


def laser_yaml(*, no_return_m: float, scan_rate_hz: float) -> bytes:
    """ctxrobot's `laser.yaml` for a 180-beam CARMEN log (read by ctxtask.datasets.laser)."""
    return (
        "# Geometry of the 2D laser scans in this folder's *_laser.txt.gz (beam 0 is the "
        "rightmost beam;\n"
        "# bearings grow counter-clockwise). A range at or above no_return_m means the beam "
        "saw nothing.\n"
        "beams: 180\n"
        "angle_min_deg: -90.0\n"
        "angle_increment_deg: 1.0\n"
        f"no_return_m: {no_return_m}\n"
        f"scan_rate_hz: {scan_rate_hz}\n"
    ).encode()


_RICOSLAM = ("INESCTEC/ricoslam", "52bfaa91c8e5e56f119265d409b1692ca29d48d2")
_RICOSLAM_DIR = "inesctec_mrdt_slam_2d_datasets"


def _freiburg_log(
    name: str,
    *,
    relations_sha: str,
    bag_sha: str,
    laser: Output,
    odom: Output,
    no_return_m: float,
    scan_rate_hz: float,
    extra_downloads: tuple[Download, ...] = (),
    extra_outputs: tuple[Output, ...] = (),
    extra_make: Callable[[Inputs, BagLogs], dict[str, bytes]] | None = None,
) -> Dataset:
    """A Freiburg benchmark log as ricoslam ships it: `.relations` + ROS bag → text logs."""
    repo, commit = _RICOSLAM
    bag = f"{name}.orig.bag"

    def make(inputs: Inputs) -> dict[str, bytes]:
        logs = bag_to_text(inputs[bag], name)
        out = {
            laser.name: _gzip(f"{name}_laser.txt", logs.laser_text),
            odom.name: logs.odom_text,
        }
        if extra_make is not None:
            out.update(extra_make(inputs, logs))
        return out

    return Dataset(
        folder=f"slam/{name}",
        downloads=(
            Download(
                f"{name}.relations",
                Source(repo, commit, f"{_RICOSLAM_DIR}/data/{name}.relations"),
                relations_sha,
            ),
            Download(bag, Source(repo, commit, f"{_RICOSLAM_DIR}/bag/{bag}"), bag_sha),
            *extra_downloads,
        ),
        derivations=(
            Derivation(
                inputs=(bag, *(d.name for d in extra_downloads)),
                outputs=(laser, odom, *extra_outputs),
                make=make,
            ),
            Derivation(
                inputs=(),
                outputs=(Output("laser.yaml", None, listed=False),),
                make=lambda _inputs: {
                    "laser.yaml": laser_yaml(no_return_m=no_return_m, scan_rate_hz=scan_rate_hz)
                },
            ),
        ),
    )


def _intel_gfs(inputs: Inputs, logs: BagLogs) -> dict[str, bytes]:
    corrected = inputs["intel-corrected.log.gz"].read_bytes()
    return {"intel_gfs_reference_poses.txt": gfs_reference_poses(corrected, logs.stamps)}


INTEL = _freiburg_log(
    "intel",
    relations_sha="330378f153eeae652d6756c1746f335801f66c3e097d90611548e6c4f593c359",
    bag_sha="b37cdd3988b49893edb7afe353d55739327a6e68196f257e62e7fb287860fb5d",
    laser=Output(
        "intel_laser.txt.gz",
        "b4d858bb6571cc6f768a93ac4b514be47f7e2a17390ef3fe8b720899b123de59",
        text_sha256="1ea84c37cfb1e100f5348379eed7a2b18c1846eb5c9787a070f9285f3cfcfe0b",
    ),
    odom=Output(
        "intel_odom.txt", "a07fc2bd4522939d979875080ea697b05a70073d6662230f001699a13db56e04"
    ),
    # Ranges of 81.83 m are the log's "no return" code; 81 m sits safely below it.
    no_return_m=81.0,
    scan_rate_hz=5.1,  # 13631 scans in 2691.3 s
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
    extra_outputs=(
        Output(
            "intel_gfs_reference_poses.txt",
            "517b9915a52b32b9b3429fe5f7a4a0be77cb243a0c72d03a17043c8f1051c1df",
        ),
    ),
    extra_make=_intel_gfs,
)

ACES = _freiburg_log(
    "aces",
    relations_sha="11a15800a751b6f9413078a021d49c7cda85a768c2a465433b4fae7ef57b03d5",
    bag_sha="f94635f90d6f91e06a557bfe7d544cdd560067128b2b7825dcbc645f941247bd",
    laser=Output(
        "aces_laser.txt.gz",
        "0526ab6ee6d6fe3609cac188a9e00aec9d3d67c59cd6fc11601250212b895a4b",
        text_sha256="97a0d678c077903894f2711b6cec5c1f56b5c5fbf6413a200141d5187f3f867b",
    ),
    odom=Output(
        "aces_odom.txt", "bbee8f0a9875268bf52193469d3c2f1bbad1ac029668e0f6bccaa51c442e5758"
    ),
    # Ranges of 50.00 m are this log's "no return" code (the bag's range_max).
    no_return_m=49.9,
    scan_rate_hz=5.4,  # 7374 scans in 1365.5 s
)

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


# -- derivations: signs -----------------------------------------------------------------------
# The standard GTSRB class names (class ids 0–42); the MANIFEST says signnames.csv was
# written for the folder, so it has no upstream file to download.
GTSRB_CLASS_NAMES: tuple[str, ...] = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)
GTSRB_STOP_CLASS = 14


def signnames_csv() -> bytes:
    lines = ["ClassId,SignName", *(f"{i},{n}" for i, n in enumerate(GTSRB_CLASS_NAMES))]
    return ("\n".join(lines) + "\n").encode()


def tflite_labels_csv() -> bytes:
    """Model output index → GTSRB class: Keras sorted the class folders as strings."""
    buf = io.StringIO()
    buf.write("output_index,gtsrb_class_id,sign_name\n")
    # Names are quoted (some contain commas in other GTSRB name lists); numbers are not.
    writer = csv.writer(buf, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    class_ids = sorted(range(len(GTSRB_CLASS_NAMES)), key=str)
    for index, class_id in enumerate(class_ids):
        writer.writerow([index, class_id, GTSRB_CLASS_NAMES[class_id]])
    return buf.getvalue().encode()


def gtsrb_subset_rows(gt_final_test: bytes) -> tuple[bytes, list[bytes]]:
    """Header and chosen rows of GT-final_test.csv, unchanged (`;`-separated, CRLF).

    The subset is the first 7 test images of every class in filename order, and the first 30
    of class 14 (Stop): 43×7 − 7 + 30 = 324.
    """
    lines = gt_final_test.splitlines(keepends=True)
    if not lines or not lines[0].startswith(b"Filename;"):
        raise ValueError("GT-final_test.csv: missing the Filename;…;ClassId header")
    rows = sorted(lines[1:], key=lambda row: row.split(b";", 1)[0])
    taken: dict[int, int] = {}
    chosen: list[bytes] = []
    for row in rows:
        class_id = int(row.rstrip(b"\r\n").rsplit(b";", 1)[1])
        want = 30 if class_id == GTSRB_STOP_CLASS else 7
        if taken.get(class_id, 0) < want:
            taken[class_id] = taken.get(class_id, 0) + 1
            chosen.append(row)
    return lines[0], chosen


_GTSRB = ("hergerr/traffic-sign-recognition", "80c6270c952cb66ec6eda521911d5cd992788333")
_GTSRB_DIR = "GTSRB/Final_Test"


def _gtsrb_images(folder: Path) -> tuple[Download, ...]:
    _header, rows = gtsrb_subset_rows((folder / "GT-final_test.csv").read_bytes())
    names = [row.split(b";", 1)[0].decode("ascii") for row in rows]
    return tuple(
        Download(f"Images/{n}", Source(*_GTSRB, f"{_GTSRB_DIR}/Images/{n}"), None) for n in names
    )


def _gtsrb_subset_csv(inputs: Inputs) -> dict[str, bytes]:
    header, rows = gtsrb_subset_rows(inputs["GT-final_test.csv"].read_bytes())
    return {"GT-subset.csv": header + b"".join(rows)}


GTSRB_TEST_SUBSET = Dataset(
    folder="signs/gtsrb-test-subset",
    downloads=(
        Download(
            "GT-final_test.csv",
            Source(*_GTSRB, f"{_GTSRB_DIR}/GT-final_test.csv"),
            "58a660fab5465cce66d7334eb9422ae09ed16186ad4500766b59b5a077a1c12f",
        ),
    ),
    expand=_gtsrb_images,
    derivations=(
        Derivation(
            inputs=("GT-final_test.csv",),
            outputs=(
                Output(
                    "GT-subset.csv",
                    "2ede4974d03a2dfe6199a60db1c89068b8a7c2b03309f191dd6d08a53b66a61b",
                ),
            ),
            make=_gtsrb_subset_csv,
        ),
        Derivation(
            inputs=(),
            outputs=(
                Output(
                    "signnames.csv",
                    "9338a797ff8a8d9692f1600a7eb28a38f418198200fda669a57da36960eaf51c",
                ),
            ),
            make=lambda _inputs: {"signnames.csv": signnames_csv()},
        ),
    ),
    listing_sha256="f83f4d70ab551f3207cab875f1ec2e8a9f8f9f4dc5c8d6f186dff78c54624856",
    dot_paths=True,
)

# Stop-sign positives, then negatives (speed limit, traffic light, crosswalk; no stop sign).
ROAD_SIGN_IDS: tuple[int, ...] = (
    22,
    *range(52, 81),
    *range(0, 10),
    *range(100, 110),
    *range(122, 132),
)
_ROAD = (
    "MuratOzc/traffic-sign-recognition-using-deep-learning",
    "e680f0da76e08b166607d01f18db7d1687f1c7bb",
)
ROAD_SIGN_SUBSET = Dataset(
    folder="signs/road-sign-detection-subset",
    downloads=tuple(
        Download(f"{sub}/road{i}.{ext}", Source(*_ROAD, f"{sub}/road{i}.{ext}"), None)
        for i in ROAD_SIGN_IDS
        for sub, ext in (("images", "png"), ("annotations", "xml"))
    ),
    listing_sha256="7e8845be7f01f49d1fc1a79831b5fd1c6e7cdee6b2f38d1736d9cdef45992cac",
    dot_paths=True,
)

CASCADES = Dataset(
    folder="signs/cascades",
    downloads=(
        Download(
            "stopsign_classifier.xml",
            Source(
                "markgaynor/stopsigns",
                "919b0b0ecb766f17970adafc9019d467a0a30e30",
                "stopsign_classifier.xml",
            ),
            "4800fcac1b898af004bb2c3ea5e276baf1a999f5ff34aac3fd1e9ed3a9169d62",
        ),
    ),
)

CLASSIFIER_TFLITE = Dataset(
    folder="signs/classifier-tflite",
    downloads=(
        Download(
            "traffic_sign_model.tflite",
            Source(
                "nihal1521/Traffic-Sign-Recognization-Using-Raspberry-pi",
                "ef3b76fc908be44f990e0fca25166731c7f2c0db",
                "traffic_sign_model.tflite",
            ),
            "05a25360d7ad8f86467b16dfbffa4839adc69cc301bdfc82d96f5ab304cd34da",
        ),
    ),
    derivations=(
        Derivation(
            inputs=(),
            outputs=(
                Output(
                    "labels.csv",
                    "7fc65d1c536e8ff6a347c07b35b9837428ebdfde70354b6a080964256b392734",
                ),
            ),
            make=lambda _inputs: {"labels.csv": tflite_labels_csv()},
        ),
    ),
)


# -- derivations: speech ----------------------------------------------------------------------
def wav_from_raw(raw: bytes, *, rate: int = 16000, channels: int = 1, bits: int = 16) -> bytes:
    """A canonical 44-byte PCM WAV header in front of the unchanged samples."""
    if len(raw) % (channels * bits // 8):
        raise ValueError(f"raw audio of {len(raw)} bytes is not whole {bits}-bit frames")
    block = channels * bits // 8
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(raw),
        b"WAVE",
        b"fmt ",
        16,  # PCM fmt chunk size
        1,  # PCM
        channels,
        rate,
        rate * block,
        block,
        bits,
        b"data",
        len(raw),
    )
    return header + raw


_PS = ("cmusphinx/pocketsphinx", "511126b492dcb267cf30d49d631946d7b61a9530")
_LIBRIVOX = "sense_and_sensibility_01_austen_64kb"

# (file in audio/, upstream path under test/data/, sha256, reference transcript)
SPEECH_CLIPS: tuple[tuple[str, str, str, str], ...] = (
    (
        "ps_cards_001.wav",
        "cards/001.wav",
        "899951e768666f27c8f8b1d4090b96fe7909cae9cec01bec0a5d5d1b8a8d566e",
        "ten of clubs",
    ),
    (
        "ps_cards_002.wav",
        "cards/002.wav",
        "a3f9eae6fdb69a1231989e39a14d62388a6f52fb59666c76d95005318fadafec",
        "four queen of clubs",
    ),
    (
        "ps_cards_003.wav",
        "cards/003.wav",
        "00d283e46bc257ae479e4aa86593cadb541656eba1d19fc8abeece37f6a5a18b",
        "seven of clubs",
    ),
    (
        "ps_cards_004.wav",
        "cards/004.wav",
        "4c44a8177f5b128b99f078cdeb918119933155574231f1833e8840d1af09c521",
        "five five",
    ),
    (
        "ps_cards_005.wav",
        "cards/005.wav",
        "090f18f5f76cf8b2b43cd9e6b07823f4685a4742d9a36cd98b174a6586c18cf9",
        "eight of spades four of clubs seven of hearts",
    ),
    (
        f"ps_librivox_{_LIBRIVOX}-0870.wav",
        f"librivox/{_LIBRIVOX}-0870.wav",
        "b0557cf95c974d930577e58e46b7f068c432a6e3afcc286563d88922b2a5315c",
        "and mister john dashwood had then leisure to consider how much there might be "
        "prudently in his power to do for them",
    ),
    (
        f"ps_librivox_{_LIBRIVOX}-0880.wav",
        f"librivox/{_LIBRIVOX}-0880.wav",
        "fbec491ef00ee734a67f0ee318e98c51c157b479e1629ff4f4426861ecac0414",
        "he was not an ill disposed young man",
    ),
    (
        f"ps_librivox_{_LIBRIVOX}-0890.wav",
        f"librivox/{_LIBRIVOX}-0890.wav",
        "5793ffbdee55fb8bfd284943a6866864c832d9d4accf2661cabd39915c84ee10",
        "unless to be rather cold hearted and rather selfish is to be ill disposed",
    ),
    (
        f"ps_librivox_{_LIBRIVOX}-0920.wav",
        f"librivox/{_LIBRIVOX}-0920.wav",
        "40882414ef4cc51f3ff7a63bad0c8c87e7f595ffeb8209fbf756c8ebc5c28a59",
        "had he married a more a amiable woman he might have been made still more "
        "respectable than he was",
    ),
    (
        f"ps_librivox_{_LIBRIVOX}-0930.wav",
        f"librivox/{_LIBRIVOX}-0930.wav",
        "954adbf0b56ac8a148cbe77b39ca18d76b5f2a1e1f405565bd786ce3e68a68b7",
        "he might even have been made amiable himself",
    ),
)
GOFORWARD_TRANSCRIPT = "go forward ten meters"


def transcripts_tsv() -> bytes:
    rows = [(f"audio/{name}", text) for name, _path, _sha, text in SPEECH_CLIPS]
    # goforward sits after the LibriVox clips in the shared file (it was added last).
    rows.append(("audio/ps_goforward.wav", GOFORWARD_TRANSCRIPT))
    lines = ["filename\ttext", *(f"{f}\t{t}" for f, t in rows)]
    return ("\n".join(lines) + "\n").encode()


SPEECH = Dataset(
    folder="speech",
    downloads=(
        *(
            Download(f"audio/{name}", Source(*_PS, f"test/data/{path}"), sha)
            for name, path, sha, _text in SPEECH_CLIPS
        ),
        Download(
            "goforward.raw",
            Source(*_PS, "test/data/goforward.raw"),
            "f15c60ec54059d8b66e410d0064945a0b0a04ea56e1ddca1958e493c0cf70e71",
            keep=False,
        ),
    ),
    derivations=(
        Derivation(
            inputs=("goforward.raw",),
            outputs=(
                Output(
                    "audio/ps_goforward.wav",
                    "97ec638609b9c7eeb616764b4e5713d7ed2d0a8e1a2f8246631d9074d47aaf11",
                ),
            ),
            make=lambda inputs: {
                "audio/ps_goforward.wav": wav_from_raw(inputs["goforward.raw"].read_bytes())
            },
        ),
        Derivation(
            inputs=(),
            # The speech MANIFEST's transcripts.tsv sha256 (5c0e9b41…) belongs to a version
            # of the file that its own table does not reproduce (the shared copy does not
            # match it either), so this output is checked against the shared copy in the
            # tests instead.
            outputs=(Output("transcripts.tsv", None),),
            make=lambda _inputs: {"transcripts.tsv": transcripts_tsv()},
        ),
    ),
    dot_paths=True,
)

CATALOGUE: tuple[Dataset, ...] = (
    INTEL,
    ACES,
    BREEZYSLAM_MINES,
    GTSRB_TEST_SUBSET,
    ROAD_SIGN_SUBSET,
    CASCADES,
    CLASSIFIER_TFLITE,
    SPEECH,
)


def select(datasets: Iterable[str] | None) -> list[Dataset]:
    """Catalogue entries for group names (`slam`) or folders (`slam/intel`); None = all."""
    if datasets is None:
        return list(CATALOGUE)
    chosen: list[Dataset] = []
    for item in datasets:
        key = item.strip().strip("/")
        matches = [d for d in CATALOGUE if key in (d.group, d.folder)]
        if not matches:
            choices = ", ".join([*GROUPS, *(d.folder for d in CATALOGUE)])
            raise FetchError(f"unknown dataset {item!r}; choose from: {choices}")
        chosen.extend(d for d in matches if d not in chosen)
    return chosen


def base_url(mirror: str | None) -> str:
    """The URL prefix replacing https://raw.githubusercontent.com (same path layout)."""
    if mirror is None:
        return RAW_GITHUB
    if not mirror.startswith(("http://", "https://")):
        raise FetchError(f"mirror {mirror!r} must be an http:// or https:// URL")
    return mirror.rstrip("/")


# -- fetching ---------------------------------------------------------------------------------
Action = Literal["downloaded", "present", "derived", "unchanged", "failed"]


@dataclass(frozen=True)
class FileResult:
    """What happened to one file; `path` is relative to the data root."""

    path: str
    action: Action
    detail: str = ""


@dataclass
class FetchReport:
    dest: Path
    results: list[FileResult] = field(default_factory=list)

    @property
    def errors(self) -> list[FileResult]:
        return [r for r in self.results if r.action == "failed"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, action: Action) -> int:
        return sum(1 for r in self.results if r.action == action)

    def summary(self) -> str:
        up_to_date = self.count("present") + self.count("unchanged")
        return (
            f"{self.count('downloaded')} downloaded, {self.count('derived')} derived, "
            f"{up_to_date} already up to date, {len(self.errors)} failed"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


def _disk_error(path: Path, exc: OSError) -> FetchError:
    hint = " (disk full?)" if exc.errno == 28 else ""
    return FetchError(f"cannot write {path}: {exc.strerror or exc}{hint}")


def _temp_beside(target: Path) -> tuple[int, Path]:
    """A temp file in the target's folder, so the final rename is atomic."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    return fd, Path(tmp)


def write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(target, exc) from exc


def _no_network(url: str, exc: BaseException) -> FetchError:
    reason = getattr(exc, "reason", exc)
    return FetchError(
        f"cannot reach {url}: {reason}.\n"
        "No network? Point --mirror at a mirror of raw.githubusercontent.com, or copy the shared "
        "data folder to this machine and set CTXROBOT_DATA to it."
    )


@dataclass(frozen=True)
class _Fetcher:
    """One fetch run's settings (shared by the worker threads, hence immutable)."""

    base: str
    force: bool
    timeout: float
    max_bytes: int

    def download(self, d: Download, target: Path, expected: str | None, rel: str) -> FileResult:
        """Fetch one original into `target`; per-file problems become a failed result."""
        if not self.force and expected is not None and _hash_or_none(target) == expected:
            return FileResult(rel, "present")
        url = d.source.url(self.base)
        request = urllib.request.Request(url, headers={"User-Agent": "ctxrobot-data-fetch"})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            return FileResult(rel, "failed", f"HTTP {exc.code} {exc.reason} from {url}")
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise _no_network(url, exc) from exc
        with response:
            length = response.headers.get("Content-Length")
            if length is not None and int(length) > self.max_bytes:
                return FileResult(
                    rel, "failed", f"{url} is {length} bytes, over the {self.max_bytes} limit"
                )
            fd, tmp = _temp_beside(target)
            try:
                digest, size = hashlib.sha256(), 0
                with os.fdopen(fd, "wb") as out:
                    while True:
                        try:
                            chunk = response.read(_CHUNK)
                        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                            # The server answered, so this is one broken transfer, not a
                            # missing network; a re-run resumes with the files still to do.
                            detail = f"download from {url} broke off: {exc!r}; run again"
                            return FileResult(rel, "failed", detail)
                        if not chunk:
                            break
                        size += len(chunk)
                        if size > self.max_bytes:
                            return FileResult(
                                rel, "failed", f"{url} is over the {self.max_bytes}-byte limit"
                            )
                        digest.update(chunk)
                        try:
                            out.write(chunk)
                        except OSError as exc:
                            raise _disk_error(target, exc) from exc
                actual = digest.hexdigest()
                if expected is not None and actual != expected:
                    return FileResult(
                        rel,
                        "failed",
                        f"sha256 mismatch for {url}: expected {expected}, got {actual}; "
                        "not written",
                    )
                try:
                    tmp.chmod(0o644)
                    os.replace(tmp, target)
                except OSError as exc:
                    raise _disk_error(target, exc) from exc
                return FileResult(rel, "downloaded", "" if expected else "no per-file sha256")
            finally:
                tmp.unlink(missing_ok=True)


def _trusted_sums(folder: Path, ds: Dataset) -> dict[str, str]:
    """Hashes from an existing SHA256SUMS whose own sha256 matches the MANIFEST.

    This is what lets a second fetch skip files the MANIFEST has no per-file hash for.
    """
    sums = folder / SUMS_NAME
    if ds.listing_sha256 is None or _hash_or_none(sums) != ds.listing_sha256:
        return {}
    trusted: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        sha, _sep, name = line.partition("  ")
        trusted[name.removeprefix("./")] = sha
    return trusted


def _output_ok(path: Path, out: Output) -> bool:
    actual = _hash_or_none(path)
    if actual is None or out.sha256 is None:
        return False
    if actual == out.sha256:
        return True
    if out.text_sha256 is not None:
        try:
            text = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error):
            return False
        return hashlib.sha256(text).hexdigest() == out.text_sha256
    return False


class _DatasetRun:
    """Fetch, derive and list one dataset folder."""

    def __init__(
        self,
        ds: Dataset,
        root: Path,
        fetcher: _Fetcher,
        pool: concurrent.futures.Executor,
        report: FetchReport,
        progress: Callable[[FileResult], None] | None,
    ) -> None:
        self.ds, self.fetcher, self.pool = ds, fetcher, pool
        self.report, self.progress = report, progress
        self.folder = root / ds.folder
        self.trusted = _trusted_sums(self.folder, ds)
        self.failed: set[str] = set()
        self.listed: list[str] = []

    def _record(self, name: str, result: FileResult) -> None:
        self.report.results.append(result)
        if result.action == "failed":
            self.failed.add(name)
        if self.progress is not None:
            self.progress(result)

    def _rel(self, name: str) -> str:
        return f"{self.ds.folder}/{name}"

    def download_all(self, downloads: Iterable[Download], into: Path) -> None:
        futures = {
            self.pool.submit(
                self.fetcher.download,
                d,
                into / d.name,
                d.sha256 or (self.trusted.get(d.name) if d.keep else None),
                self._rel(d.name),
            ): d
            for d in downloads
        }
        try:
            for future in concurrent.futures.as_completed(futures):
                self._record(futures[future].name, future.result())
        finally:
            for future in futures:
                future.cancel()

    def derive(self, der: Derivation, work: Path) -> None:
        names = [o.name for o in der.outputs]
        # Outputs with inputs are skipped on their hashes alone, so their inputs (e.g. the
        # not-kept goforward.raw) need not be fetched again; constant outputs are cheap to
        # remake and compare.
        needs_inputs = bool(der.inputs) and not self.fetcher.force
        if needs_inputs and all(_output_ok(self.folder / o.name, o) for o in der.outputs):
            for name in names:
                self._record(name, FileResult(self._rel(name), "present"))
            return
        inputs_by_name = {d.name: d for d in self.ds.downloads}
        missing = [n for n in der.inputs if n in self.failed]
        if missing:
            for name in names:
                detail = f"not derived: input {', '.join(missing)} failed"
                self._record(name, FileResult(self._rel(name), "failed", detail))
            return
        # Inputs that are not kept (goforward.raw) are only downloaded when needed.
        scratch = [inputs_by_name[n] for n in der.inputs if not inputs_by_name[n].keep]
        self.download_all(scratch, work)
        bad = [d.name for d in scratch if d.name in self.failed]
        if bad:
            for name in names:
                detail = f"not derived: input {', '.join(bad)} failed"
                self._record(name, FileResult(self._rel(name), "failed", detail))
            return
        paths = {n: (self.folder if inputs_by_name[n].keep else work) / n for n in der.inputs}
        try:
            made = der.make(paths)
        except (ImportError, ValueError) as exc:
            for name in names:
                self._record(name, FileResult(self._rel(name), "failed", str(exc)))
            return
        for out in der.outputs:
            self._write_output(out, made[out.name])

    def _write_output(self, out: Output, data: bytes) -> None:
        target = self.folder / out.name
        rel = self._rel(out.name)
        actual = hashlib.sha256(data).hexdigest()
        content_ok = out.text_sha256 is not None and (
            hashlib.sha256(gzip.decompress(data)).hexdigest() == out.text_sha256
        )
        if out.sha256 is not None and actual != out.sha256 and not content_ok:
            detail = f"derived sha256 mismatch: expected {out.sha256}, got {actual}; not written"
            self._record(out.name, FileResult(rel, "failed", detail))
            return
        if not self.fetcher.force and _hash_or_none(target) == actual:
            self._record(out.name, FileResult(rel, "unchanged"))
            return
        write_atomic(target, data)
        self._record(out.name, FileResult(rel, "derived"))

    def write_listing(self) -> None:
        """SHA256SUMS over the MANIFEST's files, once every one of them is in place."""
        rel = self._rel(SUMS_NAME)
        if any(n in self.failed for n in self.listed):
            detail = "not written: the folder is incomplete (see the failures above)"
            self._record(SUMS_NAME, FileResult(rel, "failed", detail))
            return
        prefix = "./" if self.ds.dot_paths else ""
        lines = sorted(f"{prefix}{n}" for n in self.listed)
        hashes = {f"{prefix}{n}": sha256_file(self.folder / n) for n in self.listed}
        data = "".join(f"{hashes[p]}  {p}\n" for p in lines).encode()
        actual = hashlib.sha256(data).hexdigest()
        expected = self.ds.listing_sha256
        if expected is not None and actual != expected:
            detail = (
                f"listing sha256 mismatch: expected {expected}, got {actual}; one of the files "
                "the MANIFEST gives no per-file hash for differs from the original; not written"
            )
            self._record(SUMS_NAME, FileResult(rel, "failed", detail))
            return
        target = self.folder / SUMS_NAME
        if not self.fetcher.force and _hash_or_none(target) == actual:
            self._record(SUMS_NAME, FileResult(rel, "unchanged"))
            return
        write_atomic(target, data)
        self._record(SUMS_NAME, FileResult(rel, "derived"))

    def run(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(self.folder, exc) from exc
        kept = [d for d in self.ds.downloads if d.keep]
        self.download_all(kept, self.folder)
        self.listed = [d.name for d in kept]
        if self.ds.expand is not None:
            if self.failed:
                # The expansion reads a failed download; the derivations that need the same
                # file report it too, and the listing stays unwritten.
                detail = f"not fetched: {', '.join(sorted(self.failed))} failed"
                self._record("*", FileResult(self._rel("*"), "failed", detail))
            else:
                more = self.ds.expand(self.folder)
                self.download_all(more, self.folder)
                self.listed += [d.name for d in more]
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.folder) as work:
            for der in self.ds.derivations:
                self.derive(der, Path(work))
                self.listed += [o.name for o in der.outputs if o.listed]
        self.write_listing()


def fetch(
    dest: Path,
    *,
    datasets: list[str] | None = None,
    mirror: str | None = None,
    force: bool = False,
    progress: Callable[[FileResult], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> FetchReport:
    """Download, verify and derive `datasets` (groups or folders; None = all) under `dest`.

    Per-file problems (HTTP errors, hash mismatches) are collected in the report and the
    other files still proceed; a missing network or a disk error raises `FetchError`.
    `mirror` replaces the https://raw.githubusercontent.com prefix of every URL.
    """
    base = base_url(mirror)
    chosen = select(datasets)
    fetcher = _Fetcher(base=base, force=force, timeout=timeout, max_bytes=max_bytes)
    report = FetchReport(dest=Path(dest))
    with concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for ds in chosen:
            _DatasetRun(ds, Path(dest), fetcher, pool, report, progress).run()
    return report


# -- command line -----------------------------------------------------------------------------
def cmd_data_fetch(args: argparse.Namespace) -> int:
    """`ctxrobot data fetch`: 0 when every file is in place, 1 on failures, 2 on bad input."""
    dest = Path(args.dest) if args.dest else data_dir()
    only = [s for s in args.only.split(",") if s.strip()] if args.only else None

    def show(result: FileResult) -> None:
        if result.action in ("downloaded", "derived"):
            print(f"{result.action:>10}  {result.path}", flush=True)

    try:
        select(only)
        base_url(args.mirror)
    except FetchError as exc:
        print(f"ctxrobot data fetch: {exc}", file=sys.stderr)
        return 2
    try:
        report = fetch(dest, datasets=only, mirror=args.mirror, force=args.force, progress=show)
    except FetchError as exc:
        print(f"ctxrobot data fetch: {exc}", file=sys.stderr)
        return 1
    for err in report.errors:
        print(f"FAILED  {err.path}: {err.detail}", file=sys.stderr)
    print(f"{dest}: {report.summary()}")
    return 0 if report.ok else 1


_EPILOG = """\
datasets (--only takes group names or folders, comma-separated):
  slam    slam/intel, slam/aces (ROS bags -> *_laser.txt.gz, *_odom.txt, laser.yaml;
          needs `pip install rosbags`), slam/breezyslam-mines
  signs   signs/gtsrb-test-subset, signs/road-sign-detection-subset, signs/cascades,
          signs/classifier-tflite
  speech  speech (11 clips + transcripts.tsv)

Every original comes from a pinned commit on raw.githubusercontent.com and is checked
against the sha256 in its folder's MANIFEST.md; files already present with the right
hash are skipped, so re-running is cheap. Without internet, copy a shared data folder
instead and set CTXROBOT_DATA to it.

The Vosk speech model is not fetched (about 40 MB): download vosk-model-small-en-us-0.15
from https://alphacephei.com/vosk/models and unpack it to
<dest>/speech/model/vosk-model-small-en-us-0.15/.
"""


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data fetch` to the ctxrobot command line; returns the `data` parser."""
    data = subparsers.add_parser(
        "data",
        help="download and verify the public datasets ctxrobot replays",
        description="Manage the data folder ctxrobot replays and evaluates on.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "fetch",
        help="download the public originals, verify them and derive the reader files",
        description=(
            "Download the public originals of the datasets, verify their sha256, derive the\n"
            "files ctxrobot's readers use and write SHA256SUMS per folder: the same layout as\n"
            "the shared data folder. Exit 0 when every file is in place, 1 when some failed,\n"
            "2 on bad arguments."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dest",
        metavar="DIR",
        help="data root to fill (default: where ctxrobot reads data: $CTXROBOT_DATA, else "
        "../shared/data beside the repository)",
    )
    p.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated groups or folders, e.g. slam,signs or speech,slam/intel "
        "(default: all)",
    )
    p.add_argument(
        "--mirror",
        metavar="URL",
        help=f"use URL instead of {RAW_GITHUB} (same /OWNER/REPO/COMMIT/PATH layout)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="download and derive again even when files are present with the right hash",
    )
    p.set_defaults(func=cmd_data_fetch)
    return data
