"""Road-sign task: dataset readers, the classifier against TFLite, and the accuracy targets.

The target tests run the real detector and classifier on the shared data in this process
(host venv); they skip when the data are absent. Timings are printed (`pytest -s`), not
asserted: the 2-core test machine is shared.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ctxtask import protocol
from ctxtask.datasets import signs as ds
from ctxtask.protocol import Sample
from signs import evaluate, stress, tune
from signs.classifier import STOP_CLASS_ID, ModelFileError
from signs.detector import DetectorParams, square_crop
from signs.detector import iou as iou_of
from signs.task import SignsTask, build_classifier, build_detector
from tests.conftest import REPO, require_data

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
VOC = """<annotation>
  <folder>images</folder><filename>{name}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><bndbox>
  <xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    cv2.setNumThreads(1)  # as in the task: timings below are per core


def _models() -> Path:
    return require_data("signs")


def _write_gt(folder: Path, name: str, rows: list[str]) -> Path:
    path = folder / name
    path.write_bytes(("\r\n".join([GT_HEADER, *rows]) + "\r\n").encode())
    return path


def _crop_folder(tmp_path: Path, names: list[str]) -> Path:
    (tmp_path / "Images").mkdir()
    for n in names:
        cv2.imwrite(str(tmp_path / "Images" / n), np.full((32, 32, 3), 128, np.uint8))
    return tmp_path


# --- classification reader -------------------------------------------------------------


def test_gt_csv_crlf_rows_and_absent_images_skipped(tmp_path: Path) -> None:
    folder = _crop_folder(tmp_path, ["00001.ppm", "00002.ppm"])
    _write_gt(
        folder,
        "GT-test.csv",
        [
            "00001.ppm;53;54;6;5;48;49;14",
            "00002.ppm;42;45;5;5;36;40;1",
            "00003.ppm;40;40;5;5;35;35;2",  # kept back: its image is absent
        ],
    )
    crops = ds.load_classification_set(folder)
    assert [(c.image_path.name, c.class_id) for c in crops] == [("00001.ppm", 14), ("00002.ppm", 1)]
    assert crops[0].roi == (6, 5, 48, 49) and (crops[0].width, crops[0].height) == (53, 54)


def test_gt_csv_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    folder = _crop_folder(tmp_path, ["00001.ppm"])
    _write_gt(folder, "GT-bad.csv", ["00001.ppm;53;54;6;5;48;49;14", "00002.ppm;53;54;6;5;14"])
    with pytest.raises(ValueError, match=r"GT-bad\.csv:3: expected 8"):
        ds.load_classification_set(folder)


@pytest.mark.parametrize(
    ("row", "message"),
    [("00001.ppm;53;54;6;5;48;49;x", "non-integer"), ("00001.ppm;53;54;6;5;48;49;43", "0..42")],
)
def test_gt_csv_bad_values(tmp_path: Path, row: str, message: str) -> None:
    folder = _crop_folder(tmp_path, ["00001.ppm"])
    _write_gt(folder, "GT-bad.csv", [row])
    with pytest.raises(ValueError, match=message):
        ds.load_classification_set(folder)


def test_gt_csv_wrong_header_and_unlabelled_image(tmp_path: Path) -> None:
    folder = _crop_folder(tmp_path, ["00001.ppm", "00009.ppm"])
    (folder / "GT-x.csv").write_text("Filename,ClassId\r\n00001.ppm,14\r\n")
    with pytest.raises(ValueError, match=r"GT-x\.csv: header must be"):
        ds.load_classification_set(folder)
    (folder / "GT-x.csv").unlink()
    _write_gt(folder, "GT-y.csv", ["00001.ppm;53;54;6;5;48;49;14"])
    with pytest.raises(ValueError, match=r"no row in any GT-\*\.csv, e\.g\. 00009\.ppm"):
        ds.load_classification_set(folder)


def test_gt_files_that_disagree_are_rejected(tmp_path: Path) -> None:
    folder = _crop_folder(tmp_path, ["00001.ppm"])
    _write_gt(folder, "GT-a.csv", ["00001.ppm;53;54;6;5;48;49;14"])
    _write_gt(folder, "GT-b.csv", ["00001.ppm;53;54;6;5;48;49;13"])
    with pytest.raises(ValueError, match="another GT file says 14"):
        ds.load_classification_set(folder)


# --- detection reader --------------------------------------------------------------------


def _detection_folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    return tmp_path


def test_voc_reader_and_16bit_rgba_png(tmp_path: Path) -> None:
    folder = _detection_folder(tmp_path)
    rgba = np.zeros((30, 40, 4), np.uint16)
    rgba[..., 2] = 65535  # pure red in BGRA order, 16-bit like the shared street photos
    rgba[..., 3] = 65535
    cv2.imwrite(str(folder / "images" / "road1.png"), rgba)
    objects = VOC_OBJECT.format(name="stop", x1=2, y1=3, x2=41, y2=20) + VOC_OBJECT.format(
        name="trafficlight", x1=1, y1=1, x2=5, y2=9
    )
    (folder / "annotations" / "road1.xml").write_text(
        VOC.format(name="road1.png", w=40, h=30, objects=objects)
    )
    [item] = ds.load_detection_set(folder)
    assert (item.width, item.height) == (40, 30)
    assert item.boxes_of("stop") == [ds.Box("stop", 2, 3, 40, 20)]  # x2 clamped to the width
    image = ds.read_image(item.image_path)
    assert image.dtype == np.uint8 and image.shape == (30, 40, 3)
    assert image[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><filename>road1.png", "not well-formed XML"),
        (VOC.format(name="road1.png", w=40, h=30, objects="<object><name>stop</name></object>"),
         "no <bndbox>"),
        (VOC.format(name="road1.png", w=40, h=30,
                    objects=VOC_OBJECT.format(name="stop", x1=9, y1=3, x2=9, y2=20)),
         "empty box"),
        (VOC.format(name="road1.png", w="forty", h=30, objects=""), "not a number"),
        (VOC.format(name="road7.png", w=40, h=30, objects=""), "does not exist"),
    ],
)  # fmt: skip
def test_voc_malformed_names_file_and_problem(tmp_path: Path, xml: str, message: str) -> None:
    folder = _detection_folder(tmp_path)
    cv2.imwrite(str(folder / "images" / "road1.png"), np.zeros((30, 40, 3), np.uint8))
    (folder / "annotations" / "road1.xml").write_text(xml)
    with pytest.raises(ValueError, match=message) as info:
        ds.load_detection_set(folder)
    assert "road1.xml" in str(info.value)


def test_letterbox_places_photo_and_maps_boxes() -> None:
    photo = np.zeros((300, 400, 3), np.uint8)
    photo[100:200, 50:150] = (0, 0, 255)
    frame, placement = ds.letterbox(photo)
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert placement.scale == pytest.approx(1.6) and (placement.dx, placement.dy) == (0, 0)
    x1, y1, x2, y2 = (round(v) for v in placement.to_frame((50, 100, 150, 200)))
    assert (frame[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] == (0, 0, 255)).all()
    assert not frame[y1 - 3, x1 - 3].any() and not frame[y2 + 3, x2 + 3].any()
    portrait, placement = ds.letterbox(np.full((400, 300, 3), 200, np.uint8))
    assert (placement.dx, placement.dy) == (140, 0) and not portrait[:, :140].any()


def test_read_image_error_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        ds.read_image(bad)


# --- models and task ---------------------------------------------------------------------


def test_missing_model_file_says_where_and_what_to_do(tmp_path: Path) -> None:
    task = SignsTask()
    with pytest.raises(ModelFileError, match=r"not found at .*labels\.csv.*CTXROBOT_DATA"):
        task.setup({"models": str(tmp_path)})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['min_sign'\]"):
        task.setup({"min_sign": 20})


def test_classifier_matches_tflite_reference() -> None:
    """OpenCV's TFLite import drops dense-layer biases; our numpy head must restore them."""
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    models = _models()
    model = models / "classifier-tflite" / "traffic_sign_model.tflite"
    classifier = build_classifier(models)
    crops = ds.load_classification_set(models / "gtsrb-test-subset")[:40]
    images = [ds.read_image(c.image_path) for c in crops]
    ours = classifier.probabilities(images, ("plain",))  # the model itself, no test-time views
    interp = interpreter_mod.Interpreter(model_path=str(model))
    interp.allocate_tensors()
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    reference = []
    for image in images:
        rgb = cv2.cvtColor(
            cv2.resize(image, (30, 30), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
        )
        interp.set_tensor(inp["index"], (rgb.astype(np.float32) / 255.0)[None])
        interp.invoke()
        reference.append(interp.get_tensor(out["index"])[0])
    np.testing.assert_allclose(ours, np.array(reference), atol=1e-4)


def test_gtsrb_accuracy_target() -> None:
    models = _models()
    folder = models / "gtsrb-test-subset"
    result = evaluate.evaluate_classification(build_classifier(models), [folder])
    print(f"\nGTSRB: {result}")
    assert result["accuracy"] >= 0.95
    assert result["stop_crops_correct"] == result["stop_crops"] > 0


def test_street_photo_stop_targets() -> None:
    models = _models()
    folder = models / "road-sign-detection-subset"
    result = evaluate.evaluate_detection(build_detector(models), [folder])
    print(
        f"\nstreet photos: precision {result['stop_precision']} recall {result['stop_recall']} "
        f"boxes TP/FP/FN {result['box_tp']}/{result['box_fp']}/{result['box_fn']}; "
        f"{result['ms_per_frame']:.1f} ms CPU ({result['wall_ms_per_frame']:.1f} ms wall) "
        f"per 640x480 frame; missed {result['missed']}, false {result['false_alarms']}"
    )
    assert result["stop_images"] > 0 and result["images"] > result["stop_images"]
    assert result["stop_precision"] >= 0.95
    assert result["stop_recall"] >= 0.95


def test_task_lifecycle_on_replayed_frames() -> None:
    models = _models()
    items = ds.load_detection_set(models / "road-sign-detection-subset")
    stop = next(i for i in items if i.boxes_of("stop"))
    other = next(i for i in items if not i.boxes_of("stop"))
    task = SignsTask()
    task.setup({})
    task.initialise()
    results = []
    for k, item in enumerate([stop, other]):
        frame = ds.camera_frame(item.image_path)
        # Built as the runner builds it: a read-only view onto the received payload.
        meta = {"shape": list(frame.shape), "name": item.image_path.name}
        sample = Sample(k, time.monotonic(), "frame", meta, frame.tobytes())
        results.append(task.update(sample))
    json.dumps(results)  # the runner sends results as JSON
    assert [r["name"] for r in results] == [stop.image_path.name, other.image_path.name]
    [found] = results[0]["detections"]
    assert found["class_id"] == STOP_CLASS_ID and found["name"] == "Stop"
    assert found["score"] >= 0.5 and len(found["box"]) == 4
    assert results[1]["detections"] == []
    summary = task.terminate()
    assert summary["frames"] == 2 and summary["frames_with_stop"] == 1
    print(f"\ntask summary: {summary}")
    with pytest.raises(ValueError, match="'frame' samples"):
        task.update(Sample(9, 0.0, "audio", {}, b"\0\0"))
    task.shutdown()


def test_evaluate_cli_json_and_bad_folder(tmp_path: Path) -> None:
    data = _models()
    env_path = str(REPO / "tasks")
    ok = subprocess.run(
        [sys.executable, "-m", "signs.evaluate", str(data / "gtsrb-test-subset"), "--json"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "CTXROBOT_DATA": str(data.parent)},
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads(ok.stdout.strip().splitlines()[-1])
    assert metrics["crops"] > 0 and metrics["accuracy"] >= 0.95
    low, high = metrics["accuracy_ci95"]
    assert low <= metrics["accuracy"] <= high < 1.0
    assert metrics["images"] is None and metrics["stop_recall"] is None
    bad = subprocess.run(
        [sys.executable, "-m", "signs.evaluate", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "CTXROBOT_DATA": str(data.parent)},
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "no dataset found" in bad.stderr and not bad.stdout


def test_container_entry_point_serves_a_frame_over_the_socket(tmp_path: Path) -> None:
    """`python -m signs` (the container command) speaks the wire protocol end to end."""
    data = _models()
    stop = next(
        i for i in ds.load_detection_set(data / "road-sign-detection-subset") if i.boxes_of("stop")
    )
    frame = ds.camera_frame(stop.image_path)
    path = tmp_path / "task.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(60)
        proc = subprocess.Popen(
            [sys.executable, "-m", "signs"],
            env={
                "PYTHONPATH": str(REPO / "tasks"),
                "CTXROBOT_DATA": str(data.parent),
                "CTXROBOT_SOCKET": str(path),
                "CTXROBOT_TASK_CONFIG": json.dumps({"min_score": 0.5}),
            },
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(60)
                hello, _ = protocol.recv(conn)
                assert hello["type"] == "hello" and hello["task"] == "signs"
                t_sensor = time.monotonic()
                meta = {"shape": list(frame.shape), "name": stop.image_path.name}
                protocol.send(conn, Sample(1, t_sensor, "frame", meta).header(), frame.tobytes())
                result, _ = protocol.recv(conn)
                protocol.send(conn, {"type": "end"})
                bye, _ = protocol.recv(conn)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert result["type"] == "result" and result["id"] == 1
    [found] = result["result"]["detections"]
    assert found["name"] == "Stop"
    print(f"\nover the socket: latency {1000 * (result['t_end'] - t_sensor):.1f} ms, {found}")
    assert bye["type"] == "bye" and bye["summary"]["frames_with_stop"] == 1


def _octagon_frame(legend: tuple[int, int, int] | None) -> np.ndarray:
    """A 640x480 grey frame with a red octagon (radius 60 px), optionally lettered."""
    frame = np.full((480, 640, 3), 110, np.uint8)
    angles = np.pi / 8 + np.arange(8) * np.pi / 4
    corners = np.stack([320 + 60 * np.cos(angles), 240 + 60 * np.sin(angles)], axis=1)
    cv2.fillPoly(frame, [corners.round().astype(np.int32)], (30, 30, 200))
    if legend is not None:
        cv2.putText(frame, "STOP", (276, 255), cv2.FONT_HERSHEY_SIMPLEX, 1.0, legend, 4)
    return frame


def test_red_octagon_counts_only_with_a_light_legend() -> None:
    detector = build_detector(_models())
    threshold = detector.params.min_legend_contrast
    face = (264, 184, 376, 296)
    regions = detector.red_regions(_octagon_frame((255, 255, 255)))
    assert any(iou_of(box, face) > 0.8 and legend >= threshold for box, legend in regions)
    # The same red octagon with a dark legend (a lamp, a dim orange sign) or none at all is
    # still a red region, but no octagon with a legend: only the cascade could confirm it.
    for legend_colour in ((20, 20, 20), None):
        regions = detector.red_regions(_octagon_frame(legend_colour))
        assert any(iou_of(box, face) > 0.8 for box, _ in regions)
        assert all(legend < threshold for _, legend in regions)


def test_square_crop_keeps_a_sign_cut_by_the_frame_edge_in_place() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, :50] = (0, 0, 200)
    crop = square_crop(frame, (-50, 100, 50, 200), margin=0.0)  # a 100-px sign, half outside
    assert crop.shape[:2] == (100, 100)
    # The missing half is the frame edge replicated, not the sign squeezed into the square.
    assert (crop == (0, 0, 200)).all()
    assert square_crop(frame, (300, 200, 340, 240), margin=0.5).shape[:2] == (80, 80)


def _stop_and_negative_photos() -> tuple[list[ds.AnnotatedImage], list[ds.AnnotatedImage]]:
    items = ds.load_detection_set(_models() / "road-sign-detection-subset")
    return [i for i in items if i.boxes_of("stop")], [i for i in items if not i.boxes_of("stop")]


def test_harder_variants_are_found_and_red_things_are_not() -> None:
    """The failure causes seen on unseen photos, made from the shared ones (signs.stress):
    the detector must find most far, cut and hidden signs, and raise no false alarm on
    traffic lights, speed limits and crosswalks at any size or in dim or orange light."""
    stops, negatives = _stop_and_negative_photos()
    detector = build_detector(_models())
    found: dict[str, list[bool]] = {}
    for v in stress.stop_variants(stops[::2], negatives):
        x1, y1, x2, y2 = v.stop_boxes[0]
        assert 0 <= x1 < x2 <= ds.FRAME_SIZE[0] and 0 <= y1 < y2 <= ds.FRAME_SIZE[1], v.kind
        hit = any(iou_of(d.box, v.stop_boxes[0]) > 0.3 for d in detector.detect(v.frame))
        found.setdefault(v.kind.rstrip("0123456789"), []).append(hit)
    rates = {kind: sum(hits) / len(hits) for kind, hits in found.items()}
    print(f"\nharder variants, fraction found: {rates}")
    assert min(rates["edge-left"], rates["edge-right"], rates["zoom-cut"]) >= 0.7
    assert rates["far"] >= 0.6 and rates["hidden-left"] >= 0.9 and rates["dim"] >= 0.9
    alarms = [
        (v.kind, v.source) for v in stress.negative_variants(negatives) if detector.detect(v.frame)
    ]
    assert alarms == []


def test_split_halves_are_stratified_and_seeded() -> None:
    items = [("stop", i) for i in range(11)] + [("other", i) for i in range(9)]
    a, b = tune.split_halves(items, lambda x: x[0], seed=3)
    assert sorted(a + b) == sorted(items) and abs(len(a) - len(b)) <= 1
    assert abs(sum(x[0] == "stop" for x in a) - sum(x[0] == "stop" for x in b)) <= 1
    assert (a, b) == tune.split_halves(items, lambda x: x[0], seed=3)
    assert (a, b) != tune.split_halves(items, lambda x: x[0], seed=4)


def test_decide_reproduces_detect_and_thresholds_bite() -> None:
    """Evidence gathered once under the loosest grid setting serves every setting."""
    stops, negatives = _stop_and_negative_photos()
    detector = build_detector(_models())
    loose = tune.loosest(detector.params)
    strict = DetectorParams(min_score=0.97, cascade_min_neighbors=5, confirm_min_neighbors=4)
    verdicts = []
    for item in stops[:4] + negatives[:4]:
        frame = ds.camera_frame(item.image_path)
        candidates = detector.candidates(frame, loose)
        assert detector.decide(candidates) == detector.detect(frame)
        verdicts.append(bool(detector.decide(candidates, strict)))
    assert not any(verdicts[4:]) and sum(verdicts[:4]) <= 4


def test_score_run_on_real_task_results(tmp_path: Path) -> None:
    """Results of the real task on replayed photos, scored per frame; shed ones skipped."""
    folder = _models() / "road-sign-detection-subset"
    stops, negatives = _stop_and_negative_photos()
    task = SignsTask()
    task.setup({})
    task.initialise()
    shown = [stops[0]] * 3 + [negatives[0]] * 2 + [stops[1]] + [negatives[1]]
    results = []
    for k, item in enumerate(shown):
        frame = ds.camera_frame(item.image_path)
        meta = {"shape": list(frame.shape), "name": item.image_path.name}
        results.append(task.update(Sample(k, time.monotonic(), "frame", meta, frame.tobytes())))
    results = json.loads(json.dumps(results))  # as they come back from the run database
    score = ds.score_run(results, folder)
    assert score == {"stop_recall": 1.0, "stop_precision": 1.0, "frames": 7, "stop_frames": 4}
    # A frame shown while the detector reported nothing on a Stop photo counts as a miss;
    # a shed result (not processed) is not scored at all; a dropped one is simply missing.
    missed = {"name": stops[0].image_path.name, "detections": []}
    score = ds.score_run([*results[1:], missed, {"shed": "rate"}], folder)
    assert score["frames"] == 7 and score["stop_recall"] == pytest.approx(3 / 4)
    alarm = {"name": negatives[0].image_path.name, "detections": results[0]["detections"]}
    assert ds.score_run([alarm], folder)["stop_precision"] == 0.0
    with pytest.raises(ValueError, match=r"'road9999\.png', which has no annotation"):
        ds.score_run([{"name": "road9999.png", "detections": []}], folder)
    with pytest.raises(ValueError, match="names no frame"):
        ds.score_run([{"detections": []}], folder)


def test_score_shown_scores_every_frame_with_what_the_robot_believed() -> None:
    """Every frame shown counts, shed ones with the task's last report: shedding costs the
    recall it loses, and a held detection outlives the photo it was made on."""
    folder = _models() / "road-sign-detection-subset"
    stops, negatives = _stop_and_negative_photos()
    stop, other = stops[0].image_path.name, negatives[0].image_path.name
    found = {"name": stop, "detections": [{"class_id": STOP_CLASS_ID}]}
    nothing = {"name": other, "detections": []}
    shown = [other, other, stop, stop, stop, other]
    every_frame = {0: nothing, 1: nothing, 2: found, 3: found, 4: found, 5: nothing}
    assert ds.score_shown(shown, every_frame, folder) == {
        "stop_recall": 1.0,
        "stop_precision": 1.0,
        "frames": 6,
        "stop_frames": 3,
        "processed": 6,
    }
    # At 1 Hz the detector sees frames 0 and 3 only: frame 2 is a miss (the robot still
    # believes the street is clear), frame 5 a false alarm (it still believes in the sign).
    shed = {0: nothing, 1: {"shed": "rate"}, 3: found}
    score = ds.score_shown(shown, shed, folder)
    assert score["stop_recall"] == pytest.approx(2 / 3)
    assert score["stop_precision"] == pytest.approx(2 / 3)
    assert score["processed"] == 2
    with pytest.raises(ValueError, match=r"road9999\.png was shown but has no annotation"):
        ds.score_shown(["road9999.png"], {}, folder)
