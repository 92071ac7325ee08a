"""Host paths a manifest names: looked at without ever raising, and checked against the
mount policy before any of them reaches a container.

Policy: a bind mount (and ``data_dir``, which every task gets at ``/data``) may not be,
lie under, or contain the host's kernel interfaces (``/proc``, ``/sys``, ``/dev``), the
container engine's socket and state, or ctxrobot's own folders. "Contain" is what refuses
``/`` and ``/var/run``: they hold the Docker socket. A read-only bind does not help there:
a read-only socket still accepts connections. Targets are normalised (``/run//ctxrobot``,
``/data/../run/ctxrobot``) before they are compared with the folders ctxrobot mounts itself.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ctxrobot.manifest.defaults import REPO
from ctxrobot.manifest.problems import shown

_ENGINE = "the container engine's socket and state: a task could start privileged containers"
_RUNTIME = "ctxrobot's own folder (control and task sockets, run databases)"
#: Host paths no mount may touch, and why.
PROTECTED_SOURCES: tuple[tuple[str, str], ...] = (
    ("/proc", "the host's process and kernel interface"),
    ("/sys", "the host's kernel and cgroup interface: a task could re-share the CPU itself"),
    ("/dev", "the host's devices"),
    ("/run/docker.sock", _ENGINE),
    ("/var/run/docker.sock", _ENGINE),
    ("/run/docker", _ENGINE),
    ("/run/containerd", _ENGINE),
    ("/var/lib/docker", _ENGINE),
    ("/var/lib/containerd", _ENGINE),
    ("/run/ctxrobot", _RUNTIME),
    (str(REPO / "runs"), _RUNTIME),
)

DATA_MOUNT = "/data"  # where data_dir appears inside every container
#: Container paths ctxrobot mounts itself (Debian images link /var/run to /run).
RESERVED_TARGETS: tuple[tuple[str, str], ...] = (
    (DATA_MOUNT, "where ctxrobot mounts the data root"),
    ("/run/ctxrobot", "where ctxrobot mounts the task's socket"),
    ("/var/run/ctxrobot", "where ctxrobot mounts the task's socket"),
    ("/proc", "the container's kernel interface"),
    ("/sys", "the container's kernel interface"),
    ("/dev", "the container's devices"),
)


@dataclass(frozen=True)
class Probe:
    """What is at a path: ``missing`` also when it cannot be looked at (``reason`` then)."""

    kind: Literal["missing", "file", "dir", "other"]
    reason: str = "not found"


def probe(path: Path) -> Probe:
    """Look at ``path`` (following links); never raises."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return Probe("missing")
        return Probe("missing", exc.strerror or "cannot be read")
    except ValueError:
        return Probe("missing", "the path holds a NUL character")
    if stat.S_ISDIR(mode):
        return Probe("dir")
    return Probe("file" if stat.S_ISREG(mode) else "other")


def matches(folder: Path, pattern: str) -> list[Path]:
    """Entries of ``folder`` matching a file-name pattern; empty when unreadable."""
    try:
        return list(folder.glob(pattern))
    except (OSError, ValueError, NotImplementedError):
        return []


def real(path: Path) -> Path:
    """The path with links resolved as far as they exist; never raises on loops."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return path


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def refused_source(path: Path) -> str | None:
    """Why the host path may not be bind-mounted into a task, or None when it may."""
    resolved = str(real(path))
    if resolved == "/":
        return "it is the host's whole filesystem"
    for protected, why in PROTECTED_SOURCES:
        for form in {protected, str(real(Path(protected)))}:
            if _within(resolved, form):
                return f"it is {why}"
            if _within(form, resolved):
                return f"it contains {form} ({why})"
    return None


def container_target(target: str) -> tuple[str, str | None]:
    """The normalised container path, and why it may not be mounted over (or None)."""
    if not target.startswith("/"):
        return target, f"mount target {shown(target)} must be an absolute container path"
    # normpath keeps a leading "//" (POSIX leaves its meaning open); Linux does not.
    normal = "/" + posixpath.normpath(target).lstrip("/")
    if normal == "/":
        return normal, "mount target / would hide the container's whole filesystem"
    for reserved, what in RESERVED_TARGETS:
        if _within(normal, reserved):
            written = "" if normal == target else f" (written {shown(target)})"
            return normal, (
                f"mount target {normal}{written} is inside {reserved} ({what}); pick another folder"
            )
    return normal, None
