"""`ctxrobot eval`: a task's evaluator, run inside the task's own container.

The container sees the dataset read-only at /dataset/<its folder's name> and the data root
(models, cascades) read-only at /data, has no network, and is pinned to one CPU, so the speed
it reports is what one core of the robot gives that task alone.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ctxrobot.actuate.docker import BindMount, ContainerError, ContainerSpec, DockerBackend
from ctxtask.datasets import data_dir

IMAGES = {"slam": "ctxrobot/slam", "signs": "ctxrobot/signs", "speech": "ctxrobot/speech"}
EVAL_CPU = 1  # cpu 0 takes most interrupts and the host runtime; measure on the other


class EvalError(RuntimeError):
    """Bad arguments or an unusable environment (exit status 2)."""


def _check_readable_by_task_user(dataset: Path) -> None:
    """The evaluator runs as the image's unprivileged user (uid 10001), not as the caller:
    a folder only its owner can read would fail deep inside the container instead."""
    unreadable = [
        p
        for p in (dataset, *dataset.iterdir())
        if not (p.stat().st_mode & (0o005 if p.is_dir() else 0o004))
    ]
    if unreadable:
        raise EvalError(
            f"{unreadable[0]} is not readable by other users, and the task container runs "
            f"as uid 10001; make the dataset readable: chmod -R o+rX {dataset}"
        )


def evaluate_in_container(
    task: str,
    dataset: Path,
    *,
    json_output: bool,
    extra: Sequence[str] = (),
    cpu: int | None = None,
) -> int:
    """Run `python -m <task>.evaluate /dataset/<name>` in the task image; stream its output.

    Returns the evaluator's exit status.
    """
    dataset = dataset.expanduser().resolve()
    if not dataset.is_dir():
        raise EvalError(f"{dataset}: not a folder")
    _check_readable_by_task_user(dataset)
    image = IMAGES[task]
    root = data_dir()
    # Under its own name, so that what the evaluator prints (the log's name, what is wrong with
    # the folder) names the user's folder, not a mount point every dataset shares.
    inside = str(PurePosixPath("/dataset") / (dataset.name or "root"))
    mounts = [BindMount(dataset, inside, read_only=True)]
    if root.is_dir():
        mounts.append(BindMount(root, "/data", read_only=True))
    command = ["python", "-m", f"{task}.evaluate", inside, *(["--json"] if json_output else [])]
    command += list(extra)
    cpus = os.sched_getaffinity(0)
    if cpu is None:
        cpu = EVAL_CPU if EVAL_CPU in cpus else min(cpus)
    elif cpu not in cpus:
        raise EvalError(f"--cpu {cpu}: not a CPU this process may use ({sorted(cpus)})")
    backend = DockerBackend()
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
        backend.remove(name)
