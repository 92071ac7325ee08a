"""`ctxrobot run` end to end: real containers, real sockets, real cgroups, real data.

Every test checks the promise that matters most operationally: however a run ends
(normally, SIGINT, SIGTERM, a misbehaving task, even `kill -9`), no container of ours is
left behind, and none is left frozen.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, ctxrobot, require_data, require_image

pytestmark = pytest.mark.docker

QUICK = REPO / "config" / "scenarios" / "quick.yaml"


def write_manifest(
    path: Path,
    data: Path,
    tasks: str,
    *,
    policy: str = "ctx",
) -> Path:
    path.write_text(
        f"version: 1\n"
        f"robot: {{name: test-rover, cpus: 2}}\n"
        f"data_dir: {data}\n"
        f"scenario: {QUICK}\n"
        f"tasks:\n{tasks}"
        f"scheduler: {{policy: {policy}}}\n"
        f"context:\n"
        f"  sign: {{source: camera, task: signs, hold_s: 2.0}}\n"
        f"rules:\n"
        f"  - name: signs-critical-when-sign-ahead\n"
        f"    when: sign_ahead\n"
        f"    hold_s: 1.0\n"
        f"    set: {{signs: {{critical: true, share: 0.5}}}}\n"
    )
    return path


SIGNS = (
    "  - name: signs\n"
    "    image: ctxrobot/signs\n"
    "    input: camera\n"
    "    deadline_ms: 400\n"
    "    queue: {depth: 2, overflow: drop_oldest}\n"
)


def containers(*labels: str) -> list[str]:
    """Names of ctxrobot containers (any state) carrying every given label."""
    filters = [f"--filter=label={label}" for label in ("ctxrobot.managed=1", *labels)]
    proc = subprocess.run(
        ["docker", "ps", "-a", *filters, "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.split()


def orphans() -> set[str]:
    """Our containers whose owning runtime is gone: what a run must never leave behind.
    (Containers of other live runs on this engine, e.g. a benchmark, are not orphans.)"""
    proc = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            "label=ctxrobot.managed=1",
            "--format",
            '{{.Names}}\t{{.Label "ctxrobot.instance"}}',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = set()
    for line in proc.stdout.splitlines():
        name, _, owner = line.partition("\t")
        if not (owner.isdigit() and psutil.pid_exists(int(owner))):
            found.add(name)
    return found


def run_id_of(out: Path) -> str:
    with sqlite3.connect(f"file:{out / 'run.db'}?mode=ro", uri=True) as conn:
        return str(conn.execute("select id from run").fetchone()[0])


def start_run(manifest: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctxrobot",
            "run",
            "--config",
            str(manifest),
            "--out",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def wait_for_samples(out: Path, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    """Until the run's database holds at least one processed sample."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stderr.read()}")
        db = out / "run.db"
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    if conn.execute("select count(*) from samples").fetchone()[0] > 0:
                        return
            except sqlite3.OperationalError:
                pass  # the writer has not created the tables yet
        time.sleep(0.5)
    raise AssertionError("no sample was processed in time")


@pytest.fixture
def data() -> Path:
    require_image("ctxrobot/signs")
    return require_data()


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    before = orphans()
    yield
    deadline = time.monotonic() + 60  # after kill -9 the guard is still sweeping
    while (left := orphans() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"containers left behind: {left}"


def test_run_prints_a_json_summary_and_cleans_up(tmp_path: Path, data: Path) -> None:
    manifest = write_manifest(tmp_path / "robot.yaml", data, SIGNS)
    out = tmp_path / "run"
    proc = ctxrobot(
        "run",
        "--config",
        str(manifest),
        "--out",
        str(out),
        "--duration",
        "15",
        "--json",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["policy"] == "ctx"
    assert summary["duration_s"] > 0
    signs = summary["tasks"]["signs"]
    assert signs["samples"] > 20  # a 30 fps camera for 15 s, minus what the 2-deep queue dropped
    assert signs["latency_ms"]["p50"] > 0
    assert signs["latency_ms"]["p50"] <= signs["latency_ms"]["p95"] <= signs["latency_ms"]["p99"]
    assert {"p50", "p99"} <= set(summary["actuation_ms"])
    print("\nsigns alone, 15 s:", json.dumps(signs), "actuation:", summary["actuation_ms"])
    assert (out / "run.db").exists()

    # Plots and a trace of this real run.
    report = ctxrobot("report", str(out), timeout=120)
    assert report.returncode == 0, report.stderr
    pngs = [Path(line) for line in report.stdout.split()]
    assert {p.name for p in pngs} == {"latency.png", "cpu.png", "actuation.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    trace = ctxrobot("trace", str(out), timeout=120)
    assert trace.returncode == 0, trace.stderr
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    slices = [e for e in events if e.get("ph") == "X" and e.get("cat") == "sample"]
    assert len(slices) == signs["samples"], "one slice per processed sample"
    assert any(e.get("ph") == "i" for e in events), "context changes as instants"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_the_run_cleanly(tmp_path: Path, data: Path, signum: int) -> None:
    manifest = write_manifest(tmp_path / "robot.yaml", data, SIGNS)
    out = tmp_path / "run"
    proc = start_run(manifest, out, "--duration", "120", "--json")
    try:
        wait_for_samples(out, proc)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["tasks"]["signs"]["samples"] > 0, "what was processed is in the database"


MISBEHAVING = (
    "  - name: signs\n"
    "    image: ctxrobot/signs\n"
    "    input: camera\n"
    "    command:\n"
    "      - python\n"
    "      - -c\n"
    "      - |\n"
    "        import os, socket, json, struct, time\n"
    "        s = socket.socket(socket.AF_UNIX)\n"
    "        s.connect(os.environ['CTXROBOT_SOCKET'])\n"
    "        hello = json.dumps({'type': 'hello', 'task': 'signs', 'pid': 1}).encode()\n"
    "        s.sendall(struct.pack('>I', len(hello)) + hello)\n"
    "        s.recv(65536)\n"
    "        s.sendall(struct.pack('>I', 5) + b'oops!')\n"
    "        time.sleep(300)\n"
)


def test_a_task_that_speaks_nonsense_fails_the_run_cleanly(tmp_path: Path, data: Path) -> None:
    manifest = write_manifest(tmp_path / "robot.yaml", data, MISBEHAVING)
    proc = ctxrobot(
        "run",
        "--config",
        str(manifest),
        "--out",
        str(tmp_path / "run"),
        "--duration",
        "60",
        timeout=300,
    )
    assert proc.returncode == 1
    assert "task 'signs' failed" in proc.stderr
    assert "not JSON" in proc.stderr


def test_kill_9_leaves_nothing_behind(tmp_path: Path, data: Path) -> None:
    """No `finally` runs after SIGKILL: the guard process must clean up, thawing first."""
    manifest = write_manifest(tmp_path / "robot.yaml", data, SIGNS)
    out = tmp_path / "run"
    proc = start_run(manifest, out, "--duration", "120")
    try:
        wait_for_samples(out, proc)
        run_id = run_id_of(out)
        names = containers(f"ctxrobot.run={run_id}")
        assert names, "the run's container is up"
        # Freeze it behind the runtime's back: a frozen container cannot even be stopped.
        pid = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", names[-1]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        from ctxrobot.actuate.cgroups import discover

        discover(int(pid)).freeze()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60
    while containers(f"ctxrobot.run={run_id}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not containers(f"ctxrobot.run={run_id}"), "the guard removed the killed run's"
