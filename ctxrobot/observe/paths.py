"""Where observe writes — run folders, `report` folders, `trace` files — and the one-line
errors a user gets when one of them cannot be written or read.

A run folder holds speech transcripts: it is created 0750 and its database 0640, owned by
the daemon's group when one is given (`ctl`, `dash` and `report` users are its members),
so nobody else on the robot reads them. A folder that already exists keeps its mode: it
is the user's (`--out /tmp` must not close /tmp).
"""

from __future__ import annotations

import errno
import grp
import os
from pathlib import Path

from ctxrobot.model.errors import UserError

__all__ = [
    "RUN_DB_MODE",
    "RUN_FOLDER_MODE",
    "OutputPathError",
    "RunDatabaseError",
    "create_file",
    "group_id",
    "os_problem",
    "output_dir",
    "output_file",
    "prepare_run_folder",
    "restrict",
]

RUN_FOLDER_MODE = 0o750
RUN_DB_MODE = 0o640


class OutputPathError(UserError):
    """A folder or file observe must write cannot be written (wrong kind, no permission,
    read-only or full file system)."""


class RunDatabaseError(UserError):
    """A path given as a recorded run is not a readable run database."""


def os_problem(err: OSError) -> str:
    """What an OSError means for someone writing there, in words."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "it is a folder, not a file",
        errno.EEXIST: "it exists and is not a folder",
    }
    return reasons.get(err.errno or 0, err.strerror or str(err))


def _why_not_writable(path: Path) -> str:
    """Why `os.access` says `path` is not writable."""
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    return "permission denied"


def group_id(group: str | int | None) -> int | None:
    """The numeric id of `group` (a name or a gid), None for none."""
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OutputPathError(
            f"group {group!r} does not exist: create it (groupadd --system {group}) "
            "or give another --group"
        ) from None


def create_file(path: Path, mode: int, gid: int | None, size: int = 0) -> None:
    """Create `path` (it must not exist) with exactly `mode`, `gid`, and `size` zero bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask took away
        if gid is not None:
            os.fchown(fd, -1, gid)
        zeros = bytes(min(size, 1 << 16))
        left = size
        while left > 0:
            left -= os.write(fd, zeros[:left])
        if size:
            os.fsync(fd)
    finally:
        os.close(fd)


def restrict(path: Path, mode: int, gid: int | None) -> None:
    """Give `path` exactly `mode` and, when `gid` is set, that group."""
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as err:
        raise OutputPathError(
            f"cannot set the mode or group of {path}: {os_problem(err)}; run as root or as "
            "a member of the group"
        ) from err


def prepare_run_folder(run_dir: str | Path, group: str | int | None = None) -> Path:
    """The absolute run folder, created 0750 (with `group`) if missing, checked writable."""
    run_dir = Path(run_dir).absolute()
    gid = group_id(group)
    fix = "give --out a folder you can write"
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputPathError(f"run folder {run_dir} is a file, not a folder: {fix}")
    created = not run_dir.exists()
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(mode=RUN_FOLDER_MODE, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"cannot create run folder {run_dir}: {os_problem(err)}: {fix}"
        ) from None
    if created:
        restrict(run_dir, RUN_FOLDER_MODE, gid)
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise OutputPathError(f"run folder {run_dir}: {_why_not_writable(run_dir)}: {fix}")
    return run_dir


def output_dir(path: str | Path, what: str) -> Path:
    """A folder to write `what` into, created if missing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"--out {path} is a file: give a folder for the {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"cannot create --out folder {path}: {os_problem(err)}: give a folder you can "
            f"write for the {what}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"--out folder {path}: {_why_not_writable(path)}: give another for the {what}"
        )
    return path


def output_file(path: str | Path, default_name: str, what: str) -> Path:
    """A file to write `what` into: `path` itself, or `default_name` inside it when it is a
    folder."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputPathError(
            f"--out {path}: {path.parent} is a file, not a folder: give a path in a folder"
        )
    output_dir(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"--out {path}: {_why_not_writable(path)}: give another file")
    return path
