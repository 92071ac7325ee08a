"""The `ctxrobot` command line as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest

from tests.conftest import REPO, ctxrobot, require_data, require_image

COMMANDS = [
    "validate",
    "run",
    "ps",
    "eval",
    "report",
    "trace",
    "daemon",
    "ctl",
    "dash",
    "data",
    "bench",
]


def test_help_lists_every_command() -> None:
    proc = ctxrobot("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    proc = ctxrobot(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: ctxrobot {command}")


def test_validate_accepts_the_shipped_configs() -> None:
    configs = [
        "config/robot.yaml",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "config/examples").glob("*.yaml")),
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "config/scenarios").glob("*.yaml")),
    ]
    proc = ctxrobot("validate", *configs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": valid") == len(configs)


def test_validate_reports_file_line_col_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "robot.yaml"
    bad.write_text(
        "version: 1\n"
        "robot: {name: r}\n"
        "tasks:\n"
        "  - name: slam\n"
        "    image: ctxrobot/slam\n"
        "    deadlin_ms: 100\n"
    )
    proc = ctxrobot("validate", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:6:5:" in proc.stderr
    assert "deadline_ms" in proc.stderr  # the did-you-mean


def test_validate_missing_file_exits_2(tmp_path: Path) -> None:
    proc = ctxrobot("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr


def test_run_refuses_an_invalid_manifest_before_touching_docker(tmp_path: Path) -> None:
    bad = tmp_path / "robot.yaml"
    bad.write_text("version: 1\ntasks: 3\n")
    proc = ctxrobot("run", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_ctl_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    proc = ctxrobot("ctl", "--socket", str(tmp_path / "none.sock"), "status")
    assert proc.returncode == 2
    assert "ctxrobot daemon" in proc.stderr and "Traceback" not in proc.stderr


def test_ctl_override_needs_name_equals_value(tmp_path: Path) -> None:
    proc = ctxrobot("ctl", "--socket", str(tmp_path / "none.sock"), "override", "speed")
    assert proc.returncode == 2
    assert "NAME=VALUE" in proc.stderr


def test_report_of_a_folder_without_a_run(tmp_path: Path) -> None:
    proc = ctxrobot("report", str(tmp_path))
    assert proc.returncode == 2
    assert "no run.db" in proc.stderr


def test_eval_of_a_missing_folder(tmp_path: Path) -> None:
    proc = ctxrobot("eval", "slam", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "not a folder" in proc.stderr


def test_bench_reports_a_missing_manifest_as_file_line(tmp_path: Path) -> None:
    missing = tmp_path / "robot.yaml"
    proc = ctxrobot("bench", "--config", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{missing}:1:1: cannot read")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["run", "bench"])
def test_a_scenario_without_the_tasks_sources_is_refused(tmp_path: Path, command: str) -> None:
    scenario = tmp_path / "mic-only.yaml"
    scenario.write_text(
        "version: 1\nduration_s: 10\nsources:\n"
        "  mic: {kind: audio_replay, chunk_ms: 100, play: []}\n"
    )
    proc = ctxrobot(command, "--scenario", str(scenario), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{scenario}:1:1: the manifest's tasks read source(s) camera, lidar" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_non_yaml_file_is_described_briefly(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("just some words " * 40)
    proc = ctxrobot("validate", str(text))
    assert proc.returncode == 2
    assert "must be a mapping" in proc.stderr and len(proc.stderr) < 300


def test_eval_refuses_a_map_path_meant_for_inside_the_container() -> None:
    proc = ctxrobot("eval", "slam", str(require_data("slam/aces")), "--", "--map-out", "/maps")
    assert proc.returncode == 2
    assert "--map-out after -- would write the map inside the container" in proc.stderr


def test_eval_refuses_a_map_from_a_task_that_draws_none(tmp_path: Path) -> None:
    proc = ctxrobot("eval", "signs", str(require_data("signs")), "--map-out", str(tmp_path))
    assert proc.returncode == 2
    assert "only the slam evaluator writes a map" in proc.stderr


@pytest.mark.docker
def test_eval_writes_the_slam_map_into_the_callers_folder(tmp_path: Path) -> None:
    """The evaluator runs as the image's unprivileged user in a container that is removed
    afterwards: the map must still reach the caller's folder, as the caller's files."""
    require_image("ctxrobot/slam")
    out = tmp_path / "maps" / "aces"
    aces = str(require_data("slam/aces"))
    proc = ctxrobot("eval", "slam", aces, "--map-out", str(out), "--", "--max-scans", "300")
    assert proc.returncode == 0, proc.stderr
    assert f"map written to {out} (map.png, map.yaml)" in proc.stderr
    assert sorted(path.name for path in out.iterdir()) == ["map.png", "map.yaml"]
    assert {path.stat().st_uid for path in out.iterdir()} == {os.geteuid()}
    assert "image: map.png" in (out / "map.yaml").read_text()
    grid = cv2.imread(str(out / "map.png"), cv2.IMREAD_GRAYSCALE)
    # map_server's trinary image: 0 occupied, 254 free, 205 unknown.
    assert grid is not None and (grid == 0).any() and (grid == 254).any(), "walls and free space"


def test_eval_on_a_cpu_it_may_not_use() -> None:
    proc = ctxrobot("eval", "signs", str(require_data("signs")), "--cpu", "4096")
    assert proc.returncode == 2
    assert proc.stderr.startswith("ctxrobot eval: --cpu 4096: not a CPU this process may use")
