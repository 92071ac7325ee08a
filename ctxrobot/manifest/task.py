"""Task schema: one containerized task, its resources, queue, restart policy, mounts and
the least-privilege settings of its container.

Least privilege is the default: every capability dropped, ``no-new-privileges``, a
read-only root filesystem (with a small tmpfs at ``/tmp``), a PID limit, swap equal to
memory, host mounts read-only. ``security:`` loosens these per task and every loosening is
a warning ``ctxrobot validate`` prints (:meth:`TaskSpec.privileges`).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ctxrobot.manifest.fields import MAX_PATH, MODEL, Fraction, Name
from ctxrobot.manifest.hostpaths import container_target, probe, real, refused_source
from ctxrobot.manifest.problems import shown
from ctxrobot.manifest.units import memory_bytes
from ctxrobot.manifest.yamlload import plain

#: Linux capability names (capabilities(7), Linux 6.x), as Docker's cap_add takes them.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
    "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip
#: Processes (threads count) a task may run: the tasks run a handful of threads each.
DEFAULT_PIDS_LIMIT = 256

RelPath = tuple[str | int, ...]


def _capability(name: str) -> str:
    if name in CAPABILITIES:
        return name
    bare = name.upper().removeprefix("CAP_")
    if name.upper() == "ALL":
        raise ValueError(
            "cap_add: ALL would give the task every capability; list the ones it needs"
        )
    if bare in CAPABILITIES:
        raise ValueError(f"write the capability {shown(name)} as {bare}")
    close = difflib.get_close_matches(bare, CAPABILITIES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(
        f"{shown(name)} is not a Linux capability; {hint}the names are those of "
        "capabilities(7) without CAP_, e.g. SYS_NICE"
    )


class SecuritySpec(BaseModel):
    """Loosens the task container's least-privilege defaults; each loosening is a warning."""

    model_config = MODEL
    cap_add: list[Annotated[str, Field(max_length=32), AfterValidator(_capability)]] = Field(
        [], description="Linux capabilities the task needs, e.g. [SYS_NICE]; all others dropped"
    )
    read_only_root: bool = Field(
        True, description="false: the task may write anywhere in its container, not only /tmp"
    )
    no_new_privileges: bool = Field(
        True, description="false: setuid programs in the image may gain privileges"
    )
    pids_limit: Annotated[int, Field(ge=16, le=32768)] = Field(
        DEFAULT_PIDS_LIMIT, description="most processes and threads the task may run"
    )


class Mount(BaseModel):
    """A host folder or file bind-mounted into the task's container."""

    model_config = MODEL
    source: Path = Field(description="host path, relative to the manifest's folder")
    target: Annotated[str, Field(max_length=MAX_PATH)] = Field(
        description="absolute path inside the container"
    )
    read_only: bool = Field(True, description="false lets the task write to the host path")

    @field_validator("source", mode="before")
    @classmethod
    def _resolve(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        if len(value) > MAX_PATH:
            raise ValueError(f"the path is longer than {MAX_PATH} characters, the most Linux takes")
        path = real(info.context["base"] / value)
        found = probe(path)
        if found.kind == "missing":
            reason = "" if found.reason == "not found" else f" ({found.reason})"
            raise ValueError(
                f"mount source not found: {path}{reason}; relative paths start at the "
                "manifest's folder, create it or fix the path"
            )
        why = refused_source(path)
        if why is not None:
            raise ValueError(
                f"mount source {path} is refused: {why}; mount only the folder the task needs"
            )
        return path

    @field_validator("target")
    @classmethod
    def _target(cls, target: str) -> str:
        normal, why = container_target(target)
        if why is not None:
            raise ValueError(why)
        return normal


class Resources(BaseModel):
    model_config = MODEL
    cpu_min: Fraction = 0.05
    cpu_max: Fraction = 1.0
    weight: Annotated[int, Field(ge=1, le=10000)] = 100
    memory: Annotated[int | None, BeforeValidator(memory_bytes)] = Field(
        None, description="memory limit, 6Mi to 1Ti, e.g. 768Mi; swap is limited to the same"
    )
    max_freeze_s: Annotated[float, Field(ge=0.01, le=600)] = Field(
        2.0, description="longest the scheduler may keep the task frozen in one go"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Resources:
        if self.cpu_min > self.cpu_max:
            raise ValueError(
                f"cpu_min {self.cpu_min} is above cpu_max {self.cpu_max}; "
                "lower cpu_min or raise cpu_max"
            )
        return self


class QueueSpec(BaseModel):
    model_config = MODEL
    depth: Annotated[int, Field(ge=1, le=1024)] = Field(
        4, description="most samples waiting for the task"
    )
    overflow: Literal["drop_oldest", "block"] = Field(
        "drop_oldest",
        description="when `depth` samples wait: drop_oldest drops the oldest to make room; "
        "block is back-pressure with a bound: the queue still holds at most `depth` samples "
        "and the source waits until the task takes one",
    )


class RestartSpec(BaseModel):
    """What the daemon does when a task's container stops serving (Docker's meanings)."""

    model_config = MODEL
    policy: Literal["never", "on-failure", "always"] = Field(
        "on-failure",
        description="never; on-failure: after a non-zero exit or a broken connection, at most "
        "max_retries times; always: after any exit, a clean one too, without limit",
    )
    max_retries: Annotated[int, Field(ge=0, le=1000, description="on-failure only")] = 5
    backoff_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        1.0, description="first wait before a restart; it doubles after each failure"
    )


def _finite(value: Any) -> Any:
    """Task `config:` holds JSON (the task receives it so): no inf or nan."""
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            _finite(item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config values must be finite numbers (JSON has no {value})")
    return value


class TaskSpec(BaseModel):
    """One containerized task."""

    model_config = MODEL
    name: Name = Field(description="task name, e.g. slam")
    image: Annotated[str, Field(min_length=1, max_length=255)] = Field(
        description="the Docker image that runs the task, e.g. ctxrobot/slam"
    )
    command: list[str] | None = None
    input: Name = Field(description="a source name from the scenario, e.g. lidar")
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=255)], str] = {}
    mounts: list[Mount] = []
    config: Annotated[dict[str, Any], BeforeValidator(plain), AfterValidator(_finite)] = {}
    resources: Resources = Resources()
    deadline_ms: Annotated[float, Field(ge=1, le=60_000)] = 1000.0
    stale: Literal["skip", "process"] = Field(
        "process",
        description="skip: a sample already past the deadline when it would be sent is not "
        "sent and counts as shed; process: the task gets it anyway",
    )
    queue: QueueSpec = QueueSpec()
    restart: RestartSpec = RestartSpec()
    security: SecuritySpec = SecuritySpec()

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0

    @model_validator(mode="after")
    def _one_mount_per_target(self) -> TaskSpec:
        targets = [m.target for m in self.mounts]
        for target in targets:
            if targets.count(target) > 1:
                raise ValueError(f"two mounts share the target {target}; give each its own")
        return self

    def privileges(self) -> list[tuple[RelPath, str]]:
        """Each way this task is less confined than the defaults: the path of the setting
        (relative to the task) and what it allows."""
        found: list[tuple[RelPath, str]] = []
        security = self.security
        for i, name in enumerate(security.cap_add):
            found.append((("security", "cap_add", i), f"adds the Linux capability {name}"))
        if not security.read_only_root:
            found.append((("security", "read_only_root"), "runs with a writable root filesystem"))
        if not security.no_new_privileges:
            found.append(
                (
                    ("security", "no_new_privileges"),
                    "may gain privileges through setuid programs (no_new_privileges: false)",
                )
            )
        if security.pids_limit > DEFAULT_PIDS_LIMIT:
            found.append(
                (
                    ("security", "pids_limit"),
                    f"may run {security.pids_limit} processes (default {DEFAULT_PIDS_LIMIT})",
                )
            )
        for i, mount in enumerate(self.mounts):
            if not mount.read_only:
                found.append(
                    (("mounts", i, "read_only"), f"may write to the host's {mount.source}")
                )
        return [(path, f"task '{self.name}' {what}") for path, what in found]
