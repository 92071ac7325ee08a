"""Errors a user can fix. The command line prints them as one line and exits with status 2.

Each is raised where the problem is first known, with a message saying what is wrong and
what to do; the layers below raise them instead of letting a library's exception (Docker's,
the kernel's) reach the user as a traceback.
"""

from __future__ import annotations

__all__ = [
    "CgroupPermissionError",
    "DataMissingError",
    "EngineUnavailableError",
    "ImageMissingError",
    "MountError",
    "PortInUseError",
    "UserError",
]


class UserError(Exception):
    """A problem in the user's input or machine, with the fix in its message."""


class EngineUnavailableError(UserError):
    """The Docker engine does not answer."""


class ImageMissingError(UserError):
    """A task's image is not built."""


class MountError(UserError):
    """Docker refused a bind mount."""


class PortInUseError(UserError):
    """A port the user asked for is taken."""


class CgroupPermissionError(UserError):
    """The cgroup tree is not writable by this process."""


class DataMissingError(UserError):
    """The data folder (or a file the scenario replays) is not there."""
