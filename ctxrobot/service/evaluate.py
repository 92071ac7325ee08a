"""`ctxrobot eval`: a task's evaluator, run inside the task's own container.

The container sees the dataset read-only at /dataset/<its folder's name> and the data root
(models, cascades) read-only at /data, has no network, and is pinned to one CPU, so the speed
it reports is what one core of the robot gives that task alone. A file or folder of the host
named in the evaluator's own arguments is mounted read-only under /host. What the evaluator
writes (the SLAM map) goes to a folder of the container's own and is copied out to the
caller's.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ctxrobot.actuate.docker import (
    TASK_UID,
    BindMount,
    ContainerError,
    ContainerSpec,
    DockerBackend,
)
from ctxtask.datasets import data_dir

IMAGES = {"slam": "ctxrobot/slam", "signs": "ctxrobot/signs", "speech": "ctxrobot/speech"}
EVAL_CPU = 1  # cpu 0 takes most interrupts and the host runtime; measure on the other


class EvalError(RuntimeError):
    """Bad arguments or an unusable environment (exit status 2)."""


def _check_readable_by_task_user(path: Path) -> None:
    """The evaluator runs as the image's unprivileged user (uid 10001), not as the caller:
    a file or folder only its owner can read would fail deep inside the container instead."""
    unreadable = [
        p
        for p in (path, *(path.iterdir() if path.is_dir() else ()))
        if not (p.stat().st_mode & (0o005 if p.is_dir() else 0o004))
    ]
    if unreadable:
        raise EvalError(
            f"{unreadable[0]} is not readable by other users, and the task container runs "
            f"as uid {TASK_UID}; make it readable: chmod -R o+rX {path}"
        )


def _mount_host_paths(extra: Sequence[str]) -> tuple[list[str], list[BindMount]]:
    """The evaluator's arguments, those that name a file or folder of the host (a path with a
    /, e.g. `--models ~/signs-models`) pointed at a read-only mount of it under /host: the
    container sees nothing else of the host."""
    args: list[str] = []
    mounts: list[BindMount] = []
    for arg in extra:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        host = Path(value).expanduser()
        if "/" not in value or not host.exists():
            args.append(arg)
            continue
        host = host.resolve()
        _check_readable_by_task_user(host)
        inside = str(PurePosixPath("/host") / host.relative_to(host.anchor))
        if all(mount.target != inside for mount in mounts):  # Docker refuses a target twice
            mounts.append(BindMount(host, inside, read_only=True))
        args.append(f"{option}{equals}{inside}")
    return args, mounts


def _map_folder(task: str, map_out: Path) -> Path:
    """The caller's folder for the map, made if missing; refused where no map can go."""
    if task != "slam":
        raise EvalError(f"--map-out: only the slam evaluator writes a map, not the {task} one")
    map_out = map_out.expanduser().resolve()
    try:
        map_out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(
            f"--map-out {map_out}: {err.strerror}; give a folder you can write"
        ) from err
    if not os.access(map_out, os.W_OK | os.X_OK):
        raise EvalError(f"--map-out {map_out}: not writable; give a folder you can write")
    return map_out


def _refuse_paths_inside(extra: Sequence[str]) -> None:
    """An evaluator path option after -- names a path inside the container, lost with it."""
    if any(arg.split("=", 1)[0] == "--map-out" for arg in extra):
        raise EvalError(
            "--map-out after -- would write the map inside the container, where it is lost; "
            "give it before --: ctxrobot eval slam DATASET_DIR --map-out DIR"
        )


def evaluate_in_container(
    task: str,
    dataset: Path,
    *,
    json_output: bool,
    extra: Sequence[str] = (),
    cpu: int | None = None,
    map_out: Path | None = None,
) -> int:
    """Run `python -m <task>.evaluate /dataset/<name>` in the task image; stream its output.
    With ``map_out``, the SLAM map (map.png, map.yaml) ends up in that folder of the caller's.

    Returns the evaluator's exit status.
    """
    dataset = dataset.expanduser().resolve()
    if not dataset.is_dir():
        raise EvalError(f"{dataset}: not a folder")
    _check_readable_by_task_user(dataset)
    _refuse_paths_inside(extra)
    extra, host_mounts = _mount_host_paths(extra)
    cpus = os.sched_getaffinity(0)
    if cpu is None:
        cpu = EVAL_CPU if EVAL_CPU in cpus else min(cpus)
    elif cpu not in cpus:
        raise EvalError(f"--cpu {cpu}: not a CPU this process may use ({sorted(cpus)})")
    if map_out is not None:
        map_out = _map_folder(task, map_out)
    image = IMAGES[task]
    root = data_dir()
    # Under its own name, so that what the evaluator prints (the log's name, what is wrong with
    # the folder) names the user's folder, not a mount point every dataset shares.
    inside = str(PurePosixPath("/dataset") / (dataset.name or "root"))
    mounts = [BindMount(dataset, inside, read_only=True)]
    if root.is_dir():
        mounts.append(BindMount(root, "/data", read_only=True))
    mounts += host_mounts
    command = ["python", "-m", f"{task}.evaluate", inside, *(["--json"] if json_output else [])]
    command += list(extra)
    backend = DockerBackend()
    staging = _staging_folder() if map_out is not None else None
    if staging is not None:
        mounts.append(BindMount(staging, "/map", read_only=False))
        command += ["--map-out", "/map"]
    name = f"ctxrobot-eval-{task}-{os.getpid()}-{int(time.time())}"
    spec = ContainerSpec(
        name=name,
        image=image,
        task=task,
        run_id=f"eval-{os.getpid()}",
        command=command,
        env={"CTXROBOT_DATA": "/data", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        mounts=tuple(mounts),
        cpuset_cpus=str(cpu),
    )
    try:
        status = _run(backend, spec)
        if staging is not None and map_out is not None and status == 0:  # both, or neither
            _copy_map(staging, map_out)
        return status
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _run(backend: DockerBackend, spec: ContainerSpec) -> int:
    """Start the evaluator, stream its output, return its exit status; the container is
    removed either way."""
    try:
        container = backend.create_and_start(spec)
    except ContainerError as err:
        raise EvalError(str(err)) from err
    try:
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
            sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        status = int(container.wait()["StatusCode"])
        if status != 0:
            sys.stderr.write(container.logs(stdout=False, stderr=True).decode(errors="replace"))
        return status
    finally:
        backend.remove(spec.name)


def _staging_folder() -> Path:
    """A folder the evaluator, running as the image's unprivileged user, may write; its files
    are copied to the caller's folder, as the caller, afterwards."""
    staging = Path(tempfile.mkdtemp(prefix="ctxrobot-eval-map-"))
    if os.geteuid() == 0:
        os.chown(staging, TASK_UID, TASK_UID)
    else:
        staging.chmod(0o777)
    return staging


def _copy_map(staging: Path, map_out: Path) -> None:
    written = sorted(staging.iterdir())
    if not written:
        # The evaluator writes no map without a keyframe (e.g. every beam saw "no return").
        print("ctxrobot eval: no map was written (no keyframe)", file=sys.stderr)
        return
    try:
        for path in written:
            shutil.copyfile(path, map_out / path.name)
    except OSError as err:
        raise EvalError(f"--map-out {map_out}: {err.strerror}") from err
    names = ", ".join(path.name for path in written)
    print(f"ctxrobot eval: map written to {map_out} ({names})", file=sys.stderr)
