"""Live sensor sources: devices on the robot, read on their own threads (see
:class:`ctxrobot.streams.source.LiveSource`)."""

from __future__ import annotations

from typing import Any

from ctxrobot.streams.source import LiveSource


def build_live_source(name: str, spec: Any) -> LiveSource:
    """The live source a validated scenario entry describes."""
    raise ValueError(f"source {name!r}: unknown kind {spec.kind!r}")
