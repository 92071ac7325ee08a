"""The road-sign folders of the catalogue: GTSRB test crops, street photos, the Haar cascade
and the TFLite classifier, with the class-name tables derived for them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ctxrobot.data.spec import Dataset, Derivation, Download, Inputs, Output, Source, constant

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
        constant(
            "signnames.csv",
            "9338a797ff8a8d9692f1600a7eb28a38f418198200fda669a57da36960eaf51c",
            signnames_csv(),
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
        constant(
            "labels.csv",
            "7fc65d1c536e8ff6a347c07b35b9837428ebdfde70354b6a080964256b392734",
            tflite_labels_csv(),
        ),
    ),
)

SIGNS_DATASETS = (GTSRB_TEST_SUBSET, ROAD_SIGN_SUBSET, CASCADES, CLASSIFIER_TFLITE)
