"""Manifest and scenario loading: the shipped configs are valid, and every class of mistake
is reported at its exact line and column with a message that says how to fix it."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest

from ctxrobot.manifest.schema import (
    ManifestError,
    Problem,
    Resources,
    load_manifest,
    load_scenario,
    validate_file,
)
from tests.conftest import require_data

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
FIXTURES = Path(__file__).parent / "manifests"

# The data layout the fixtures name. Validation only checks that these exist, so empty
# files stand in for the real recordings and the tests run without the data set.
FAKE_FILES = (
    "slam/intel/intel_laser.txt.gz",
    "slam/intel/intel_odom.txt",
    "slam/intel/laser.yaml",
    "signs/images/road1.png",
    "signs/images/road12.png",
    "signs/images/road2.png",
    "signs/images/road52.png",
    "speech/audio/ps_goforward.wav",
)


@pytest.fixture
def fake_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "data"
    for rel in FAKE_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    monkeypatch.setenv("CTXROBOT_DATA", str(root))
    monkeypatch.delenv("CTXROBOT_TEST_UNSET_TAG", raising=False)
    monkeypatch.delenv("ROVER_CPUS", raising=False)
    return root


def found(name: str) -> list[tuple[int, int, str]]:
    problems = validate_file(FIXTURES / name)
    assert all(p.file == str(FIXTURES / name) for p in problems)
    return [(p.line, p.col, p.message) for p in problems]


# --------------------------------------------------------------------------- valid configs


def test_default_robot_loads_with_resolved_values() -> None:
    manifest = load_manifest(CONFIG / "robot.yaml")
    assert manifest.path == CONFIG / "robot.yaml"
    assert manifest.data_dir.is_absolute()
    assert [t.name for t in manifest.tasks] == ["slam", "signs", "speech"]
    slam = manifest.task("slam")
    assert (slam.image, slam.input, slam.command) == ("ctxrobot/slam", "lidar", None)
    assert slam.resources.memory == 768 * 1024**2
    assert slam.deadline_s == 0.25
    assert manifest.task("speech").queue.overflow == "block"
    assert manifest.scheduler.policy == "ctx"
    assert manifest.scheduler.period_s == 0.1
    assert manifest.robot.cpus == 2
    assert manifest.context.sign is not None and manifest.context.sign.task == "signs"
    assert [r.name for r in manifest.rules][:2] == [
        "speech-critical-while-voice",
        "slam-critical-while-moving",
    ]
    scenario = manifest.scenario
    assert scenario.path == CONFIG / "scenarios" / "default.yaml"
    assert scenario.duration_s == 180
    assert set(scenario.sources) == {"lidar", "camera", "mic"}
    with pytest.raises(KeyError, match="no task 'nav'; tasks: slam, signs, speech"):
        manifest.task("nav")


@pytest.mark.parametrize(
    "path",
    sorted(CONFIG.glob("examples/*.yaml")) + sorted(CONFIG.glob("scenarios/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_configs_are_valid(path: Path) -> None:
    assert validate_file(path) == []


def test_default_scenario_changes_context_every_few_seconds() -> None:
    """Voice and sign events alone must change the context every 3-4 s on average, and no
    quiet stretch may last long (motion adds more changes on top)."""
    data = require_data("speech/audio").parents[1]
    scenario = load_scenario(CONFIG / "scenarios" / "default.yaml", data)
    changes: list[float] = []
    for play in scenario.sources["mic"].play:
        with wave.open(str(play.file)) as wav:
            changes += [play.at_s, play.at_s + wav.getnframes() / wav.getframerate()]
    for show in scenario.sources["camera"].show:
        changes += [show.at_s, show.at_s + show.hold_s]
    changes.sort()
    gaps = [b - a for a, b in zip([0.0, *changes], [*changes, scenario.duration_s], strict=True)]
    assert scenario.duration_s / len(changes) <= 4.0
    assert max(gaps) <= 8.0


def test_scenario_paths_are_absolute_and_idle_images_in_natural_order(fake_data: Path) -> None:
    scenario = load_scenario(FIXTURES / "scenario.yaml", fake_data)
    assert scenario.data_dir == fake_data
    assert scenario.sources["lidar"].log == fake_data / "slam/intel"
    camera = scenario.sources["camera"]
    assert camera.size == (640, 480)
    assert camera.show[0].image == fake_data / "signs/images/road52.png"
    assert [p.name for p in camera.idle.images()] == ["road1.png", "road12.png"]


def test_data_files_are_not_checked_without_a_data_dir(tmp_path: Path) -> None:
    scenario = load_scenario(FIXTURES / "missing_data_file.yaml", tmp_path / "absent")
    assert scenario.sources["camera"].show[0].image == tmp_path / "absent/signs/images/road53.png"


@pytest.mark.parametrize(
    ("text", "size"),
    [("512Mi", 512 * 1024**2), ("1Gi", 1024**3), ("800M", 800_000_000), ("1.5Gi", 3 * 2**29),
     (10_000_000, 10_000_000)],
)  # fmt: skip
def test_memory_sizes_become_bytes(text: str | int, size: int) -> None:
    assert Resources.model_validate({"memory": text}).memory == size


def test_env_expansion_retypes_unquoted_values(
    fake_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROVER_CPUS", "3")
    monkeypatch.setenv("CTXROBOT_TEST_UNSET_TAG", "v1")
    manifest = load_manifest(FIXTURES / "env_unset.yaml")
    assert manifest.robot.cpus == 3
    assert manifest.task("slam").image == "ctxrobot/slam:v1"
    assert manifest.data_dir == fake_data


# --------------------------------------------------------------------------- error classes


def test_problem_prints_like_a_compiler() -> None:
    assert str(Problem("robot.yaml", 3, 7, "bad")) == "robot.yaml:3:7: bad"


def test_yaml_syntax_error(fake_data: Path) -> None:
    assert found("syntax_error.yaml") == [
        (
            3,
            9,
            "YAML syntax error: expected ',' or '}', but got ':' (while parsing a flow mapping "
            "started at line 2); check indentation, colons and quotes here",
        )
    ]


def test_duplicate_yaml_key(fake_data: Path) -> None:
    assert found("duplicate_key.yaml") == [
        (
            9,
            5,
            "duplicate key 'image' (first defined at line 7); YAML keeps only one of them, "
            "so remove or rename one",
        )
    ]


def test_unknown_key_suggests_the_closest(fake_data: Path) -> None:
    assert found("unknown_key.yaml") == [
        (
            9,
            31,
            "unknown key 'cpu_mx' in tasks[0].resources; did you mean 'cpu_max'? "
            "allowed keys: cpu_min, cpu_max, weight, memory, max_freeze_s",
        )
    ]


def test_wrong_type(fake_data: Path) -> None:
    assert found("wrong_type.yaml") == [
        (
            9,
            28,
            'tasks[0].env.OMP_NUM_THREADS: expected a string (quote it: "..."), got the number 1',
        ),
        (10, 18, "tasks[0].deadline_ms: expected a number, got the string 'fast'"),
    ]


def test_missing_required_field(fake_data: Path) -> None:
    assert found("missing_field.yaml") == [
        (
            6,
            5,
            "missing required field 'image' in tasks[0]; add `image:` "
            "(the Docker image that runs the task, e.g. ctxrobot/slam)",
        )
    ]


def test_value_out_of_range(fake_data: Path) -> None:
    assert found("out_of_range.yaml") == [
        (
            9,
            40,
            "tasks[0].resources.cpu_max = 1.5 is out of range (a fraction of the whole "
            "machine): it must be <= 1.0",
        ),
        (9, 53, "tasks[0].resources.weight = 0 is out of range (a cgroup weight): it must be >= 1"),
    ]


def test_duplicate_task_name(fake_data: Path) -> None:
    assert found("duplicate_task.yaml") == [
        (
            9,
            11,
            "duplicate task name 'slam' (first used at line 6); task names must be unique, "
            "rename one",
        )
    ]


def test_unknown_references(fake_data: Path) -> None:
    assert found("unknown_reference.yaml") == [
        (
            8,
            12,
            "task input 'lidr' is not a source of scenario.yaml; did you mean 'lidar'? "
            "sources: lidar, camera, mic",
        ),
        (
            13,
            19,
            "context.voice.source 'camera' is of kind camera_replay, but voice needs a source "
            "of kind audio_replay or microphone such as 'mic'",
        ),
        (14, 32, "context.sign.task 'signs' is not a task; tasks: slam, speech"),
        (
            18,
            11,
            "rule 'listen' sets unknown task 'spech'; did you mean 'speech'? tasks: slam, speech",
        ),
    ]


def test_bad_expressions_point_into_the_condition(fake_data: Path) -> None:
    assert found("bad_expression.yaml") == [
        (13, 27, "bad condition in rules[0].when: function calls are not allowed"),
        (  # quoted scalar: the column counts the opening quote
            16,
            22,
            "bad condition in rules[1].when: motion is never 'stoped': it is one of 'moving', "
            "'turning', 'stopped'; did you mean 'stopped'?",
        ),
        (
            19,
            11,
            "rule 'needs-voice' uses voice_active, which context.voice produces, but "
            "context.voice is not configured; add a `voice:` section under `context:`",
        ),
    ]


def test_missing_data_file(fake_data: Path) -> None:
    missing = fake_data / "signs/images/road53.png"
    assert found("missing_data_file.yaml") == [
        (
            8,
            26,
            f"sources.camera.show[0].image: data file not found: {missing}; paths are relative "
            f"to data_dir ({fake_data}), check the spelling or list the folder to pick an "
            "existing file",
        )
    ]


def test_unset_env_var_without_default(fake_data: Path) -> None:
    assert found("env_unset.yaml") == [
        (
            9,
            26,
            "environment variable CTXROBOT_TEST_UNSET_TAG is not set and "
            "'${CTXROBOT_TEST_UNSET_TAG}' has no default; export CTXROBOT_TEST_UNSET_TAG or "
            "write ${CTXROBOT_TEST_UNSET_TAG:-default}",
        )
    ]


def test_all_problems_are_collected_at_once(fake_data: Path) -> None:
    assert [(line, col) for line, col, _ in found("many_problems.yaml")] == [
        (9, 20),  # queue.depth: out of range
        (9, 33),  # queue.overflow: not one of the choices
        (10, 5),  # second task: no image
        (10, 11),  # second task: duplicate name
        (12, 21),  # scheduler.policy: not one of the choices
        (15, 18),  # rules[0].when: incomplete condition, pointing at its end
    ]
    with pytest.raises(ManifestError) as caught:
        load_manifest(FIXTURES / "many_problems.yaml")
    assert len(caught.value.problems) == 6
    assert str(caught.value).splitlines()[-1] == (
        f"{FIXTURES / 'many_problems.yaml'}:15:18: bad condition in rules[0].when: syntax "
        "error: the condition ends before it is complete; a condition looks like "
        "`speed > 0.2 and not voice_active`"
    )


def test_problems_in_manifest_and_scenario_are_reported_together(
    fake_data: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "robot.yaml"
    manifest.write_text(
        "version: 1\n"
        "robot: {name: rover}\n"
        f"scenario: {FIXTURES / 'missing_data_file.yaml'}\n"
        "tasks:\n"
        "  - {name: slam, image: ctxrobot/slam, input: lidar, deadline_ms: 0}\n"
    )
    problems = validate_file(manifest)
    assert {(Path(p.file).name, p.line, p.col) for p in problems} == {
        ("missing_data_file.yaml", 8, 26),
        ("robot.yaml", 5, 67),
    }


def test_missing_scenario_file(fake_data: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "robot.yaml"
    manifest.write_text(
        "version: 1\nrobot: {name: rover}\nscenario: nowhere.yaml\n"
        "tasks: [{name: slam, image: ctxrobot/slam, input: lidar}]\n"
    )
    assert [str(p) for p in validate_file(manifest)] == [
        f"{manifest}:3:11: scenario file not found: {tmp_path / 'nowhere.yaml'}; the path is "
        f"relative to the manifest's folder ({tmp_path})"
    ]


def test_file_that_is_neither_manifest_nor_scenario(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("name: x\n")
    assert [(p.line, p.col) for p in validate_file(path)] == [(1, 1)]
    assert "neither a manifest" in validate_file(path)[0].message


def test_scenario_problems(fake_data: Path) -> None:
    assert found("bad_scenario.yaml") == [
        (1, 10, "version 2 is not supported; this ctxrobot reads `version: 1`"),
        (
            4,
            3,
            "sources.Lidar: 'Lidar' is not a valid name; use lowercase letters, digits, '_' "
            "and '-', starting with a letter (e.g. 'lidar')",
        ),
        (7, 11, "sources.camera.size: size must be [width, height], e.g. [640, 480], got [640]"),
        (
            10,
            16,
            "sources.camera.show[1] at 7 s overlaps the image shown at 5 s for 3 s; start it "
            "at 8 s or later, or shorten the earlier hold_s",
        ),
        (
            11,
            16,
            "sources.camera.show[2].at_s = 30 is not before the scenario ends (duration_s 30); "
            "move it earlier or lengthen duration_s",
        ),
        (
            12,
            8,
            "sources.eye: the camera has nothing to show; add `idle:` (stills shown in turn) or "
            "`show:` (timed images)",
        ),
        (
            13,
            29,
            "unknown key 'volume' in sources.mic; remove it; allowed keys: kind, chunk_ms, play",
        ),
        (
            14,
            17,
            "sources.radar: unknown kind 'radar_replay'; did you mean 'laser_replay'? use one "
            "of laser_replay, camera_replay, audio_replay, camera, microphone, rplidar, "
            "pose_odometry",
        ),
        (
            15,
            3,
            "sources.other has no 'kind'; add `kind:` with one of laser_replay, camera_replay, "
            "audio_replay, camera, microphone, rplidar, pose_odometry",
        ),
    ]


def test_merge_keys_override_without_duplicate_errors(fake_data: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "robot.yaml"
    manifest.write_text(
        "version: 1\n"
        "robot: {name: rover}\n"
        f"scenario: {FIXTURES / 'scenario.yaml'}\n"
        "tasks:\n"
        "  - &base {name: slam, image: ctxrobot/slam, input: lidar}\n"
        "  - <<: *base\n"
        "    name: signs\n"
        "    input: camera\n"
    )
    loaded = load_manifest(manifest)
    assert [(t.name, t.image, t.input) for t in loaded.tasks] == [
        ("slam", "ctxrobot/slam", "lidar"),
        ("signs", "ctxrobot/slam", "camera"),
    ]


def test_a_task_cannot_read_a_source_without_samples(tmp_path: Path, fake_data: Path) -> None:
    """pose_odometry turns a task's poses into odometry for the context; it has no samples."""
    (tmp_path / "scenario.yaml").write_text(
        "version: 1\nduration_s: 10\nsources:\n"
        "  pose: {kind: pose_odometry, task: slam}\n"
        "  mic: {kind: audio_replay, play: [{at_s: 1.0, file: speech/audio/ps_goforward.wav}]}\n"
    )
    robot = tmp_path / "robot.yaml"
    robot.write_text(
        "version: 1\nrobot: {name: rover}\ndata_dir: ${CTXROBOT_DATA}\nscenario: scenario.yaml\n"
        "tasks:\n  - {name: slam, image: ctxrobot/slam, input: pose}\n"
    )
    messages = [(p.line, p.message) for p in validate_file(robot)]
    assert messages == [
        (
            6,
            "task input 'pose' is a pose_odometry source, which makes odometry for the context "
            "but no samples; give the task a sensor source",
        )
    ]


def test_a_lidars_mount_is_three_numbers_in_range(tmp_path: Path) -> None:
    """``mount`` says where an RPLidar sits on the base ([x m, y m, yaw °]); a pair, or a yaw
    past a full turn, is refused at the number that is wrong."""
    path = tmp_path / "sensors.yaml"
    for mount, expected in (
        (
            "[0.1, 0]",
            (
                6,
                12,
                "sources.lidar.mount: mount must be [x, y, yaw]: metres forward, metres "
                "left, degrees counter-clockwise, e.g. [0.1, 0.0, 180.0], got [0.1, 0]",
            ),
        ),
        (
            "[0.1, 0, 400]",
            (6, 21, "sources.lidar.mount[2] = 400 is out of range: it must be <= 360.0"),
        ),
    ):
        path.write_text(
            "version: 1\nduration_s: 10\nsources:\n  lidar:\n    kind: rplidar\n"
            f"    mount: {mount}\n"
        )
        assert [(p.line, p.col, p.message) for p in validate_file(path)] == [expected]
    path.write_text(
        "version: 1\nduration_s: 10\nsources:\n  lidar:\n    kind: rplidar\n"
        "    mount: [0.1, 0, 180]\n"
    )
    assert validate_file(path) == []
